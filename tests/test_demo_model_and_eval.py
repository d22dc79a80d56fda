"""Issue 5 on CPU: training in resumable pieces, the landmark masker, and the LFW evaluation's plumbing."""

import io
import json
import re
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED, cli, crops_zip, random_image, save_png

LFW = SHARED / "data" / "lfw"


def _lfw_crop(index: int, size: int) -> np.ndarray:
    with zipfile.ZipFile(LFW / "dev-128.zip") as z:
        name = sorted(n for n in z.namelist() if n.endswith(".jpg"))[index]
        im = Image.open(io.BytesIO(z.read(name))).convert("RGB")
    return np.asarray(im.resize((size, size), Image.Resampling.LANCZOS))


def test_train_resume_and_load(tmp_path):
    data = crops_zip(tmp_path / "crops.zip", {f"P{i}/P{i}_0001.jpg": random_image(40, seed=80 + i) for i in range(12)},
                     fmt="JPEG")
    out = tmp_path / "model"
    args = ("train", "--data", data, "--out", out, "--resolution", "32", "--architecture", "tiny", "--batch", "4",
            "--samples", "4", "--device", "cpu")
    first = cli(*args, "--max-steps", "30")
    assert first.returncode == 0, first.stderr
    again = cli(*args, "--max-steps", "30")
    assert again.returncode == 2 and "--resume" in again.stderr, "never overwrite a trained model"
    committed = tmp_path / "committed"  # as a model is committed: without its checkpoint, which cannot resume
    shutil.copytree(out, committed, ignore=shutil.ignore_patterns("checkpoint"))
    refused = cli("train", "--data", data, "--out", committed, *args[5:], "--max-steps", "30")
    assert refused.returncode == 2 and "already holds a model; choose another --out" in refused.stderr, refused.stderr
    changed = cli("train", "--data", data, "--out", out, "--batch", "8", "--resume", "--device", "cpu")
    assert changed.returncode == 2 and "--batch 8: the checkpoint was trained with --batch 4" in changed.stderr
    other = crops_zip(tmp_path / "other.zip", {f"Q{i}/Q{i}_0001.jpg": random_image(40, seed=90 + i) for i in range(12)},
                      fmt="JPEG")
    other_data = cli("train", "--data", other, "--out", out, "--resume", "--device", "cpu", "--max-steps", "40")
    assert other_data.returncode == 2 and "this run was trained on crops.zip" in other_data.stderr, other_data.stderr
    # the same name is not the same data: the checkpoint keeps the zip's sha256
    (tmp_path / "elsewhere").mkdir()
    same_name = cli("train", "--data", shutil.copy(other, tmp_path / "elsewhere" / "crops.zip"), "--out", out,
                    "--resume", "--device", "cpu", "--max-steps", "40")
    assert same_name.returncode == 2 and "this run was trained on crops.zip" in same_name.stderr, same_name.stderr
    # a piece killed after its last checkpoint (step 30) had logged steps the resumed piece trains again
    with open(out / "checkpoint" / "loss.csv", "a") as log:
        log.write("100,0.5,0.0002,9.0\n")
    # no shape flags at all: the checkpoint's, not the command's defaults (128 px, small, batch 64)
    second = cli("train", "--data", data, "--out", out, "--samples", "4", "--device", "cpu",
                 "--max-steps", "60", "--resume", "--lr", "1.5e-4", "--ema-decay", "0.999")
    assert second.returncode == 0 and "resumed at step 30" in second.stderr
    rows = (out / "checkpoint" / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,seconds" and rows[-1].startswith("60,")
    logged = [int(row.split(",")[0]) for row in rows[1:]]
    assert logged == sorted(set(logged)) and 100 not in logged and 30 in logged, logged
    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size < 15_000_000
    header_len = int.from_bytes(weights.read_bytes()[:8], "little")
    header = json.loads(weights.read_bytes()[8:8 + header_len])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}
    for name in ("README.md", "loss.png", "samples.png"):
        assert (out / name).exists(), name
    card = (out / "README.md").read_text()
    assert "derive from `crops.zip`, whose terms govern their use" in card, "the license of the data it was given"
    assert "lr 2e-04 to step 30, then 1.5e-04" in card and "EMA 0.9995 to step 30, then 0.999," in card

    from revanon_rt.reference import TorchReference

    backend = TorchReference(out)
    assert backend.image_size == 32 and backend.latent_shape == (3, 32, 32)
    assert np.isfinite(backend.eps(np.zeros((1, 3, 32, 32), np.float32), 500)).all()


def test_train_starts_only_where_nothing_would_be_lost(tmp_path):
    crops = {f"P{i}/P{i}_0001.jpg": random_image(32, seed=60 + i) for i in range(6)}
    data = crops_zip(tmp_path / "crops.zip", crops, fmt="JPEG")
    with zipfile.ZipFile(data, "a") as archive:  # as a zip made on a Mac carries them
        archive.writestr("__MACOSX/P0/._P0_0001.jpg", b"\x00\x05\x16\x07 resource fork")
        archive.writestr("P1/._P1_0001.jpg", b"\x00\x05\x16\x07 resource fork")  # unzipped and zipped again
    args = ("train", "--data", data, "--resolution", "32", "--architecture", "tiny", "--batch", "2", "--samples", "0",
            "--max-steps", "3")
    done = cli(*args, "--out", tmp_path / "m", "--device", "cpu")
    assert done.returncode == 0 and "6 crops at 32px" in done.stderr, done.stderr
    assert "6 face crops" in (tmp_path / "m" / "README.md").read_text(), "the card describes the data it was given"

    half = shutil.copytree(tmp_path / "m", tmp_path / "half")
    shutil.rmtree(half / "unet")  # a run stopped before it saved: only its checkpoint is there
    restarted = cli(*args, "--out", half, "--device", "cpu")
    assert restarted.returncode == 2 and "checkpoint of an unfinished run; --resume" in restarted.stderr
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.md").write_text("my project notes")
    into_notes = cli(*args, "--out", notes, "--device", "cpu")
    assert into_notes.returncode == 2 and "holds README.md" in into_notes.stderr
    assert (notes / "README.md").read_text() == "my project notes"
    for device in ("gpu", "cuda:7"):
        wrong = cli(*args, "--out", tmp_path / f"d-{device}", "--device", device)
        assert wrong.returncode == 2 and "--device" in wrong.stderr and "steps" not in wrong.stderr, wrong.stderr

    bomb = shutil.copy(data, tmp_path / "bomb.zip")
    with zipfile.ZipFile(bomb, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("P8/P8_0001.jpg", bytes(33 * 2**20))  # 33 MiB of zeros, 33 KB deflated
    assert bomb.stat().st_size < 200_000
    expanding = cli(*args, "--data", bomb, "--out", tmp_path / "z", "--device", "cpu")
    assert expanding.returncode == 2 and "P8/P8_0001.jpg would expand to 34603008 bytes" in expanding.stderr
    huge = io.BytesIO()
    Image.new("1", (4097, 4097)).save(huge, format="PNG")  # a few KB that decode to 16.8 million pixels
    wide = shutil.copy(data, tmp_path / "wide.zip")
    with zipfile.ZipFile(wide, "a") as archive:
        archive.writestr("P7/P7_0001.png", huge.getvalue())
    too_wide = cli(*args, "--data", wide, "--out", tmp_path / "w", "--device", "cpu")
    assert too_wide.returncode == 2 and "P7/P7_0001.png is 4097x4097 pixels, over the" in too_wide.stderr
    with zipfile.ZipFile(data, "a") as archive:
        archive.writestr("P9/P9_0001.jpg", b"not a jpeg")
    broken = cli(*args, "--out", tmp_path / "b", "--device", "cpu")
    assert broken.returncode == 2 and "P9/P9_0001.jpg is not a readable image" in broken.stderr
    swapped = cli("eval", "--pairs", data, "--images", SHARED / "data" / "lfw" / "dev_pairs.txt", "--engine",
                  tmp_path / "m", "--out", tmp_path / "e")
    assert swapped.returncode == 2 and "not a text pairs file" in swapped.stderr and "Traceback" not in swapped.stderr
    # names in a pairs file become folders under --out: one that would lead out of it is refused
    for line, message in (("../../escaped\t1\t2", "not a person's name"), ("..\t1\t2", "not a person's name"),
                          ("P0\tone\t2", "not an image number")):
        pairs = tmp_path / "pairs.txt"
        pairs.write_text("1\t1\n" + line + "\n")
        crafted = cli("eval", "--pairs", pairs, "--images", data, "--engine", tmp_path / "m", "--out", tmp_path / "e")
        assert crafted.returncode == 2 and message in crafted.stderr and "Traceback" not in crafted.stderr, crafted.stderr
    assert not (tmp_path / "escaped").exists()


def test_linear_patch_latent_is_each_patchs_whitened_principal_components():
    """The anchor of train-autoencoder: on the crops it was fitted to, each latent channel has mean 0 and
    variance 1, the channels are uncorrelated, and they are the patches' leading components (the first
    holds more of a patch than the last)."""
    import torch

    from revanon_rt.train_autoencoder import LinearPatchLatent

    rng = np.random.default_rng(3)
    smooth = rng.integers(0, 256, (300, 4, 4, 3)).repeat(4, axis=1).repeat(4, axis=2)  # 16 x 16, blocky faces
    crops = np.clip(smooth + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)
    project = LinearPatchLatent(crops, patch=4, channels=6).projector("cpu")
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1
    z = project(x)
    assert z.shape == (300, 6, 4, 4)
    by_channel = z.permute(1, 0, 2, 3).reshape(6, -1).double().numpy()
    assert np.allclose(by_channel.mean(1), 0, atol=1e-4) and np.allclose(by_channel.var(1, ddof=1), 1, atol=1e-3)
    assert np.abs(np.corrcoef(by_channel) - np.eye(6)).max() < 1e-3
    # a patch rebuilt from its first component alone is closer to it than one from the last
    patches = x.reshape(300, 3, 4, 4, 4, 4).permute(0, 2, 4, 1, 3, 5).reshape(-1, 48).double().numpy()
    fitted = LinearPatchLatent(crops, patch=4, channels=6)
    centred = patches - fitted.mean
    energy = [np.square(centred @ fitted.basis[:, c]).mean() for c in range(6)]
    assert energy == sorted(energy, reverse=True) and energy[0] > 10 * energy[-1], energy


def test_latent_model_trains_in_two_stages_and_runs(keyfile, tmp_path):
    """train-autoencoder writes vae/; train then learns that autoencoder's latents (spec §1's E(x)), and the
    folder runs through the CLI as a latent model."""
    crops = {f"P{i}/P{i}_0001.jpg": random_image(32, seed=90 + i) for i in range(10)}
    data = crops_zip(tmp_path / "crops.zip", crops, fmt="PNG")
    out = tmp_path / "latent"
    ae_args = ("train-autoencoder", "--data", data, "--out", out, "--resolution", "32", "--latent-channels", "4",
               "--channels", "16,32", "--batch", "4", "--device", "cpu")
    first = cli(*ae_args, "--max-steps", "20")
    assert first.returncode == 0, first.stderr
    vae_config = json.loads((out / "vae" / "config.json").read_text())
    assert vae_config["latent_channels"] == 4 and vae_config["scaling_factor"] != 0.18215
    rows = (out / "checkpoint" / "autoencoder-loss.csv").read_text().splitlines()
    assert rows[0].startswith("step,reconstruction_mse,consistency") and rows[-1].startswith("20,")
    assert cli(*ae_args, "--max-steps", "20").returncode == 2, "never overwrite a trained autoencoder"
    bad = cli(*ae_args[:-2], "--channels", "16,30", "--device", "cpu")
    assert bad.returncode == 2 and "multiples of 16" in bad.stderr
    too_many = cli(*ae_args[:-2], "--latent-channels", "13", "--device", "cpu")
    assert too_many.returncode == 2 and "2 x 2 patches has only 12 directions" in too_many.stderr, too_many.stderr
    other = crops_zip(tmp_path / "other.zip", {f"Q{i}/Q{i}_0001.jpg": random_image(32, seed=70 + i) for i in range(10)},
                      fmt="PNG")
    other_data = cli("train-autoencoder", "--data", other, "--out", out, "--resume", "--device", "cpu",
                     "--max-steps", "30")
    assert other_data.returncode == 2 and "this run was trained on crops.zip" in other_data.stderr, other_data.stderr
    # a piece killed after its checkpoint had logged steps that the resumed piece trains again
    with open(out / "checkpoint" / "autoencoder-loss.csv", "a") as log:
        log.write("100,0.5,0.1,0.0,0.0002,9.0\n")
    resumed = cli(*ae_args[:-2], "--device", "cpu", "--max-steps", "24", "--resume")
    assert resumed.returncode == 0 and "resumed at step 20" in resumed.stderr, resumed.stderr
    logged = [int(row.split(",")[0]) for row in (out / "checkpoint" / "autoencoder-loss.csv").read_text().splitlines()[1:]]
    assert logged == sorted(set(logged)) and 100 not in logged and logged[-1] == 24, logged
    # the consistency weight and the learning rate, alone of the settings, may change on --resume; the card says
    # where, also for pieces logged before the weight was recorded per piece
    pieces_path = out / "checkpoint" / "autoencoder-pieces.jsonl"
    pieces = [json.loads(line) for line in pieces_path.read_text().splitlines()]
    pieces_path.write_text("".join(json.dumps({k: v for k, v in p.items() if k != "consistency_weight"}) + "\n"
                                   for p in pieces))
    stronger = cli(*ae_args[:-2], "--device", "cpu", "--max-steps", "26", "--resume", "--consistency-weight", "10",
                   "--lr", "2e-4")
    assert stronger.returncode == 0, stronger.stderr
    assert json.loads((out / "checkpoint" / "autoencoder-config.json").read_text())["consistency_weight"] == 10.0
    wider = cli(*ae_args, "--channels", "16,32,64", "--resume")
    assert wider.returncode == 2 and "--channels 16,32,64: the checkpoint was trained with --channels 16,32" in wider.stderr
    assert "only --consistency-weight and --lr can change" in wider.stderr
    # a checkpoint saved before --linear-latent-weight existed was trained without the anchor, and keeps it off
    config_path = out / "checkpoint" / "autoencoder-config.json"
    saved = json.loads(config_path.read_text())
    assert saved["linear_latent_weight"] == 1.0
    config_path.write_text(json.dumps({k: v for k, v in saved.items() if k != "linear_latent_weight"}))
    anchored = cli(*ae_args[:-2], "--device", "cpu", "--resume", "--linear-latent-weight", "1")
    assert anchored.returncode == 2 and "trained with --linear-latent-weight 0.0" in anchored.stderr, anchored.stderr
    config_path.write_text(json.dumps(saved))

    unet_args = ("train", "--data", data, "--out", out, "--architecture", "tiny", "--batch", "4", "--samples", "2",
                 "--device", "cpu", "--max-steps", "20")
    wrong_size = cli(*unet_args, "--resolution", "64")
    assert wrong_size.returncode == 2 and "--resolution 32" in wrong_size.stderr
    trained = cli(*unet_args, "--resolution", "32")
    assert trained.returncode == 0, trained.stderr
    assert "latent space: 4 x 16 x 16" in trained.stderr
    assert "accelerate" not in trained.stderr, "diffusers' loader noise reaches the user"
    card = (out / "README.md").read_text()
    assert "latent of its own autoencoder" in card and "1 × squared distance of E(x) from its patches' principal" in card
    assert "loss = pixel MSE + (1.0 to step 24, then 10.0) × E(D(z)) consistency" in card, card
    assert "AdamW lr 5e-04 to step 24, then 2e-04," in card, card
    copied = tmp_path / "copied"
    shutil.copytree(out / "vae", copied / "vae")  # an autoencoder trained elsewhere, without its record
    on_copy = cli("train", "--data", data, "--out", copied, "--architecture", "tiny", "--batch", "4", "--samples", "0",
                  "--device", "cpu", "--max-steps", "2", "--resolution", "32")
    assert on_copy.returncode == 0, on_copy.stderr
    assert "trained elsewhere" in (copied / "README.md").read_text()
    truncated = tmp_path / "truncated"
    shutil.copytree(out / "vae", truncated / "vae")
    weights = next((truncated / "vae").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    broken = cli("train", "--data", data, "--out", truncated, "--architecture", "tiny", "--batch", "4", "--samples", "0",
                 "--device", "cpu", "--max-steps", "2", "--resolution", "32")
    assert broken.returncode == 2 and "cannot load the weights" in broken.stderr, broken.stderr
    late = cli(*ae_args, "--max-steps", "40", "--resume")
    assert late.returncode == 2 and "UNet" in late.stderr, "retraining the autoencoder would orphan the UNet"
    (out / "unet").rename(tmp_path / "unet-aside")  # as a UNet run stopped before its weights were saved
    unfinished = cli(*ae_args, "--max-steps", "40", "--resume")
    assert unfinished.returncode == 2 and "the checkpoint of a UNet" in unfinished.stderr, unfinished.stderr
    (tmp_path / "unet-aside").rename(out / "unet")

    from revanon_rt.reference import TorchReference
    from revanon_rt.train import training_samples

    backend = TorchReference(out)
    assert backend.image_size == 32 and backend.latent_shape == (4, 16, 16)
    images = np.stack(list(crops.values()))
    learned = training_samples(images[:2], out, "cpu")
    x = images[:2].transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(learned[:, 0], backend.encode(x), rtol=0, atol=1e-5)
    np.testing.assert_allclose(learned[:, 1], backend.encode(x[..., ::-1].copy()), rtol=0, atol=1e-5)

    face = save_png(tmp_path / "in" / "face.png", images[0])
    mask = save_png(tmp_path / "mask.png", np.full((32, 32), 255, np.uint8))
    anon = cli("run", "anonymize", face, "--out", tmp_path / "anon", "--model", out, "--mask", mask, "--key", keyfile)
    assert anon.returncode == 0, anon.stderr
    rec = cli("run", "deanonymize", tmp_path / "anon" / "face.png", "--out", tmp_path / "rec", "--model", out,
              "--key", keyfile)
    assert rec.returncode == 0, rec.stderr
    anonymized = np.asarray(Image.open(tmp_path / "anon" / "face.png").convert("RGB"))
    assert not np.array_equal(anonymized, images[0])


def test_face_region_scales_about_its_centre():
    from revanon_rt.faces import template_region

    base, larger, smaller = (template_region(128, scale=s) for s in (1.0, 1.25, 0.8))
    assert np.array_equal(base, template_region(128))
    assert not (smaller & ~base).any() and not (base & ~larger).any()
    assert larger.sum() / base.sum() == pytest.approx(1.25 ** 2, rel=0.02)
    assert smaller.sum() / base.sum() == pytest.approx(0.8 ** 2, rel=0.02)

    def centre(region):
        rows, cols = np.nonzero(region)
        return rows.mean(), cols.mean()

    assert np.allclose(centre(larger), centre(base), atol=1.0) and np.allclose(centre(smaller), centre(base), atol=1.0)


def test_landmarks_masker_finds_the_face_and_says_when_it_cannot(zero_engines, keyfile, tmp_path):
    from revanon_rt.errors import InputError
    from revanon_rt.faces import LandmarksMasker

    masker = LandmarksMasker()
    crop = _lfw_crop(0, 128)
    face_map = masker.face_map(crop, "face")
    assert face_map.shape == (512, 512) and 0.15 < face_map.mean() < 0.6
    assert face_map[256, 256] == 1 and face_map[:40].sum() == 0 and face_map[:, :30].sum() == 0
    with pytest.raises(InputError, match="no face found"):
        masker.face_map(random_image(128, seed=81), "noise")

    save_png(tmp_path / "in" / "face.png", _lfw_crop(1, 64))
    result = cli("run", "anonymize", tmp_path / "in", "--out", tmp_path / "out", "--engine", zero_engines["zero64"],
                 "--masker", "landmarks", "--key", keyfile)
    assert result.returncode == 0, result.stderr
    from revanon_rt import container

    assert json.loads(container.read_png_chunk(tmp_path / "out" / "face.png"))["masker"] == "landmarks"
    note = cli("run", "anonymize", tmp_path / "in", "--out", tmp_path / "out68", "--engine", zero_engines["zero64"],
               "--masker", "landmarks", "--landmarks", "68", "--key", keyfile)
    assert note.returncode == 0 and "bars commercial use" in note.stderr
    noise = save_png(tmp_path / "noise" / "noise.png", random_image(64, seed=82))
    failed = cli("run", "anonymize", noise, "--out", tmp_path / "o2", "--engine", zero_engines["zero64"],
                 "--masker", "landmarks", "--key", keyfile)
    assert failed.returncode == 1 and "no face found" in failed.stderr and "--mask" in failed.stderr


def test_eval_plumbing_on_a_few_pairs_and_merge(zero_engines, tmp_path, no_torch_env):
    common = ("--pairs", LFW / "dev_pairs.txt", "--images", LFW / "dev-128.zip", "--engine", zero_engines["zero64"],
              "--steps", "5", "--candidates", "8", "--out", tmp_path / "eval")
    first = cli("eval", *common, "--limit", "4", env=no_torch_env)  # an engine evaluates without the torch stack
    assert first.returncode == 0, first.stderr
    # stderr is a pipe here, as in a logged run: progress comes as lines, each phase started and done
    for phase in ("masks", "anonymize", "recover", "attack", "linkage", "score"):
        assert re.search(rf"\] {phase}: 0 started\n.*\] {phase}: [1-9]\d* done", first.stderr, re.S), phase
        assert first.stderr.count(f"] {phase}: 0 started") == 1, "a phase starts once, when its work starts"
    metrics = json.loads((tmp_path / "eval" / "chunk-00000-00004" / "metrics.json").read_text())
    tar = metrics["tar_at_far_0.1%"]
    # ε ≡ 0: flips are exact sign changes, so the right key recovers exactly and any other key does not
    assert tar["clean"] == tar["recovered"] == 1.0
    for condition in ("anonymized", "random_key", "one_bit_key", "attack_nonce"):
        # 4 pairs and a threshold from 16 impostor scores: one chance match is possible
        assert tar[condition] <= 0.25, (condition, tar)
    assert tar["attack_reuse"] == 1.0, "one pattern for every face: one known pair undoes the others"
    assert metrics["recovery_psnr_db"]["mean"] == 100.0 and metrics["face_detection_rate"]["anonymized"] < 0.5
    assert metrics["linkage"]["top1"] == 1.0, "sign flips keep |z_T|: key-free linkage is trivial here"
    # a pixel model re-injects the original pixels outside the mask: they come back byte for byte
    regions = metrics["mask_regions"]
    assert regions["outside_byte_identical"] == {"anonymized": 1.0, "recovered": 1.0}
    assert regions["inside_psnr_db"]["recovered"]["mean"] == 100.0 > 30 > regions["inside_psnr_db"]["anonymized"]["mean"]
    assert metrics["counts"]["region_inside"] == metrics["counts"]["cosine"] == 3, "every distinct second image"
    chunk_table = (tmp_path / "eval" / "chunk-00000-00004" / "metrics.md").read_text()
    assert "outside the mask (3 images): byte-identical to the original in every anonymized and recovered image" in chunk_table
    # 4 of 4 pairs bound the rate only to 51-100% (Wilson, 95%): the table says how little a small run shows
    assert "| recovered, right key | 100.0% | 4 of 4 | 51.0–100.0% |" in chunk_table
    pooled = re.search(r"\| random key, one bit away and nonce attack, pooled [^|]*\| [\d.]+% \| (\d+) of 12 \|", chunk_table)
    assert pooled and int(pooled[1]) == round(4 * sum(tar[c] for c in ("random_key", "one_bit_key", "attack_nonce")))
    assert (tmp_path / "eval" / "chunk-00000-00004" / "contact_sheet.png").exists()

    pool_cache = tmp_path / "eval" / "linkage-pool.npz"
    written = pool_cache.stat().st_mtime_ns
    transform_only = cli("eval", *common, "--start", "4", "--limit", "2", "--stage", "transform")
    assert transform_only.returncode == 0, transform_only.stderr
    assert not (tmp_path / "eval" / "chunk-00004-00006" / "features.npz").exists()
    # the second chunk ranks against the first one's pool, whose inversions it reads instead of redoing
    pools = [json.loads((tmp_path / "eval" / chunk / "transform.json").read_text())["linkage_pool"]
             for chunk in ("chunk-00000-00004", "chunk-00004-00006")]
    assert pools[0] == pools[1] and len(pools[0]) == 27
    assert pool_cache.stat().st_mtime_ns == written
    one_image = cli("eval", *common, "--start", "8", "--limit", "1")
    assert one_image.returncode == 2 and "at least two" in one_image.stderr
    nothing_to_score = cli("eval", *common, "--start", "6", "--limit", "2", "--stage", "score")
    assert nothing_to_score.returncode == 2 and "no transforms to score" in nothing_to_score.stderr
    score_only = cli("eval", *common, "--start", "4", "--limit", "2", "--stage", "score")
    assert score_only.returncode == 0, score_only.stderr
    merged = cli("eval-merge", tmp_path / "eval")
    assert merged.returncode == 0, merged.stderr
    summary = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert summary["pairs"] == 6 and summary["chunks"] == ["chunk-00000-00004", "chunk-00004-00006"]

    # A summary whose chunks are gone can still grow: later chunks are scored at its threshold and
    # added, which must equal one merge of all chunks at that threshold.
    from revanon_rt.evaluate import summarize

    base_file = tmp_path / "eval" / "chunk-00000-00004" / "metrics.json"
    base = json.loads(base_file.read_text())
    later = tmp_path / "later"
    shutil.copytree(tmp_path / "eval" / "chunk-00004-00006", later / "chunk-00004-00006")
    extended = cli("eval-merge", later, "--extend", base_file, "--title", "extended")
    assert extended.returncode == 0, extended.stderr
    combined = json.loads((later / "metrics.json").read_text())
    direct = summarize([tmp_path / "eval" / c / "features.npz" for c in summary["chunks"]],
                       threshold=base["threshold_cosine_far_0.1%"])
    assert combined["chunks"] == direct["chunks"] and combined["counts"] == direct["counts"]
    assert combined["tar_at_far_0.1%"] == pytest.approx(direct["tar_at_far_0.1%"])
    for figure in ("cosine_original_vs_anonymized", "recovery_psnr_db", "face_detection_rate"):
        assert combined[figure] == pytest.approx(direct[figure]), figure
    for side, by_condition in direct["mask_regions"].items():
        for condition, figure in by_condition.items():
            assert combined["mask_regions"][side][condition] == pytest.approx(figure), (side, condition)
    assert combined["linkage"] == pytest.approx(direct["linkage"])
    assert combined["impostor_scores"] == base["impostor_scores"] < direct["impostor_scores"]
    assert "clean images of pairs 0-3. Pairs 4-5 were added at that threshold" in (later / "metrics.md").read_text()

    in_place = cli("eval-merge", later, "--extend", later / "metrics.json")
    assert in_place.returncode == 2 and "would be overwritten" in in_place.stderr
    assert json.loads((later / "metrics.json").read_text()) == combined
    shutil.copy(later / "metrics.json", tmp_path / "combined.json")
    twice = cli("eval-merge", later, "--extend", tmp_path / "combined.json")
    assert twice.returncode == 2 and "pair 4 is in both" in twice.stderr
    facts_file = later / "chunk-00004-00006" / "transform.json"
    facts_file.write_text(json.dumps({**json.loads(facts_file.read_text()), "steps": 6}))
    other_steps = cli("eval-merge", later, "--extend", base_file)
    assert other_steps.returncode == 2 and "differ in model, steps" in other_steps.stderr

    # --genuine-only transforms the genuine pairs' second images and nothing else; the impostor
    # pairs' clean images still join the threshold
    mixed = cli("eval", *common, "--start", "298", "--limit", "4", "--genuine-only")
    assert mixed.returncode == 0, mixed.stderr
    chunk = tmp_path / "eval" / "chunk-00298-00302"
    facts = json.loads((chunk / "transform.json").read_text())
    genuine_seconds = sorted({second for _first, second, same in facts["pairs"] if same})
    assert len(genuine_seconds) == 2 and len(facts["pairs"]) == 4
    anonymized = chunk / "images" / "anonymized"
    assert facts["targets"] == genuine_seconds
    assert sorted(p.relative_to(anonymized).with_suffix("").as_posix() for p in anonymized.rglob("*.png")) == \
        [name.rsplit(".", 1)[0] for name in genuine_seconds]
    assert json.loads((chunk / "metrics.json").read_text())["counts"]["cosine"] == 2
    with_impostors = cli("eval-merge", tmp_path / "eval")
    assert with_impostors.returncode == 0, with_impostors.stderr
    grown = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert grown["pairs"] == 10 and grown["genuine_pairs"] == 8
    assert grown["counts"]["cosine"] == summary["counts"]["cosine"] + 2
    assert grown["impostor_scores"] > summary["impostor_scores"]


def test_eval_checks_its_inputs_before_the_transform_and_merges_only_like_chunks(zero_engines, tmp_path):
    """A zip made on a Mac, pairs naming an image the zip lacks, an --out that is a file, and chunks of two
    pairs files: each is found before any model work, or refused at the merge."""
    people = ["Zico/Zico_0001.jpg", "Zico/Zico_0002.jpg", "Zico/Zico_0003.jpg",
              "Abel_Pacheco/Abel_Pacheco_0001.jpg", "Abel_Pacheco/Abel_Pacheco_0004.jpg"]
    mac_zip = tmp_path / "mac.zip"
    with zipfile.ZipFile(LFW / "dev-128.zip") as source, zipfile.ZipFile(mac_zip, "w") as z:
        for name in people:
            z.writestr(name, source.read(name))
            z.writestr(f"__MACOSX/{name.rsplit('/', 1)[0]}/._{name.rsplit('/', 1)[1]}", b"\x00\x05\x16\x07 fork")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("2\t2\nZico\t1\t2\nAbel_Pacheco\t1\t4\nZico\t2\t3\nAbel_Pacheco\t1\tZico\t2\n")
    other_pairs = tmp_path / "other_pairs.txt"
    other_pairs.write_text("1\t2\nZico\t1\t3\nAbel_Pacheco\t1\t4\n")
    common = ("--images", mac_zip, "--engine", zero_engines["zero64"], "--steps", "2", "--candidates", "4")

    def evaluate(pairs_file, out, *flags):
        run = cli("eval", "--pairs", pairs_file, *common, "--out", out, *flags)
        assert run.returncode == 0, run.stderr
        return run

    missing = tmp_path / "missing.txt"
    missing.write_text("1\t1\nZico\t1\t2\nZico\t1\tAbel_Pacheco\t9\n")
    refused = cli("eval", "--pairs", missing, *common, "--out", tmp_path / "m")
    assert refused.returncode == 2 and "the zip does not hold: Abel_Pacheco/Abel_Pacheco_0009.jpg" in refused.stderr
    assert not (tmp_path / "m").exists(), "refused before anything was written"
    (tmp_path / "a_file").write_text("precious")
    onto_file = cli("eval", "--pairs", pairs, *common, "--out", tmp_path / "a_file")
    assert onto_file.returncode == 2 and "is a file" in onto_file.stderr and "Traceback" not in onto_file.stderr
    assert (tmp_path / "a_file").read_text() == "precious"

    # the resource forks are not images: the linkage pool leaves them out and the run completes
    chunk = tmp_path / "e" / "chunk-00000-00002"
    evaluate(pairs, tmp_path / "e", "--limit", "2")
    facts = json.loads((chunk / "transform.json").read_text())
    # Zico_0002 ranks among the 2 images of other people the pool holds, and itself: 3 candidates, not 4
    assert facts["linkage_pool"] == sorted(people) and facts["linkage_candidates"] == 3
    # a chunk transformed again drops its old scores, which describe the images it replaced
    evaluate(pairs, tmp_path / "e", "--limit", "2", "--stage", "transform")
    assert not (chunk / "features.npz").exists()
    evaluate(pairs, tmp_path / "e", "--limit", "2", "--stage", "score")
    evaluate(pairs, tmp_path / "e", "--start", "2")
    assert cli("eval-merge", tmp_path / "e").returncode == 0

    # a summary made before chunks recorded their pairs, images and precision still takes new chunks
    old = json.loads((chunk / "metrics.json").read_text())
    for key in ("precision", "images_sha256", "pairs_sha256"):
        del old["setting"][key]
    (tmp_path / "old.json").write_text(json.dumps(old))
    shutil.copytree(tmp_path / "e" / "chunk-00002-00004", tmp_path / "later" / "chunk-00002-00004")
    extended = cli("eval-merge", tmp_path / "later", "--extend", tmp_path / "old.json")
    assert extended.returncode == 0, extended.stderr

    # a chunk of another pairs file cannot join this one's summary
    evaluate(other_pairs, tmp_path / "other")
    shutil.copytree(tmp_path / "other" / "chunk-00000-00002", tmp_path / "later" / "chunk-00004-00006")
    mixed = cli("eval-merge", tmp_path / "later")
    assert mixed.returncode == 2 and "differ in model, steps, precision, linkage test, pairs or images" in mixed.stderr


def test_extending_a_summary_counts_an_image_it_shares_with_the_added_chunks_once(zero_engines, tmp_path):
    """Pairs 6 and 7 of the dev split share their second image, Angela_Bassett_0005, and fall in different
    chunks: extending the first chunk's summary with the second must count that image once, as one merge of
    both chunks does."""
    from revanon_rt.evaluate import summarize

    common = ("--pairs", LFW / "dev_pairs.txt", "--images", LFW / "dev-128.zip", "--engine", zero_engines["zero64"],
              "--steps", "3", "--candidates", "4", "--out", tmp_path / "eval")
    for start in ("5", "7"):
        run = cli("eval", *common, "--start", start, "--limit", "2")
        assert run.returncode == 0, run.stderr
    base_file = tmp_path / "eval" / "chunk-00005-00007" / "metrics.json"
    base = json.loads(base_file.read_text())
    assert base["target_images"] == ["Anders_Fogh_Rasmussen/Anders_Fogh_Rasmussen_0004.jpg",
                                     "Angela_Bassett/Angela_Bassett_0005.jpg"], base["target_images"]
    later = tmp_path / "later"
    shutil.copytree(tmp_path / "eval" / "chunk-00007-00009", later / "chunk-00007-00009")
    extended = cli("eval-merge", later, "--extend", base_file)
    assert extended.returncode == 0, extended.stderr
    combined = json.loads((later / "metrics.json").read_text())
    direct = summarize([tmp_path / "eval" / c / "features.npz" for c in ("chunk-00005-00007", "chunk-00007-00009")],
                       threshold=base["threshold_cosine_far_0.1%"])
    assert combined["counts"] == direct["counts"] and direct["counts"]["cosine"] == 3
    assert combined["target_images"] == direct["target_images"]
    for figure in ("cosine_original_vs_anonymized", "recovery_psnr_db", "face_detection_rate", "linkage"):
        assert combined[figure] == pytest.approx(direct[figure]), figure
    # a summary from before the names were kept cannot show which images it counts
    old = tmp_path / "old.json"
    old.write_text(json.dumps({k: v for k, v in base.items() if k != "target_images"}))
    refused = cli("eval-merge", later, "--extend", old)
    assert refused.returncode == 2 and "would count twice" in refused.stderr, refused.stderr

def test_an_image_two_chunks_share_gets_one_nonce_and_counts_once(zero_engines, tmp_path):
    """Pairs 6 and 7 share their second image. Each image's nonce comes from its name, so both chunks
    anonymize it identically, as one run of the tool would; the per-image figures count it once."""
    out = tmp_path / "eval"
    common = ("--pairs", LFW / "dev_pairs.txt", "--images", LFW / "dev-128.zip", "--engine", zero_engines["zero64"],
              "--steps", "3", "--candidates", "8", "--out", out)
    for start in (5, 7):
        done = cli("eval", *common, "--start", str(start), "--limit", "2")
        assert done.returncode == 0, done.stderr
    shared = "Angela_Bassett/Angela_Bassett_0005.png"
    assert (out / "chunk-00005-00007" / "images" / "anonymized" / shared).read_bytes() == \
        (out / "chunk-00007-00009" / "images" / "anonymized" / shared).read_bytes()
    merged = cli("eval-merge", out)
    assert merged.returncode == 0, merged.stderr
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["genuine_pairs"] == 4 and summary["counts"]["cosine"] == summary["counts"]["recovery"] == 3
    assert summary["counts"]["linkage"] == summary["counts"]["region_inside"] == 3
    assert summary["mask_fallbacks"] == 0, "--engine on crops: dlib found every face"
    assert "no chunk covers pairs 0-4, 9-1199 of the 1200" in merged.stderr

    unscored = cli("eval", *common, "--start", "9", "--limit", "2", "--stage", "transform")
    assert unscored.returncode == 0, unscored.stderr
    # a chunk transformed again loses its old scores, which describe the images it replaced
    again = cli("eval", *common, "--start", "5", "--limit", "2", "--stage", "transform")
    assert again.returncode == 0 and not (out / "chunk-00005-00007" / "features.npz").exists()
    refused = cli("eval-merge", out)
    assert refused.returncode == 2, refused.stderr
    assert "chunk-00005-00007, chunk-00009-00011 have transforms but no scores" in refused.stderr
