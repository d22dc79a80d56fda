"""bench/gpu_issue5.sh, the script a rare and short GPU window runs for issue 5: a script that broke
meanwhile would waste the window, so its stages run here on the CPU with tiny models, with its data in
the pieces that calls of at most 64 MiB carry."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

from conftest import REPO, SHARED, crops_zip, random_image

SCRIPT = REPO / "bench" / "gpu_issue5.sh"


def stage(*args, env, script=SCRIPT):
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env, timeout=900)


def carry_dlib_models(data):
    """dlib's CC0 models in the folders bench/gpu_prepare.sh makes for the calls that carry them."""
    from revanon_rt.faces import model_path

    for folder, model in (("dlib-5pt", "shape_predictor_5_face_landmarks.dat"),
                          ("dlib-5pt", "mmod_human_face_detector.dat"),
                          ("dlib-recognizer", "dlib_face_recognition_resnet_model_v1.dat")):
        (data / folder).mkdir(parents=True, exist_ok=True)
        os.symlink(model_path(model), data / folder / model)


def carry_train_zip_in_three_parts(data, tmp_path):
    """train-128.zip as bench/gpu_prepare.sh splits it for three calls, here of six 32 px crops."""
    zip_path = crops_zip(tmp_path / "train-128.zip", {f"P{i}/P{i}_0001.png": random_image(32, seed=i) for i in range(6)})
    whole = zip_path.read_bytes()
    cuts = [0, len(whole) // 3, 2 * len(whole) // 3, len(whole)]
    for part in (1, 2, 3):
        (data / f"lfw-train-{part}").mkdir(parents=True)
        (data / f"lfw-train-{part}" / f"train-128.zip.part{part}").write_bytes(whole[cuts[part - 1]:cuts[part]])
    (data / "lfw-train-1" / "train-128.zip.sha256").write_text(f"{hashlib.sha256(whole).hexdigest()}  train-128.zip\n")
    return whole, cuts


@pytest.fixture
def script_env(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, DEVICE="cpu", WHEELS="", DATA=str(tmp_path / "data"),
               WORK=str(tmp_path / "work"), SITE=str(tmp_path / "site"))
    return env


def test_train_joins_the_carried_parts_checks_them_and_sends_back_at_most_8_files(script_env, tmp_path):
    data = tmp_path / "data"
    whole, cuts = carry_train_zip_in_three_parts(data, tmp_path)
    env = dict(script_env, OUT=str(tmp_path / "out"), MODEL=str(tmp_path / "work" / "models" / "demo-lfw128"),
               TRAIN_ARGS="--architecture tiny --resolution 32 --batch 4 --max-steps 2 --samples 1")
    assert stage("install", env=env).returncode == 0

    second = (data / "lfw-train-2" / "train-128.zip.part2")
    second.rename(tmp_path / "aside")
    missing = stage("train", "1", env=env)
    assert missing.returncode == 2 and "carry .data/lfw-train-2" in missing.stderr

    (tmp_path / "aside").write_bytes(whole[cuts[1]:cuts[2] - 1] + b"x")
    shutil.move(tmp_path / "aside", second)
    corrupt = stage("train", "1", env=env)
    assert corrupt.returncode == 2 and "does not match its sha256" in corrupt.stderr

    second.write_bytes(whole[cuts[1]:cuts[2]])
    trained = stage("train", "1", env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    sent = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(sent) <= 8, sent
    assert (tmp_path / "out" / "demo-lfw128" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    with tarfile.open(tmp_path / "out" / "demo-lfw128" / "training-log.tgz") as logs:
        assert sorted(logs.getnames()) == ["loss.csv", "pieces.jsonl"]


def test_train_latent_sends_back_a_model_that_runs_and_resumes_only_its_unet(script_env, tmp_path):
    carry_train_zip_in_three_parts(tmp_path / "data", tmp_path)
    sizes = "--resolution 32"
    env = dict(script_env, OUT=str(tmp_path / "out"),
               AUTOENCODER_ARGS=f"{sizes} --channels 16,16 --batch 2 --max-steps 2",
               TRAIN_ARGS=f"{sizes} --architecture tiny --batch 4 --max-steps 2 --samples 1")
    assert stage("install", env=env).returncode == 0
    trained = stage("train-latent", "1", "1", env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    sent = tmp_path / "out" / "demo-lfw128-latent"
    assert len([p for p in sent.rglob("*") if p.is_file()]) <= 8
    first_autoencoder = (sent / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()

    # the next call's $OUT is a fresh folder on the same warm machine
    resumed = stage("train-latent", "1", "1", "--resume",
                    env=dict(env, OUT=str(tmp_path / "out-2"), TRAIN_ARGS=env["TRAIN_ARGS"].replace("--max-steps 2", "--max-steps 4")))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "autoencoder" not in resumed.stdout.split("training on cpu")[0]
    sent = tmp_path / "out-2" / "demo-lfw128-latent"
    assert (sent / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == first_autoencoder

    model = tmp_path / "model"
    shutil.copytree(sent, model)
    with tarfile.open(model / "model-small-files.tgz") as small:
        small.extractall(model, filter="data")
    for name in ("unet/config.json", "vae/config.json", "scheduler/scheduler_config.json", "autoencoder-loss.csv"):
        assert (model / name).is_file(), name
    card = (model / "README.md").read_text()
    assert "**Training:** 4 steps" in card and "8×16×16 latent" in card
    assert "loss = pixel MSE + (1.0 to step 2, then 10.0) × E(D(z))" in card, card
    assert "AdamW lr 5e-04 to step 2, then 2e-04," in card, card
    demo = subprocess.run([sys.executable, "-m", "revanon_rt", "demo", "--model", str(model), "--device", "cpu",
                           "--steps", "2", "--face", "sampled", "--out", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert (tmp_path / "demo" / "side_by_side.png").is_file()


def test_eval_transforms_then_scores_when_the_recognizer_arrives(script_env, models, tmp_path):
    """The transform call carries the 5-point model, the score call the recognizer: the recognizer must not be
    needed to transform, and scoring without it says which folder to carry."""
    data = tmp_path / "data"
    (data / "lfw-dev").mkdir(parents=True)
    for name in ("dev-128.zip", "dev_pairs.txt"):
        os.symlink(SHARED / "data" / "lfw" / name, data / "lfw-dev" / name)
    carry_dlib_models(data)
    (data / "dlib-recognizer").rename(tmp_path / "recognizer-not-yet")
    env = dict(script_env, OUT=str(tmp_path / "out"), MODEL=str(models["pixel"]), EVAL_PAIRS="6", EVAL_CHUNK="3",
               EVAL_BATCH="4", EVAL_ARGS="--steps 5 --candidates 5")
    # a later window finishing an evaluation starts where the earlier one stopped
    later_part = stage("eval-transform", env=dict(env, EVAL_FIRST="3"))
    assert later_part.returncode == 0, later_part.stderr[-3000:]
    assert [c.name for c in (tmp_path / "work" / "eval").glob("chunk-*")] == ["chunk-00003-00006"]
    transformed = stage("eval-transform", env=env)
    assert transformed.returncode == 0, transformed.stderr[-3000:]
    assert transformed.stdout.count("transforms written") == 1
    early = stage("eval-score", env=env)
    assert early.returncode == 2 and "carry .data/dlib-recognizer" in early.stderr

    (tmp_path / "recognizer-not-yet").rename(data / "dlib-recognizer")
    scored = stage("eval-score", env=env)
    assert scored.returncode == 0, scored.stderr[-3000:]
    out = tmp_path / "out" / "eval"
    assert sorted(p.name for p in out.iterdir()) == ["chunks.tgz", "metrics.json", "metrics.md", "score.log",
                                                    "transform.log"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["chunks"] == ["chunk-00000-00003", "chunk-00003-00006"] and metrics["genuine_pairs"] == 6
    assert metrics["mask_regions"]["outside_byte_identical"] == {"anonymized": 1.0, "recovered": 1.0}
    with tarfile.open(out / "chunks.tgz") as chunks:
        assert sorted(chunks.getnames()) == sorted(f"{c}/{f}" for c in metrics["chunks"]
                                                   for f in ("transform.json", "features.npz"))


def test_photos_stage_measures_the_rest_when_its_example_fails(script_env, models, tmp_path):
    """The photos call's parts are independent: a model whose samples dlib cannot find (the random one here,
    as an undertrained one might be) still has its recovery budget and drift measured and sent back, and the
    stage ends with an error that names the part. Then the photo-recovery call runs. Both run from a copy
    of the checkout, as on the device, since the benchmarks write into its bench/results."""
    checkout = tmp_path / "checkout"
    for folder in ("revanon_rt", "engines", "export", "bench", "docs"):
        shutil.copytree(REPO / folder, checkout / folder, ignore=shutil.ignore_patterns("results", "__pycache__"))
    # committed results of the same model, as the checkout carries the CPU's: none may go back as this call's
    (checkout / "bench" / "results").mkdir()
    for stale in ("inversion-drift-pixel-50.md", "recovery-budget-pixel.md", "photo-recovery-pixel.md"):
        (checkout / "bench" / "results" / stale).write_text("an earlier run\n")
    data = tmp_path / "data"
    for folder, source in (("lfw-dev", SHARED / "data" / "lfw" / "dev-128.zip"),
                           ("lfw-photos", SHARED / "data" / "lfw" / "dev-250-originals.zip")):
        (data / folder).mkdir(parents=True)
        os.symlink(source, data / folder / source.name)
    carry_dlib_models(data)
    out = tmp_path / "out"
    env = dict(script_env, MODEL=str(models["pixel"]), EXAMPLE_ARGS="--tries 2",
               BUDGET_ARGS="--count 2 --steps 2",
               DRIFT_ARGS="--count 2", DRIFT_STEPS="2 3", PHOTOS="1")

    def checkout_stage(*args, out=out):
        """Each call gets an empty $OUT, as on the device."""
        return stage(*args, env=dict(env, OUT=str(out)), script=checkout / "bench" / "gpu_issue5.sh")

    assert checkout_stage("install").returncode == 0
    photos = checkout_stage("photos")
    assert photos.returncode == 1 and "failed: draw_photo_example.py (photos.log)" in photos.stderr, photos.stderr
    results = sorted(p.name for p in (out / "results").iterdir())
    assert results == ["inversion-drift-pixel-2.json", "inversion-drift-pixel-2.md", "inversion-drift-pixel-3.json",
                       "inversion-drift-pixel-3.md", "recovery-budget-pixel.json", "recovery-budget-pixel.md"]
    budget = json.loads((out / "results" / "recovery-budget-pixel.json").read_text())
    assert "an earlier run" not in (out / "results" / "recovery-budget-pixel.md").read_text()
    assert budget["fingerprint"] and "dlib did not find all 3 sampled faces for seeds 3..4" in (out / "photos.log").read_text()

    assert len([p for p in out.rglob("*") if p.is_file()]) <= 8

    recovered = checkout_stage("photo-recovery", out=tmp_path / "out-recovery")
    assert recovered.returncode == 0, recovered.stderr[-3000:]
    sent = sorted(p.name for p in (tmp_path / "out-recovery").rglob("*") if p.is_file())
    assert sent == ["photo-recovery-pixel.json", "photo-recovery-pixel.md"]


def test_gpu_results_of_another_card_are_not_merged_into_a_table(tmp_path):
    """The next window may be an H200's: merged into the H100 table it would sit under the H100's machine line
    and peaks, its speed-ups taken against the H100's eager rows."""
    h100 = REPO / "bench" / "results" / "gpu-h100" / "gpu-results.jsonl"
    h200 = tmp_path / "call1.jsonl"
    h200.write_text("\n".join(json.dumps(r) for r in (
        {"stage": "machine", "torch": "2.11.0+cu130", "cuda": "13.0", "device": "cuda", "gpu": "NVIDIA H200"},
        {"stage": "eager", "batch": 1, "seconds_per_call": 3.1, "seconds_per_face": 3.1, "faces_per_second": 0.32},
    )) + "\n")
    merge = [sys.executable, str(REPO / "bench" / "gpu.py"), "--merge"]
    mixed = subprocess.run([*merge, str(h100), str(h200), "--out", str(tmp_path / "mixed")], capture_output=True,
                           text=True)
    assert mixed.returncode != 0 and "different GPUs" in mixed.stderr and "NVIDIA H200" in mixed.stderr
    assert not (tmp_path / "mixed").exists()
    alone = subprocess.run([*merge, str(h200), "--out", str(tmp_path / "gpu-h200")], capture_output=True, text=True)
    assert alone.returncode == 0, alone.stderr
    table = (tmp_path / "gpu-h200" / "gpu-results.md").read_text()
    assert "NVIDIA H200" in table and "| diffusers eager fp32, batch 1 | 3.100 |" in table
