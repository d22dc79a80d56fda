"""GPU benchmark and exactness run (issue 4), in one script that writes each result as it goes,
so that a short GPU window still yields numbers.

On the GPU machine (see bench/gpu_prepare.sh for the wheels and configs to carry):

    python bench/gpu.py --out $OUT --only peaks,flops,eager  # one 10-minute command each (bench/GPU.md)
    python bench/gpu.py --out $OUT --only fp32-b1
    python bench/gpu.py --out /tmp/x --tiny --device cpu      # a smoke test of the script on a CPU

Stages: machine facts; measured fp32/tf32/fp16 peaks; the FLOPs of one anonymization, counted on
the engines' own modules (bench/flop_count.py); the diffusers-style eager loop (fp32, TF32 off); then
one compiled engine per (precision, batch) with latency or throughput, peak memory, the fraction of
the FLOP floor and a profile of one UNet call, and for batch-1 engines (or all, with --verify-all)
a verify run (run-to-run over 20 replays, against eager, cross-backend recovery).

A real-size engine takes minutes to build and a 10-minute command holds about one configuration, so
--work keeps what later commands reuse while the machine stays warm: the models, the measured peaks
and FLOPs (facts.json) and the built engines. Results: gpu-results.jsonl and gpu-results.md in --out;
--merge makes one table of several commands' results, eager rows included.

torch 2.11+cu130 on the H100 machine segfaults loading any AOTInductor CUDA package; --compiler jit
builds engines that compile with torch.compile when they load, and runs there. --compiler eager builds
engines that run PyTorch's own kernels in the same CUDA graphs: what exactness against eager costs.
"""

from __future__ import annotations

import argparse
import ast
import gc
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
# PyTorch's cap, in MiB, on the workspace of the cuDNN convolution algorithms it may pick; a row run under it
# is labelled, since the cap changes the algorithms and so the speed and memory
CUDNN_WORKSPACE_CAP = "CUDNN_CONV_WSCAP_DBG"
CONFIGS = [  # (name, precision, batch, what it answers)
    ("fp32-b1", "fp32", 1, "strict fp32 latency, speed-up over eager"),
    ("fp32-b8", "fp32", 8, "strict fp32 throughput: the 70%-of-peak target"),
    ("tf32-b8", "tf32", 8, "tf32 throughput: the 0.1 s/face target"),
    ("fp16-b16", "fp16", 16, "fp16 throughput: the 10 faces/s target"),
    ("tf32-b1", "tf32", 1, "tf32 latency"),
    ("fp16-b1", "fp16", 1, "fp16 latency"),
    ("bf16-b16", "bf16", 16, "bf16 throughput"),
    ("fp32-b16", "fp32", 16, "strict fp32 at batch 16"),
]


class Recorder:
    def __init__(self, out: Path):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "gpu-results.jsonl"
        self.records: list[dict] = []

    def __call__(self, stage: str, **data) -> None:
        record = {"stage": stage, "time": time.strftime("%H:%M:%S"), **data}
        self.records.append(record)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


def sync_time(fn, repeats: int, warmup: int = 1) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine(device: str) -> dict:
    import torch

    facts = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device}
    if device == "cuda":
        facts["gpu"] = torch.cuda.get_device_name()
        try:
            facts["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                             capture_output=True, text=True).stdout.strip()
        except OSError:
            pass
    try:
        import triton

        facts["triton"] = triton.__version__
    except ImportError:
        pass
    return facts


def peaks(device: str) -> dict:
    """Measured matmul and conv throughput: the denominator of 'fraction of the FLOP floor'."""
    import torch

    from revanon_rt.engines.compiled import apply_precision

    out = {}
    n = 8192 if device == "cuda" else 256  # a CPU run is a smoke test, and CPU fp16 matmuls crawl (1 GFLOP/s)
    for precision, dtype in (("fp32", torch.float32), ("tf32", torch.float32), ("fp16", torch.float16),
                             ("bf16", torch.bfloat16)):
        apply_precision(precision)
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        out[f"matmul_{precision}_tflops"] = 2 * n**3 / sync_time(lambda: a @ b, 10, 3) / 1e12
    apply_precision("fp32")
    conv = torch.nn.Conv2d(224, 224, 3, padding=1).to(device).eval()
    x = torch.randn(8 if device == "cuda" else 1, 224, 64, 64, device=device)
    with torch.inference_mode():
        t = sync_time(lambda: conv(x), 10, 3)
    conv_flop = 2 * x.shape[0] * 64 * 64 * 224 * 224 * 9
    out["conv3x3_fp32_tflops"] = conv_flop / t / 1e12
    out["fp32_peak_tflops"] = max(out["matmul_fp32_tflops"], out["conv3x3_fp32_tflops"])
    # The H100 ran this conv at half its fp32 matmul rate, which caps strict fp32 below the 70%-of-peak target
    # whatever the loop does; the same conv as im2col + GEMM says whether routing convs through cuBLAS could lift it
    # (on the H200 it was slower than cuDNN, so the engines keep native convs).
    weight_matrix = conv.weight.reshape(224, -1)

    def conv_as_gemm():
        return (weight_matrix @ torch.nn.functional.unfold(x, 3, padding=1)).add_(conv.bias[:, None])

    with torch.inference_mode():
        t = sync_time(conv_as_gemm, 10, 3)
        reference, gemm = conv(x).flatten(2), conv_as_gemm()
    out["conv3x3_as_gemm_fp32_tflops"] = conv_flop / t / 1e12
    out["conv3x3_as_gemm_rel_error"] = float((gemm - reference).norm() / reference.norm())
    return out


def build_models(work: Path, tiny: bool, configs: Path) -> tuple[Path, Path | None]:
    from revanon_rt import tiny as builders

    model = work / ("tiny-ldm" if tiny else "compvis-random")
    if not (model / "unet").is_dir():
        if tiny:
            builders.save_tiny_ldm(model)
        else:
            builders.save_compvis_architecture(model, configs)
    parser = work / "bisenet-random.pth"
    if not parser.exists():
        try:
            builders.save_random_bisenet(parser)
        except Exception as exc:  # facexlib absent: the parser is left out and the record says so
            print(f"no parser: {exc}", flush=True)
            return model, None
    return model, parser


def diffusers_eager(model: Path, parser: Path | None, device: str, batch: int, steps: int) -> dict:
    """The loop a user would write with diffusers' schedulers, fp32, TF32 off, no graphs."""
    import torch
    from diffusers import DDIMInverseScheduler, DDIMScheduler, UNet2DModel, VQModel

    from revanon_rt.engines.compiled import apply_precision
    from revanon_rt.reference import load_bisenet

    apply_precision("fp32")
    unet = UNet2DModel.from_pretrained(model, subfolder="unet").to(device).eval()
    vq = VQModel.from_pretrained(model, subfolder="vqvae").to(device).eval()
    bisenet = load_bisenet(parser).to(device) if parser else None
    config = {k: v for k, v in json.loads((model / "scheduler" / "scheduler_config.json").read_text()).items()
              if not k.startswith("_")}
    forward = DDIMScheduler.from_config(config)
    inverse = DDIMInverseScheduler.from_config(config)
    forward.set_timesteps(steps)
    inverse.set_timesteps(steps)
    size = vq.config.sample_size
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    mask = torch.zeros(batch, 1, unet.config.sample_size, unet.config.sample_size, device=device)
    mask[..., 8:-8, 8:-8] = 1
    signs = torch.where(torch.rand_like(torch.zeros(batch, 3, *mask.shape[2:], device=device)) < 0.5, -1.0, 1.0)

    def anonymize():
        with torch.inference_mode():
            if bisenet is not None:
                bisenet(torch.nn.functional.interpolate((x + 1) / 2, size=(512, 512), mode="bilinear"))[0].argmax(1)
            z = vq.encode(x).latents
            kept = [z]
            for t in inverse.timesteps:
                z = inverse.step(unet(z, t).sample, t, z).prev_sample
                kept.append(z)
            z = mask * signs * z + (1 - mask) * z
            for i, t in enumerate(forward.timesteps):
                z = forward.step(unet(z, t).sample, t, z).prev_sample
                z = mask * z + (1 - mask) * kept[steps - 1 - i]
            vq.decode(z)

    seconds = sync_time(anonymize, 3 if batch == 1 else 2)
    return {"batch": batch, "seconds_per_call": seconds, "seconds_per_face": seconds / batch,
            "faces_per_second": batch / seconds}


def flop_stage(model, parser, device, steps) -> dict:
    """GFLOP of one anonymization, counted on the modules the engines are built from."""
    from flop_count import count_gflop, per_anonymization

    from revanon_rt.reference import TorchReference

    gflop = count_gflop(TorchReference(model, device=device, parser=parser))
    return {"gflop_per_call": gflop, "gflop_per_anonymization": per_anonymization(gflop, steps)}


def engine_folder(work: Path, name: str, compiler: str, inductor_overrides: dict) -> Path:
    """Where a configuration's engine is kept between calls. An AOT engine holds what Inductor compiled, so one
    built under other --inductor-config settings is another engine; a jit or eager engine compiles when it
    loads, under the settings of the run that loads it, and is the same engine whatever they are."""
    settings = ",".join(f"{k}={v}" for k, v in sorted(inductor_overrides.items())) if compiler == "aot" else ""
    suffix = f"-{hashlib.sha256(settings.encode()).hexdigest()[:8]}" if settings else ""
    return Path(work) / f"engine-{name}-{compiler}{suffix}"


def compiled_stage(name, precision, batch, model, parser, device, work, steps, rec, peak_tflops, gflop_per_face,
                   compiler, inductor_overrides):
    import torch

    from revanon_rt.engines import engine_class, open_engine
    from revanon_rt.errors import RevanonError
    from revanon_rt.export.build import build_engine
    from revanon_rt.keys import flip_pattern
    from revanon_rt.pixels import to_model

    engine_dir = engine_folder(work, name, compiler, inductor_overrides)
    backend, build_s = None, None
    if (engine_dir / "engine.json").exists():  # built by an earlier command on this warm machine
        try:
            backend = open_engine(engine_dir, device=device)
        except RevanonError as exc:
            print(f"rebuilding {engine_dir}: {exc}", flush=True)
    if backend is None:
        start = time.perf_counter()
        chosen = engine_class("compiled", compiler=compiler)
        build_engine(chosen, model, engine_dir, parser=parser,
                     batch=batch, overwrite=True, device=device, precision=precision,
                     log=lambda m: print(m, flush=True))
        build_s = time.perf_counter() - start
        backend = open_engine(engine_dir, device=device)
    schedule = backend.schedule(steps)
    c, h, w = backend.latent_shape
    rng = np.random.default_rng(0)
    rgb = (rng.random((batch, backend.image_size, backend.image_size, 3)) * 255).astype(np.uint8)
    x = to_model(rgb)
    mask = np.zeros((batch, 1, h, w), np.float32)
    mask[..., h // 8: -h // 8, w // 8: -w // 8] = 1
    pattern = np.stack([flip_pattern(bytes(32), bytes([i]) * 16, (c, h, w)) for i in range(batch)])
    from revanon_rt.masks import BiSeNetMasker

    masker = BiSeNetMasker(backend) if backend.can_parse else None

    def one_batch():
        if masker is not None:
            masker.face_maps(rgb, [None] * batch)
        backend.fused_transform(x, mask, pattern, schedule)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = sync_time(one_batch, 5, warmup=2)
    floor = gflop_per_face * 1e9 / (peak_tflops * 1e12)
    result = {"config": name, "precision": precision, "batch": batch, "compiler": compiler,
              "inductor_overrides": inductor_overrides, "build_seconds": build_s,
              "engine_reused": build_s is None,
              "cudnn_workspace_cap_mib": os.environ.get(CUDNN_WORKSPACE_CAP),
              "seconds_per_batch": seconds, "seconds_per_face": seconds / batch, "faces_per_second": batch / seconds,
              "flop_floor_seconds_per_face": floor, "fraction_of_fp32_floor": floor / (seconds / batch),
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}
    if device == "cuda":
        try:
            result["peak_memory_gib_by_model"] = peak_memory_by_model(backend, x, rgb)
        except Exception as exc:  # a diagnosis: the timed row must be kept whatever it meets
            result["peak_memory_gib_by_model_error"] = repr(exc)[:500]
    rec("compiled", **result)
    return backend


def peak_memory_by_model(backend, x: np.ndarray, rgb: np.ndarray) -> dict:
    """Each model called alone at the engine's batch, outside the CUDA graph: whether one of them (cuDNN's
    workspace for its convolutions, say) or the graph's own memory pool holds the whole run's peak."""
    import torch

    from revanon_rt.pixels import to_unit

    z = np.zeros((backend.batch, *backend.latent_shape), np.float32)
    calls = {"encoder": lambda: backend.encode(x), "unet": lambda: backend.eps(z, 500),
             "decoder": lambda: backend.decode(z)}
    if backend.can_parse:
        calls["parser"] = lambda: backend.parse(to_unit(rgb))
    peaks = {}
    for model, call in calls.items():
        free_device_memory()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        peaks[model] = (torch.cuda.max_memory_allocated() - before) / 2**30
    return peaks


def verify_stage(name, precision, backend, model, parser, device, steps, replays, rec) -> None:
    """The issue's strict-fp32 thresholds for every precision: for tf32, fp16 and bf16 the figures show
    what the fast mode costs, and their pass/fail is not a verdict."""
    from revanon_rt.reference import TorchReference
    from revanon_rt.verify import Thresholds, run_verify

    reference = TorchReference(model, device=device, parser=parser)
    report = run_verify(reference, backend, None, steps, Thresholds(max_latent_rel_err=1e-5, min_identical_pixels=0.999),
                        log=lambda m: print(m, flush=True), replays=replays)
    rec("verify", config=name, precision=precision, passed=report["passed"], checks=report["checks"],
        stages=report["stages"])


def profile_stage(name, backend, device, rec) -> None:
    """Where the time of one UNet call goes, by kernel."""
    from torch.profiler import ProfilerActivity, profile

    c, h, w = backend.latent_shape
    z = np.random.default_rng(1).standard_normal((backend.batch, c, h, w)).astype(np.float32)
    backend.eps(z, 500)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        backend.eps(z, 500)
    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key.replace("_total", "_total"), row_limit=15)
    rec("profile", config=name, table=table)


def markdown(records: list[dict]) -> str:
    lines = ["# GPU results", ""]
    for r in records:
        if r["stage"] == "machine":
            lines.append(f"{r.get('gpu', r['device'])}, driver {r.get('driver')}, torch {r['torch']}, "
                         f"CUDA {r.get('cuda')}, triton {r.get('triton')}.")
        if r["stage"] == "peaks":
            lines += ["", "Measured peaks (TFLOP/s): " + ", ".join(f"{k} {v:.1f}" for k, v in r.items()
                                                                    if k.endswith("tflops"))]
            if "conv3x3_as_gemm_rel_error" in r:
                lines[-1] += (f"; the conv as im2col + GEMM differs from the conv by "
                              f"{r['conv3x3_as_gemm_rel_error']:.1e} (relative L2)")
        if r["stage"] == "flops":
            lines += ["", "FLOPs per call (GFLOP, FlopCounterMode): " + ", ".join(
                f"{k} {v:.1f}" for k, v in r["gflop_per_call"].items())
                + f"; one anonymization {r['gflop_per_anonymization']:.0f} GFLOP, the floor's numerator."]
    lines += ["", "| configuration | s/batch | s/face | faces/s | % of fp32 floor | per-face speed-up vs eager | "
                  "peak GiB |", "|---|---:|---:|---:|---:|---:|---:|"]
    # eager per face at each batch it ran; a compiled row compares with the largest eager batch not above its own
    eager = {r["batch"]: r["seconds_per_face"] for r in records if r["stage"] == "eager"}
    for r in records:
        if r["stage"] == "eager":
            lines.append(f"| diffusers eager fp32, batch {r['batch']} | {r['seconds_per_call']:.3f} | "
                         f"{r['seconds_per_face']:.3f} | {r['faces_per_second']:.2f} | | 1.00× | |")
        if r["stage"] == "compiled":
            below = [b for b in eager if b <= r["batch"]]
            speed = f"{eager[max(below)] / r['seconds_per_face']:.2f}× (eager b{max(below)})" if below else ""
            mem = f"{r['peak_memory_gib']:.1f}" if r.get("peak_memory_gib") else ""
            variant = f" {r['compiler']}" if r.get("compiler", "aot") != "aot" else ""
            variant += "".join(f" [{k}={v}]" for k, v in r.get("inductor_overrides", {}).items())
            if r.get("cudnn_workspace_cap_mib"):
                variant += f" [cuDNN workspace ≤ {r['cudnn_workspace_cap_mib']} MiB]"
            lines.append(f"| compiled {r['precision']}{variant}, batch {r['batch']} | {r['seconds_per_batch']:.3f} | "
                         f"{r['seconds_per_face']:.3f} | {r['faces_per_second']:.2f} | "
                         f"{100 * r['fraction_of_fp32_floor']:.0f}% | {speed} | {mem} |")
    by_model = [r for r in records if r["stage"] == "compiled" and r.get("peak_memory_gib_by_model")]
    if by_model:
        lines += ["", "Peak GiB of each model called alone at the engine's batch, outside the CUDA graph, above what "
                      "the engine already held:", ""]
        lines += [f"- {r['config']} {r['compiler']}: " + ", ".join(f"{m} {g:.2f}" for m, g in
                                                                 r["peak_memory_gib_by_model"].items())
                  for r in by_model]
    for r in records:
        if r["stage"] == "verify":
            verdict = ("passed" if r["passed"] else "FAILED") if r.get("precision", "fp32") == "fp32" else \
                "measured against the strict-fp32 thresholds, which a fast precision is not held to"
            lines += ["", f"verify {r['config']}: {verdict}", ""]
            lines += [f"- {k}: {v['value']} (needs {v['threshold']})" for k, v in r["checks"].items()]
        if r["stage"] == "error":
            lines += ["", f"error in {r['config']}: {r['error']}"]
        if r["stage"] == "profile":
            lines += ["", f"Profile of one UNet call ({r['config']}):", "", "```", r["table"], "```"]
    return "\n".join(lines) + "\n"


class Facts:
    """What later commands on a warm machine reuse: peaks and FLOPs."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str, compute):
        if key not in self.data:
            self.data[key] = compute()
            self.path.write_text(json.dumps(self.data, indent=1))
        return self.data[key]


def free_device_memory() -> None:
    """So that the next configuration's peak memory counts only its own buffers."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def merge(paths: list[Path], out: Path) -> None:
    """One table from the JSONL of several commands (a window runs one configuration per command), all from one
    kind of GPU: the table keeps one machine line and one set of peaks, and compares each row with its eager rows."""
    records, seen, cards = [], set(), {}
    for path in paths:
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["stage"] == "machine":
                cards[str(path)] = record.get("gpu", record["device"])
            if record["stage"] in ("machine", "models", "peaks", "flops"):
                if record["stage"] in seen:
                    continue
                seen.add(record["stage"])
            records.append(record)
    if len(set(cards.values())) > 1:
        raise SystemExit("these results come from different GPUs (" + "; ".join(f"{p}: {c}" for p, c in cards.items())
                         + "): merge each GPU's into a folder of its own, such as bench/results/gpu-h200, with its "
                           "own eager rows and peaks")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "gpu-results.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    (out / "gpu-results.md").write_text(markdown(records))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/revanon-gpu"))
    parser.add_argument("--configs", type=Path, default=HERE.parent.parent / "shared" / "spec" / "compvis-ldm-celebahq-256")
    parser.add_argument("--only", default="", help="comma-separated stages: peaks, flops, eager, and config names "
                        f"({', '.join(c[0] for c in CONFIGS)}); default all, in that order")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models: a smoke test of this script")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--verify-all", action="store_true", help="verify every configuration, not only batch 1")
    parser.add_argument("--no-verify", action="store_true")
    parser.add_argument("--compiler", choices=("aot", "jit", "eager"), default="aot",
                        help="jit where this torch crashes loading AOTInductor packages (torch 2.11+cu130 does); "
                             "eager for PyTorch's own kernels in the CUDA graphs, bit for bit eager's numbers")
    parser.add_argument("--inductor-config", action="append", default=[], metavar="KEY=VALUE",
                        help="an Inductor setting for what this run compiles (jit engines, and the aot engines it "
                             "builds), e.g. force_layout_optimization=True: an experiment, labelled in the table")
    parser.add_argument("--merge", type=Path, nargs="+", help="gpu-results.jsonl files of several commands: "
                        "write one table of them to --out, and run nothing")
    args = parser.parse_args()
    if args.merge:
        return merge(args.merge, args.out)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    overrides = {}
    for setting in args.inductor_config:
        key, _, value = setting.partition("=")
        overrides[key] = ast.literal_eval(value)
    if overrides:
        import torch._inductor.config

        torch._inductor.config.patch(overrides).__enter__()  # for the whole run: never exited
    only = set(filter(None, args.only.split(",")))
    unknown = only - {"peaks", "flops", "eager"} - {c[0] for c in CONFIGS}
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}")
    wanted = lambda stage: not only or stage in only  # noqa: E731
    rec = Recorder(args.out)
    args.work.mkdir(parents=True, exist_ok=True)
    facts = Facts(args.work / ("facts-tiny.json" if args.tiny else "facts.json"))
    results_md = args.out / "gpu-results.md"

    def stage(name: str, fn):
        """Record a failure and go on: a short window should still yield the other rows."""
        try:
            return fn()
        except Exception as exc:
            rec("error", config=name, error=f"{type(exc).__name__}: {exc}")
            return None
        finally:
            results_md.write_text(markdown(rec.records))

    rec("machine", **machine(args.device))
    model, bisenet = build_models(args.work, args.tiny, args.configs)
    rec("models", model=str(model), parser=str(bisenet) if bisenet else None)
    if wanted("peaks"):
        facts.data.pop("peaks", None)  # asked for: measure again
    peak = stage("peaks", lambda: facts.get("peaks", lambda: peaks(args.device)))
    if peak:
        rec("peaks", **peak)
    flops_key = f"flops_{args.steps}_steps"
    if wanted("flops"):
        facts.data.pop(flops_key, None)
    gflop = stage("flops", lambda: facts.get(flops_key, lambda: flop_stage(model, bisenet, args.device, args.steps)))
    if gflop:
        rec("flops", **gflop)
    if wanted("eager"):
        for batch in (1, 8):
            result = stage("eager", lambda: diffusers_eager(model, bisenet, args.device, batch, args.steps))
            if result:
                rec("eager", **result)
            free_device_memory()
    for name, precision, batch, _why in CONFIGS:
        if not wanted(name):
            continue
        if not (peak and gflop):
            rec("error", config=name, error="no peak or FLOP count to compare with")
            continue
        backend = stage(name, lambda: compiled_stage(
            name, precision, batch, model, bisenet, args.device, args.work, args.steps, rec,
            peak["fp32_peak_tflops"], gflop["gflop_per_anonymization"], args.compiler, overrides))
        if backend is None:
            continue
        if precision == "fp32":
            stage(name, lambda: profile_stage(name, backend, args.device, rec))
        if not args.no_verify and (batch == 1 or args.verify_all):
            stage(name, lambda: verify_stage(name, precision, backend, model, bisenet, args.device, args.steps,
                                             args.replays, rec))
        del backend
        free_device_memory()
    results_md.write_text(markdown(rec.records))


if __name__ == "__main__":
    # after the installed packages: a checkout's revanon_rt/ lacks the engines/ and export/ it installs with
    sys.path.append(str(HERE.parent))
    main()
