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


def stage(*args, env):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture
def script_env(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, DEVICE="cpu", WHEELS="", DATA=str(tmp_path / "data"),
               WORK=str(tmp_path / "work"), SITE=str(tmp_path / "site"))
    return env


def test_train_joins_the_carried_halves_checks_them_and_sends_back_at_most_8_files(script_env, tmp_path):
    data = tmp_path / "data"
    zip_path = crops_zip(tmp_path / "train-128.zip", {f"P{i}/P{i}_0001.png": random_image(32, seed=i) for i in range(6)})
    whole = zip_path.read_bytes()
    for part, chunk in ((1, whole[: len(whole) // 2]), (2, whole[len(whole) // 2:])):
        (data / f"lfw-train-{part}").mkdir(parents=True)
        (data / f"lfw-train-{part}" / f"train-128.zip.part{part}").write_bytes(chunk)
    (data / "lfw-train-1" / "train-128.zip.sha256").write_text(f"{hashlib.sha256(whole).hexdigest()}  train-128.zip\n")
    env = dict(script_env, OUT=str(tmp_path / "out"), MODEL=str(tmp_path / "work" / "models" / "demo-lfw128"),
               TRAIN_ARGS="--architecture tiny --resolution 32 --batch 4 --max-steps 2 --samples 1")
    assert stage("install", env=env).returncode == 0

    second = (data / "lfw-train-2" / "train-128.zip.part2")
    second.rename(tmp_path / "aside")
    missing = stage("train", "1", env=env)
    assert missing.returncode == 2 and "carry .data/lfw-train-2" in missing.stderr

    (tmp_path / "aside").write_bytes(whole[len(whole) // 2: -1] + b"x")
    shutil.move(tmp_path / "aside", second)
    corrupt = stage("train", "1", env=env)
    assert corrupt.returncode == 2 and "does not match its sha256" in corrupt.stderr

    second.write_bytes(whole[len(whole) // 2:])
    trained = stage("train", "1", env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    sent = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(sent) <= 8, sent
    assert (tmp_path / "out" / "demo-lfw128" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    with tarfile.open(tmp_path / "out" / "demo-lfw128" / "training-log.tgz") as logs:
        assert sorted(logs.getnames()) == ["loss.csv", "pieces.jsonl"]


def test_eval_transforms_then_scores_when_the_recognizer_arrives(script_env, models, tmp_path):
    """The transform call carries the 5-point model, the score call the recognizer: the recognizer must not be
    needed to transform, and scoring without it says which folder to carry."""
    data = tmp_path / "data"
    (data / "lfw-dev").mkdir(parents=True)
    for name in ("dev-128.zip", "dev_pairs.txt"):
        os.symlink(SHARED / "data" / "lfw" / name, data / "lfw-dev" / name)
    from revanon_rt.faces import model_path

    for folder, model in (("dlib-5pt", "shape_predictor_5_face_landmarks.dat"),
                          ("dlib-recognizer", "dlib_face_recognition_resnet_model_v1.dat")):
        (data / folder).mkdir()
        os.symlink(model_path(model), data / folder / model)
    (data / "dlib-recognizer").rename(tmp_path / "recognizer-not-yet")
    env = dict(script_env, OUT=str(tmp_path / "out"), MODEL=str(models["pixel"]), EVAL_PAIRS="6", EVAL_CHUNK="3",
               EVAL_BATCH="4", EVAL_ARGS="--steps 5 --candidates 5")
    transformed = stage("eval-transform", env=env)
    assert transformed.returncode == 0, transformed.stderr[-3000:]
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
