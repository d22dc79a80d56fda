"""The README's main job: `revanon-rt demo`."""

import json

import numpy as np
from PIL import Image

from conftest import cli


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_main_job_with_defaults(tmp_path):
    """What the README's one-liner runs: the demo model when one is committed, else a tiny ε ≡ 0 model."""
    from revanon_rt.demo import demo_model

    out = tmp_path / "demo-out"
    run = cli("demo", "--out", out)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    face, anonymized, recovered = (_png(out / f"{n}.png") for n in ("face", "anonymized", "recovered"))
    mask = _png(out / "face_mask.png")[..., 0] > 127
    assert face.shape == anonymized.shape == recovered.shape
    assert np.abs(anonymized[mask].astype(int) - face[mask]).mean() > 10, "the face inside the mask changes"
    if demo_model() is None:
        assert report["face"] == "drawn" and report["recovered_bit_exact"], report
    else:
        assert report["face"].startswith("sampled") and report["psnr_recovered_db"] >= 30, report
    side = face.shape[0]
    scale = max(1, 256 // side)
    assert Image.open(out / "side_by_side.png").size == ((4 * side + 3 * 4) * scale, side * scale)
    again = cli("demo", "--out", out)
    assert again.returncode == 0, again.stderr
    assert np.array_equal(_png(out / "face.png"), face), "the same face on every run"


def test_sampled_face_is_the_models_own_and_masked_by_the_template(models, tmp_path):
    from revanon_rt.demo import template_face_mask

    def demo(folder, seed):
        run = cli("demo", "--out", folder, "--model", models["pixel"], "--face", "sampled", "--seed", seed,
                  "--steps", "4")
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)

    report = demo(tmp_path / "a", 5)
    assert report["face"] == "sampled from the model (seed 5)"
    demo(tmp_path / "b", 5)
    demo(tmp_path / "c", 6)
    face = _png(tmp_path / "a" / "face.png")
    assert np.array_equal(face, _png(tmp_path / "b" / "face.png"))
    assert not np.array_equal(face, _png(tmp_path / "c" / "face.png"))
    mask = _png(tmp_path / "a" / "face_mask.png")[..., 0]
    assert np.array_equal(mask, template_face_mask(face.shape[0]))
    assert 0.2 < (mask > 0).mean() < 0.6


def test_drawn_face_on_the_zero_eps_model_is_bit_exact(models, tmp_path):
    run = cli("demo", "--out", tmp_path / "out", "--model", models["zero"], "--face", "drawn", "--steps", "5")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["face"] == "drawn" and report["recovered_bit_exact"]
    assert report["psnr_anonymized_db"] < 20
