"""The compiled backend (issue 4) on CPU: AOTInductor packages and the fused loop, without CUDA graphs."""

import json
import shutil

import numpy as np
import pytest

from conftest import REPO, anonymize_with_engine, box_mask, cli, edit_manifest, random_image, read_rgb, save_png


@pytest.fixture(scope="module")
def compiled_zero(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled") / "zero"
    built = cli("build", "--backend", "compiled", "--compiler", "aot", "--model", models["zero"], "--out", out,
                "--device", "cpu", "--batch", "2")
    assert built.returncode == 0, built.stderr
    return out


def test_compiled_engine_round_trip_is_bit_exact(compiled_zero, keyfile, tmp_path):
    manifest = json.loads((compiled_zero / "engine.json").read_text())
    assert manifest["backend"] == "compiled" and manifest["precision"] == "fp32"
    assert manifest["graphs"]["unet"]["file"] == "unet.pt2" and manifest["compiled"]["device"] == "cpu"
    assert manifest["parity"]["unet"]["rel_l2"] < 1e-6
    inputs = tmp_path / "in"
    originals = [save_png(inputs / f"{n}.png", random_image(32, seed=60 + i)) for i, n in enumerate("abc")]
    mask = save_png(tmp_path / "mask.png", box_mask(32))
    anon = cli("run", "anonymize", inputs, "--out", tmp_path / "anon", "--engine", compiled_zero, "--mask", mask,
               "--key", keyfile)
    assert anon.returncode == 0, anon.stderr
    rec = cli("run", "deanonymize", tmp_path / "anon", "--out", tmp_path / "rec", "--engine", compiled_zero,
              "--key", keyfile)
    assert rec.returncode == 0, rec.stderr
    inside = box_mask(32) > 0
    for path in originals:
        anonymized = read_rgb(tmp_path / "anon" / path.name)
        assert (anonymized[inside] != read_rgb(path)[inside]).mean() > 0.3
        assert np.array_equal(read_rgb(tmp_path / "rec" / path.name), read_rgb(path))


def test_verify_proves_the_fused_loop_equal_to_the_plain_functions(models, tmp_path):
    """A random-weight model, so that ε depends on the latent and the timestep: a compiled UNet fed the
    wrong t, or a fused loop that skips a step, shows up in the ε rows and the final latent. Built with
    --compiler jit, the engine the GPU machine's torch runs (it crashes loading AOTInductor packages)."""
    engine = tmp_path / "pixel"
    built = cli("build", "--backend", "compiled", "--model", models["pixel"], "--out", engine, "--device", "cpu",
                "--compiler", "jit")
    assert built.returncode == 0, built.stderr
    facts = json.loads((engine / "engine.json").read_text())["compiled"]
    assert facts["compiler"] == "jit" and facts["packager"] == "torch.export.save"
    result = cli("verify", "--engine", engine, "--model", models["pixel"], "--steps", "10", "--replays", "3",
                 "--json", tmp_path / "v.json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["passed"] and report["checks"]["fused loop equals plain functions"]["passed"]
    assert report["stages"]["fused loop run to run"] == {"replays": 3, "bitwise_identical": True}
    assert report["stages"]["fused loop vs plain functions"]["max_abs"] < 1e-5
    for row in ("eps first step", "eps middle step", "eps last step", "final latent"):
        assert report["stages"][row]["rel_l2"] < 1e-5, row

    # from another torch, the hint rebuilds it as jit again
    from revanon_rt.engines import open_engine
    from revanon_rt.errors import UsageError

    edit_manifest(engine, lambda manifest: manifest["compiled"].update(torch="1.0.0"))
    with pytest.raises(UsageError, match="tied to their torch version.* --backend compiled --compiler jit"):
        open_engine(engine)


def test_eager_kernel_engine_gives_pytorchs_numbers_bit_for_bit(models, bisenet_pth, tmp_path):
    """Strict fp32's default compiler, eager: the exported programs on PyTorch's own kernels inside the fused
    loop. Every stage, the final latent after the whole loop included, must equal the eager reference with zero
    difference, which Inductor's fused kernels do not give."""
    engine = tmp_path / "eager"
    built = cli("build", "--backend", "compiled", "--model", models["ldm"], "--parser", bisenet_pth,
                "--out", engine, "--device", "cpu", "--batch", "2")
    assert built.returncode == 0, built.stderr
    manifest = json.loads((engine / "engine.json").read_text())
    assert manifest["compiled"]["compiler"] == "eager" and manifest["compiled"]["inductor_configs"] == {}
    assert all(p == {"max_abs": 0.0, "rel_l2": 0.0} for name, p in manifest["parity"].items()
               if name not in ("parser", "device")), manifest["parity"]
    result = cli("verify", "--engine", engine, "--model", models["ldm"], "--parser", bisenet_pth, "--steps", "6",
                 "--replays", "2", "--json", tmp_path / "v.json")
    assert result.returncode == 0, result.stdout + result.stderr
    stages = json.loads((tmp_path / "v.json").read_text())["stages"]
    for row in ("encode", "eps first step", "eps middle step", "eps last step", "final latent", "decoded image",
                "fused loop vs plain functions"):
        assert stages[row]["max_abs"] == 0.0, (row, stages[row])
    assert stages["anonymized 8-bit"] == {"identical_fraction": 1.0, "max_level_difference": 0}
    assert stages["parse mask"]["differing_cells"] == 0
    assert len({round(stages[f"recovery {r}"]["psnr_db"], 9) for r in
                ("pytorch -> pytorch", "engine -> engine", "engine -> pytorch", "pytorch -> engine")}) == 1

    from revanon_rt.engines.manifest import rebuild_hint

    hint = rebuild_hint(engine, manifest)
    assert "--backend compiled" in hint and "--compiler eager" in hint


def test_a_fast_precision_builds_runs_and_verify_reports_its_cost(models, tmp_path):
    """bf16 on the CPU: the opt-in fast mode builds and runs, and verify prints what it costs against the
    strict reference (recovery across backends included) instead of passing it off as exact. The precision is
    set at export, the same for every compiler, so the verified engine runs eager kernels; Inductor compiling
    bf16 programs (the default build) is checked on the smallest model, whose engine has only a UNet."""
    from revanon_rt.engines import open_engine

    aot = tmp_path / "bf16-aot"
    built = cli("build", "--backend", "compiled", "--model", models["pixel"], "--out", aot, "--precision", "bf16")
    assert built.returncode == 0, built.stderr
    facts = json.loads((aot / "engine.json").read_text())
    assert facts["precision"] == "bf16" and facts["compiled"]["compiler"] == "aot"
    backend = open_engine(aot)
    z = np.random.default_rng(0).standard_normal((1, *backend.latent_shape)).astype(np.float32)
    eps = backend.eps(z, 500)
    assert eps.dtype == np.float32 and np.isfinite(eps).all() and eps.std() > 0

    engine = tmp_path / "bf16"
    built = cli("build", "--backend", "compiled", "--compiler", "eager", "--model", models["ldm"], "--out", engine,
                "--device", "cpu", "--precision", "bf16")
    assert built.returncode == 0, built.stderr
    assert json.loads((engine / "engine.json").read_text())["precision"] == "bf16"
    result = cli("verify", "--engine", engine, "--model", models["ldm"], "--steps", "4", "--replays", "2",
                 "--json", tmp_path / "v.json")
    report = json.loads((tmp_path / "v.json").read_text())
    assert result.returncode == (0 if report["passed"] else 1)
    assert "computes in bf16" in result.stdout and "what bf16 costs" in result.stdout
    assert report["stages"]["encode"]["rel_l2"] > 1e-4, "bf16 weights really are in use"
    assert report["checks"]["fused loop equals plain functions"]["passed"], "the loop math stays fp32"
    assert {"recovery pytorch -> engine", "recovery engine -> pytorch"} <= set(report["stages"])


def test_an_engine_keeps_a_bounded_number_of_fused_loops(compiled_zero):
    """Recovery takes each image's step count from its metadata, so a long-lived service meets many
    schedules; each fused loop holds buffers (and on a GPU a CUDA graph), so only the latest are kept."""
    from revanon_rt.engines import open_engine
    from revanon_rt.keys import flip_pattern
    from revanon_rt.pixels import to_model
    from revanon_rt.sampler import transform

    backend = open_engine(compiled_zero)
    x = to_model(np.stack([random_image(32, seed=70), random_image(32, seed=71)]))
    mask = np.ones((2, 1, 32, 32), np.float32)
    pattern = np.stack([flip_pattern(bytes(32), bytes([i]) * 16, backend.latent_shape) for i in range(2)])
    updates = set()
    for steps in (2, 3, 4, 2):
        schedule = backend.schedule(steps)
        fused = backend.engine.fused_transform(x, mask, pattern, schedule)
        np.testing.assert_array_equal(fused, transform(backend, x, mask, pattern, schedule))
        assert len(backend.engine._loops) <= backend.engine.MAX_FUSED_LOOPS
        updates.update((id(loop.invert_update), id(loop.denoise_update)) for loop in backend.engine._loops.values())
    assert list(backend.engine._loops) == [tuple(backend.schedule(4).timesteps), tuple(backend.schedule(2).timesteps)]
    # each torch.compile registers a backend that torch keeps for the process's life: a rebuilt loop reuses them
    assert len(updates) == 1


def test_compiled_engine_from_another_torch_is_refused(compiled_zero, keyfile, tmp_path):
    engine = shutil.copytree(compiled_zero, tmp_path / "engine")
    edit_manifest(engine, lambda manifest: manifest["compiled"].update(torch="1.0.0"))
    result = anonymize_with_engine(engine, tmp_path, keyfile)
    assert result.returncode == 2 and "tied to their torch version" in result.stderr
    # strict fp32 builds eager kernels by default, so the hint must name the compiler this engine used
    assert "revanon-rt build" in result.stderr and " --compiler aot " in result.stderr


def test_an_engine_of_an_unknown_compiler_is_refused_with_how_to_rebuild(compiled_zero, tmp_path):
    """A manifest from a later revanon-rt may name a compiler this one lacks: not run as some other engine."""
    from revanon_rt.engines import open_engine
    from revanon_rt.errors import UsageError

    engine = shutil.copytree(compiled_zero, tmp_path / "engine")
    edit_manifest(engine, lambda manifest: manifest["compiled"].update(compiler="future"))
    with pytest.raises(UsageError, match=r"engine: compiler 'future'.*revanon-rt build"):
        open_engine(engine)


def test_onnxruntime_refuses_fast_precisions_and_a_compiler(models, tmp_path):
    result = cli("build", "--model", models["zero"], "--out", tmp_path / "e", "--precision", "fp16")
    assert result.returncode == 2 and "builds fp32, not fp16" in result.stderr
    for compiler in ("aot", "jit", "eager"):
        result = cli("build", "--model", models["zero"], "--out", tmp_path / "e", "--compiler", compiler)
        assert result.returncode == 2 and f"--compiler {compiler} is for --backend compiled" in result.stderr
    assert not (tmp_path / "e").exists()


def test_a_package_this_torch_cannot_load_fails_the_build_with_its_reason(tmp_path):
    """A CUDA build loads one package in a child process first, so that a loader crash (torch 2.11+cu130's)
    ends in a message naming --compiler jit rather than a silent segfault of the build. CI has no CUDA, so
    the check itself is what runs here."""
    from revanon_rt.engines.compiled import CompiledEngine
    from revanon_rt.errors import UsageError

    package = tmp_path / "unet.pt2"
    package.write_bytes(b"not a zip archive")
    with pytest.raises(UsageError, match="could not load the AOTInductor package"):
        CompiledEngine.check_loadable(package)


def test_the_gpu_benchmark_script_runs_end_to_end_on_a_cpu(tmp_path):
    """bench/gpu.py gets a short GPU window now and then; a script that broke meanwhile would waste it.
    Its --tiny CPU mode runs every kind of stage: peaks, FLOP count, eager loop, compiled build, profile, verify.
    The engines are --compiler eager, as in the window's first call: the script's path is the same for every
    compiler, and an Inductor compile would cost this suite two minutes (other tests build aot and jit)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--out", str(tmp_path / "out"),
                             "--work", str(tmp_path / "work"), "--tiny", "--device", "cpu", "--only", "eager,fp32-b1",
                             "--steps", "2", "--replays", "2", "--compiler", "eager"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "out" / "gpu-results.jsonl").read_text().splitlines()]
    stages = [r["stage"] for r in records]
    assert "error" not in stages, [r for r in records if r["stage"] == "error"]
    for stage in ("machine", "peaks", "flops", "eager", "compiled", "profile", "verify"):
        assert stage in stages, (stage, stages)
    peaks = next(r for r in records if r["stage"] == "peaks")
    assert peaks["conv3x3_as_gemm_fp32_tflops"] > 0 and peaks["conv3x3_as_gemm_rel_error"] < 1e-5
    flops = next(r for r in records if r["stage"] == "flops")
    assert set(flops["gflop_per_call"]) == {"unet", "encoder", "decoder", "parser"}
    assert flops["gflop_per_anonymization"] == pytest.approx(
        4 * flops["gflop_per_call"]["unet"] + sum(flops["gflop_per_call"][g] for g in ("encoder", "decoder", "parser")))
    assert next(r for r in records if r["stage"] == "verify")["passed"]
    table = (tmp_path / "out" / "gpu-results.md").read_text()
    assert "| compiled fp32 eager, batch 1 |" in table and "| diffusers eager fp32, batch 1 |" in table

    # a window runs one configuration per command: the next commands reuse the peaks, the FLOP count and an
    # engine of the same settings from --work instead of paying for them again
    def next_call(out, *flags):
        run = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--out", str(tmp_path / out),
                              "--work", str(tmp_path / "work"), "--tiny", "--device", "cpu", "--only", "fp32-b1",
                              "--steps", "2", "--no-verify", "--compiler", "eager", *flags],
                             capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stderr[-3000:]
        records = [json.loads(line) for line in (tmp_path / out / "gpu-results.jsonl").read_text().splitlines()]
        assert [r["stage"] for r in records].count("verify") == 0 and "error" not in [r["stage"] for r in records]
        assert next(r for r in records if r["stage"] == "flops")["gflop_per_call"] == flops["gflop_per_call"]
        return next(r for r in records if r["stage"] == "compiled")

    assert not next(r for r in records if r["stage"] == "compiled")["engine_reused"]
    # an eager (or jit) engine compiles nothing ahead, so any settings find it again (the AOT rule that does not:
    # test_an_aot_engine_built_under_other_inductor_settings_is_another_engine), and its row names them
    tuned = next_call("out2", "--inductor-config", "force_layout_optimization=True")
    assert tuned["engine_reused"] and tuned["inductor_overrides"] == {"force_layout_optimization": True}
    merged = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--out", str(tmp_path / "merged"),
                             "--merge", *(str(tmp_path / out / "gpu-results.jsonl") for out in ("out", "out2"))],
                            capture_output=True, text=True)
    assert merged.returncode == 0, merged.stderr
    table = (tmp_path / "merged" / "gpu-results.md").read_text()
    assert table.count("| compiled fp32 eager, batch 1 |") == 1 and table.count("Measured peaks") == 1
    assert "| compiled fp32 eager [force_layout_optimization=True], batch 1 |" in table


def test_update_kernels_ask_for_eager_numerics_and_the_reference_stays_strict_beside_tf32():
    """Triton would contract FMAs and divide approximately in the fused update; the options that stop it
    are looked up by name, so a torch that renamed them would silently lose them without this test."""
    import torch

    from revanon_rt.engines.compiled import apply_precision, eager_numerics_options
    from revanon_rt.reference import tf32_off

    assert eager_numerics_options() == {"emulate_precision_casts": True, "eager_numerics.division_rounding": True,
                                        "eager_numerics.disable_ftz": True}
    try:
        apply_precision("tf32")  # what opening a tf32 engine does to the process
        with tf32_off():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.backends.cuda.matmul.allow_tf32, "the engine's own setting is restored"
    finally:
        apply_precision("fp32")


def test_tf32_is_switched_by_one_caller_at_a_time():
    """TF32 is one switch for the process: a tf32 engine and the strict reference in two threads (two
    Anonymizers, two locks) must not run under each other's setting, nor leave it set."""
    import threading

    import torch

    from revanon_rt.reference import tf32_mode

    before = torch.backends.cuda.matmul.allow_tf32
    inside, release, seen = threading.Event(), threading.Event(), []

    def tf32_caller():
        with tf32_mode(True):
            inside.set()
            release.wait(30)

    def strict_caller():
        with tf32_mode(False):
            seen.append(torch.backends.cuda.matmul.allow_tf32)

    first = threading.Thread(target=tf32_caller)
    first.start()
    assert inside.wait(30)
    second = threading.Thread(target=strict_caller)
    second.start()
    second.join(0.5)
    waited = second.is_alive()
    release.set()
    first.join(30)
    second.join(30)
    assert waited, "the strict caller waits for the tf32 one to finish"
    assert seen == [False] and torch.backends.cuda.matmul.allow_tf32 == before


def test_threads_sharing_an_anonymizer_take_turns_on_the_fused_loops_buffers(compiled_zero, keyfile, other_keyfile):
    """The compiled engine's fused loop runs on fixed buffers: threads of a service that share one
    Anonymizer, or the same model under another user's key (with_key), must not write their faces into
    each other's."""
    from concurrent.futures import ThreadPoolExecutor

    from revanon_rt.api import Anonymizer
    from revanon_rt.errors import AuthError

    anonymizer = Anonymizer(engine=compiled_zero, key_file=keyfile, masker=None, steps=20)
    other_user = anonymizer.with_key(key_file=other_keyfile)
    assert other_user.backend is anonymizer.backend, "one model in memory for both keys"
    crops = [random_image(32, seed=80 + i) for i in range(6)]
    users = [anonymizer, other_user] * 3

    def round_trip(crop, user):
        anonymized = user.anonymize(crop, mask=box_mask(32))
        return anonymized, user.deanonymize(anonymized.png_bytes()).image.rgb

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(round_trip, crops, users))
    inside = box_mask(32) > 0
    for crop, user, (anonymized, recovered) in zip(crops, users, results):
        assert np.array_equal(anonymized.image.rgb[~inside], crop[~inside])
        assert np.array_equal(recovered, crop)
        stranger = other_user if user is anonymizer else anonymizer
        with pytest.raises(AuthError):
            stranger.deanonymize(anonymized.png_bytes())


def test_an_aot_engine_built_under_other_inductor_settings_is_another_engine(tmp_path):
    """A GPU window's experiments reuse engines between calls; an AOT engine holds Inductor's output, so
    --inductor-config must not find one compiled without it (and then label its row with the setting)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "bench" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    plain = gpu.engine_folder(tmp_path, "fp32-b8", "aot", {})
    tuned = gpu.engine_folder(tmp_path, "fp32-b8", "aot", {"force_layout_optimization": True})
    assert plain.name == "engine-fp32-b8-aot" and tuned.name.startswith("engine-fp32-b8-aot-") and tuned != plain
    assert tuned == gpu.engine_folder(tmp_path, "fp32-b8", "aot", {"force_layout_optimization": True})
    # a jit engine compiles when it loads, under the loading run's settings: the same folder serves
    assert gpu.engine_folder(tmp_path, "fp32-b8", "jit", {"force_layout_optimization": True}) == \
        gpu.engine_folder(tmp_path, "fp32-b8", "jit", {})
    # each compiler is its own engine, and an AOT row is the plain one in the table
    assert len({gpu.engine_folder(tmp_path, "fp32-b8", c, {}) for c in ("aot", "jit", "eager")}) == 3
    row = {"stage": "compiled", "precision": "fp32", "batch": 8, "compiler": "aot", "seconds_per_batch": 1.0,
           "seconds_per_face": 0.125, "faces_per_second": 8.0, "fraction_of_fp32_floor": 0.5}
    table = gpu.markdown([row, {**row, "compiler": "jit"}])
    assert "| compiled fp32, batch 8 |" in table and "| compiled fp32 jit, batch 8 |" in table
    # a row run under a cap on cuDNN's workspace is another configuration, and says so, with its memory by model
    capped = {**row, "config": "fp32-b8", "compiler": "eager", "cudnn_workspace_cap_mib": "1024",
              "peak_memory_gib_by_model": {"unet": 1.5, "decoder": 30.25}}
    table = gpu.markdown([row, capped])
    assert "| compiled fp32 eager [cuDNN workspace ≤ 1024 MiB], batch 8 |" in table
    assert "- fp32-b8 eager: unet 1.50, decoder 30.25" in table


def test_a_tf32_engine_runs_its_parser_with_tf32_off(models, bisenet_pth, tmp_path):
    """TF32 is one process-wide switch, which a tf32 engine turns on for its UNet; the parser's mask is stored,
    so its calls must see TF32 off. Hooks on the loaded graphs note the switches each call runs under."""
    import torch

    from revanon_rt.engines import open_engine
    from revanon_rt.reference import tf32_mode

    engine = tmp_path / "tf32"
    built = cli("build", "--backend", "compiled", "--compiler", "eager", "--precision", "tf32", "--model",
                models["zero"], "--parser", bisenet_pth, "--out", engine, "--device", "cpu")
    assert built.returncode == 0, built.stderr
    seen = {}

    def note(graph):
        def hook(module, args):
            seen[graph] = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                           torch.get_float32_matmul_precision())
        return hook

    with tf32_mode(False):  # loading the engine turns TF32 on for the whole process; put it back afterwards
        backend = open_engine(engine)
        for graph, runner in backend.engine.runners.items():
            runner.register_forward_pre_hook(note(graph))
        backend.eps(np.zeros((1, *backend.latent_shape), np.float32), 500)
        backend.parse(np.full((1, *backend.engine.manifest.graphs["parser"]["inputs"][0]["shape"][1:]), 0.5,
                              np.float32))
    assert seen == {"unet": (True, True, "high"), "parser": (False, False, "highest")}
