"""The command line, run as a user runs it: subprocesses, real PNGs, real models."""

import json
import os
import struct
import zlib
import re
import shutil
import stat
import subprocess
import sys
import termios
import threading
import time

import numpy as np
import pytest
from PIL import Image, PngImagePlugin, TiffImagePlugin

from conftest import box_mask, cli, random_image, read_rgb, save_png, tree_digest
from revanon_rt import container
from revanon_rt.images import load_image
from revanon_rt.keys import Secret, read_key_file
from revanon_rt.masks import unpack_mask

AUTH_MESSAGE = "wrong key, or the image or its metadata was changed"


@pytest.fixture(scope="module")
def zero_backend(models):
    from revanon_rt.reference import TorchReference

    return TorchReference(models["zero"])


def _anonymize_with_library(backend, src, out, keyfile, mask_path, nonce=None):
    """Setup for tests about de-anonymization: the library call the CLI makes."""
    from revanon_rt.masks import FileMasker
    from revanon_rt.pipeline import Options, anonymize_image

    image = load_image(src)
    result = anonymize_image(image, None, backend, FileMasker(mask_path), Secret.from_key(read_key_file(keyfile)),
                             Options(), src.name, nonce=nonce)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(result.png_bytes())
    return out


def _rewrite_metadata(src, dst, edit):
    """Same pixels, edited metadata text."""
    header = json.loads(container.read_png_chunk(src))
    edit(header)
    with Image.open(src) as im:
        info = PngImagePlugin.PngInfo()
        info.add_itxt("revanon", json.dumps(header), zip=False)
        im.save(dst, pnginfo=info)
    return dst


def test_zero_eps_round_trip_is_bit_exact_and_outputs_are_clean(models, keyfile, tmp_path):
    inputs = tmp_path / "in"
    face = save_png(inputs / "face.png", random_image(32, seed=1))
    # RGBA with an RGB ICC profile and a text chunk that must not survive
    rgba = np.dstack([random_image(32, seed=2), np.linspace(0, 255, 32 * 32).astype(np.uint8).reshape(32, 32)])
    icc = bytes(16) + b"RGB " + bytes(108)
    text = PngImagePlugin.PngInfo()
    text.add_text("Author", "Jane Doe")
    save_png(inputs / "sub" / "alpha.png", rgba, icc_profile=icc, pnginfo=text)
    # a JPEG with GPS and an orientation tag, beside a PNG of the same stem
    exif = Image.Exif()
    exif[0x0112] = 3
    exif[0x8825] = {1: "N", 2: (48.0, 51.0, 24.0)}
    Image.fromarray(random_image(32, seed=3)).save(inputs / "face.jpg", exif=exif, quality=95)
    mask = save_png(tmp_path / "mask.png", box_mask(32))
    before = tree_digest(inputs)

    anon = cli("run", "anonymize", inputs, "--out", tmp_path / "anon", "--model", models["zero"],
               "--mask", mask, "--key", keyfile)
    assert anon.returncode == 0, anon.stderr
    assert "3 done, 0 skipped, 0 failed" in anon.stderr
    assert "beyond the pixel range" not in anon.stderr, "ε ≡ 0 keeps every value in range"
    outputs = sorted(p.relative_to(tmp_path / "anon").as_posix() for p in (tmp_path / "anon").rglob("*.png"))
    assert outputs == ["face.jpg.png", "face.png", "sub/alpha.png"]

    rec = cli("run", "deanonymize", tmp_path / "anon", "--out", tmp_path / "rec", "--model", models["zero"],
              "--key", keyfile)
    assert rec.returncode == 0, rec.stderr
    assert tree_digest(inputs) == before, "inputs must never change"

    inside = box_mask(32) > 0
    for src, name in [(face, "face.png"), (inputs / "sub" / "alpha.png", "sub/alpha.png"),
                      (inputs / "face.jpg", "face.jpg.png")]:
        original = load_image(src).rgb  # orientation applied
        anonymized = read_rgb(tmp_path / "anon" / name)
        assert np.array_equal(anonymized[~inside], original[~inside]), name
        assert (anonymized[inside] != original[inside]).mean() > 0.3, name
        assert np.array_equal(read_rgb(tmp_path / "rec" / name), original), name
    for folder in ("anon", "rec"):
        with Image.open(tmp_path / folder / "sub" / "alpha.png") as im:
            assert im.mode == "RGBA" and np.array_equal(np.asarray(im)[..., 3], rgba[..., 3])
            assert im.info.get("icc_profile") == icc
            assert set(im.text) == {"revanon"}
        with Image.open(tmp_path / folder / "face.jpg.png") as im:
            assert "exif" not in im.info and not im.getexif()
    umask = os.umask(0o022)
    os.umask(umask)
    for name in outputs:
        assert stat.S_IMODE((tmp_path / "anon" / name).stat().st_mode) == 0o644 & ~umask, name
        assert stat.S_IMODE((tmp_path / "rec" / name).stat().st_mode) == 0o600, "recovered faces are private"
    recovered = json.loads(container.read_png_chunk(tmp_path / "rec" / "face.png"))
    assert recovered["state"] == "recovered" and "auth" not in recovered and "unverified" not in recovered

    info = cli("info", tmp_path / "anon" / "face.png")
    assert info.returncode == 0
    shown = json.loads(info.stdout)
    assert shown["state"] == "anonymized" and shown["masker"] == "file"
    assert read_key_file(keyfile).hex() not in info.stdout + info.stderr
    assert "no auth tag" not in info.stderr and "key reused" not in info.stderr
    info = cli("info", tmp_path / "rec" / "face.png")
    assert info.returncode == 0 and "recovered" in info.stderr
    assert "no auth tag (nothing shows who made this record, or that an unverified mark" in info.stderr


def test_values_that_8_bit_storage_clamps_are_reported_and_do_not_recover(keyfile, tmp_path):
    """With ε ≡ 0.05 the walks invert each other exactly, yet the flipped half of the face is denoised to
    about −x − 13, which the PNG clamps to −1: the warning is the only sign at anonymization time."""
    from revanon_rt import tiny

    model = tiny.save_tiny_pixel(tmp_path / "constant", constant_eps=0.05)
    face = save_png(tmp_path / "in" / "face.png", random_image(32, seed=4))
    mask = save_png(tmp_path / "mask.png", box_mask(32))
    anon = cli("run", "anonymize", face, "--out", tmp_path / "anon", "--model", model, "--mask", mask,
               "--key", keyfile)
    assert anon.returncode == 0, anon.stderr
    warning = " ".join(anon.stderr.split())
    share = re.search(r"face\.png: the model generated ([\d.]+)% of the face's values beyond the pixel range", warning)
    assert share and 40 < float(share.group(1)) < 60, anon.stderr  # the elements the key flips
    assert "Verify recovery before deleting the original" in warning
    rec = cli("run", "deanonymize", tmp_path / "anon" / "face.png", "--out", tmp_path / "rec", "--model", model,
              "--key", keyfile)
    assert rec.returncode == 0, rec.stderr
    assert "beyond the pixel range" not in rec.stderr, "only anonymized outputs are checked"
    inside = box_mask(32) > 0
    original, recovered = read_rgb(face), read_rgb(tmp_path / "rec" / "face.png")
    assert np.array_equal(recovered[~inside], original[~inside])
    same = recovered[inside] == original[inside]
    assert 0.3 < same.mean() < 0.7, "the unflipped half recovers exactly, the clamped half does not"


def test_tiny_ldm_round_trip_with_bisenet_matches_the_library(models, bisenet_pth, keyfile, tmp_path):
    from revanon_rt.pipeline import Options, deanonymize_image
    from revanon_rt.reference import TorchReference

    save_png(tmp_path / "in" / "face.png", random_image(64, seed=9))
    anon = cli("run", "anonymize", tmp_path / "in", "--out", tmp_path / "anon", "--model", models["ldm"],
               "--parser", bisenet_pth, "--key", keyfile, "--steps", "50")
    assert anon.returncode == 0, anon.stderr
    rec = cli("run", "deanonymize", tmp_path / "anon", "--out", tmp_path / "rec", "--model", models["ldm"],
              "--key", keyfile)
    assert rec.returncode == 0, rec.stderr

    backend = TorchReference(models["ldm"], parser=bisenet_pth)
    anonymized = load_image(tmp_path / "anon" / "face.png")
    header = json.loads(container.read_png_chunk(tmp_path / "anon" / "face.png"))
    assert header["masker"] == "bisenet" and header["steps"] == 50
    stored = unpack_mask(header["faces"][0]["mask"], "x")
    from revanon_rt.masks import latent_mask
    from revanon_rt.pixels import to_unit

    expected_mask = latent_mask(backend.parse(to_unit(load_image(tmp_path / "in" / "face.png").rgb[None]))[0], (16, 16))
    assert np.array_equal(stored, expected_mask)
    library = deanonymize_image(anonymized, container.read_png_chunk(tmp_path / "anon" / "face.png"), "x", backend,
                                Secret.from_key(read_key_file(keyfile)), Options(), "face.png")
    assert np.array_equal(read_rgb(tmp_path / "rec" / "face.png"), library.image.rgb)
    assert not np.array_equal(anonymized.rgb, read_rgb(tmp_path / "in" / "face.png"))


def test_wrong_key_or_edits_are_refused_and_nothing_is_written(models, zero_engines, zero_backend, keyfile, other_keyfile, tmp_path):
    src = save_png(tmp_path / "face.png", random_image(32, seed=4))
    mask = save_png(tmp_path / "mask.png", box_mask(32))
    anon = _anonymize_with_library(zero_backend, src, tmp_path / "anon" / "face.png", keyfile, mask)
    edited = tmp_path / "edited"
    edited.mkdir()
    pixels = read_rgb(anon)
    pixels[0, 0, 0] ^= 1
    info = PngImagePlugin.PngInfo()
    info.add_itxt("revanon", container.read_png_chunk(anon), zip=False)
    Image.fromarray(pixels).save(edited / "pixel.png", pnginfo=info)

    def shift_box(h):
        h["faces"][0]["box"][0] = 1
    _rewrite_metadata(anon, edited / "meta.png", shift_box)

    tampered = cli("run", "deanonymize", edited, "--out", tmp_path / "out1", "--engine", zero_engines["zero"], "--key", keyfile)
    assert tampered.returncode == 1
    errors = [line for line in tampered.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all(AUTH_MESSAGE in line for line in errors)
    assert "pixel.png" in tampered.stderr and "meta.png" in tampered.stderr
    wrong = cli("run", "deanonymize", anon, "--out", tmp_path / "out2", "--engine", zero_engines["zero"], "--key", other_keyfile)
    assert wrong.returncode == 1 and AUTH_MESSAGE in wrong.stderr
    assert not any((tmp_path / "out1").rglob("*.png")) and not any((tmp_path / "out2").rglob("*.png"))

    skipped = cli("run", "deanonymize", anon, "--out", tmp_path / "out3", "--engine", zero_engines["zero"],
                  "--key", other_keyfile, "--skip-auth")
    assert skipped.returncode == 0 and "unverified" in skipped.stderr
    header = json.loads(container.read_png_chunk(tmp_path / "out3" / "face.png"))
    assert header["unverified"] is True and header["state"] == "recovered"
    wrong_recovery = read_rgb(tmp_path / "out3" / "face.png")
    original = read_rgb(src)
    inside = box_mask(32) > 0
    assert (wrong_recovery[inside] != original[inside]).mean() > 0.3

    right_but_skipped = cli("run", "deanonymize", anon, "--out", tmp_path / "out4", "--engine", zero_engines["zero"],
                            "--key", keyfile, "--skip-auth")
    assert right_but_skipped.returncode == 0
    assert json.loads(container.read_png_chunk(tmp_path / "out4" / "face.png"))["unverified"] is True, \
        "spec §7: --skip-auth marks every output unverified, the check passing or not"


def test_double_runs_are_refused_unless_forced(models, zero_engines, keyfile, tmp_path):
    src = save_png(tmp_path / "face.png", random_image(32, seed=5))
    mask = save_png(tmp_path / "mask.png", box_mask(32))
    common = ("--engine", zero_engines["zero"], "--mask", mask, "--key", keyfile)
    assert cli("run", "anonymize", src, "--out", tmp_path / "a1", *common).returncode == 0
    again = cli("run", "anonymize", tmp_path / "a1" / "face.png", "--out", tmp_path / "a2", *common)
    assert again.returncode == 1 and "is a revanon anonymized image" in again.stderr and "--force" in again.stderr
    assert not (tmp_path / "a2" / "face.png").exists()
    forced = cli("run", "anonymize", tmp_path / "a1" / "face.png", "--out", tmp_path / "a2", *common, "--force")
    assert forced.returncode == 0 and (tmp_path / "a2" / "face.png").exists()
    # one record per image: the second anonymization's replaces the first's, and the user is told so
    assert "was already anonymized" in forced.stderr and "Keep the first anonymized file" in forced.stderr

    rec = cli("run", "deanonymize", tmp_path / "a1" / "face.png", tmp_path / "a2" / "face.png", "--out",
              tmp_path / "r", "--engine", zero_engines["zero"], "--key", keyfile)
    # a1 and a2 share an output name, so the second keeps its extension
    assert rec.returncode == 0, rec.stderr
    twice = cli("run", "deanonymize", tmp_path / "r" / "face.png", "--out", tmp_path / "r2", "--model",
                models["zero"], "--key", keyfile)
    assert twice.returncode == 1 and "not 'anonymized'" in twice.stderr
    forced_twice = cli("run", "deanonymize", tmp_path / "r" / "face.png", "--out", tmp_path / "r3", "--engine",
                       zero_engines["zero"], "--key", keyfile, "--force")
    assert forced_twice.returncode == 1 and "carries no auth tag" in forced_twice.stderr, forced_twice.stderr
    # a recovered image where an anonymize run would write is the real face: neither skipped nor replaced
    recovered = (tmp_path / "r" / "face.png").read_bytes()
    for extra in ((), ("--overwrite",)):
        onto_recovered = cli("run", "anonymize", src, "--out", tmp_path / "r", *common, *extra)
        assert onto_recovered.returncode == 1, onto_recovered.stderr
        assert "face.png exists and is not an anonymized image made by revanon-rt" in onto_recovered.stderr
    assert (tmp_path / "r" / "face.png").read_bytes() == recovered
    # anonymizing a recovered image again loses nothing, so --force gives no warning
    from_recovered = cli("run", "anonymize", tmp_path / "r" / "face.png", "--out", tmp_path / "a3", *common, "--force")
    assert from_recovered.returncode == 0 and "warning" not in from_recovered.stderr, from_recovered.stderr


def test_a_crafted_huge_image_behind_a_crop_record_is_refused_before_it_is_decoded(zero_engines, keyfile, tmp_path):
    """A 1-bit PNG of 8192x8192 is a few KB and 200 MB once decoded to RGB: with a crop-mode record copied
    from a real output it must fail from its header, as a crop of the wrong size, before any decoding."""
    src = save_png(tmp_path / "face.png", random_image(32, seed=15))
    common = ("--engine", zero_engines["zero"], "--key", keyfile)
    assert cli("run", "anonymize", src, "--out", tmp_path / "a", "--mask", save_png(tmp_path / "m.png", box_mask(32)),
               *common).returncode == 0
    info = PngImagePlugin.PngInfo()
    info.add_itxt(container.KEYWORD, container.read_png_chunk(tmp_path / "a" / "face.png"))
    bomb = tmp_path / "bomb" / "face.png"
    bomb.parent.mkdir()
    Image.new("1", (8192, 8192)).save(bomb, pnginfo=info)
    assert bomb.stat().st_size < 100_000
    refused = cli("run", "deanonymize", bomb, "--out", tmp_path / "r", *common)
    assert refused.returncode == 1 and "8192x8192, but its record is of a 32x32 crop" in refused.stderr, refused.stderr


def test_existing_outputs_are_skipped_unless_overwrite(models, zero_engines, keyfile, tmp_path):
    src = save_png(tmp_path / "face.png", random_image(32, seed=6))
    mask = save_png(tmp_path / "mask.png", box_mask(32))
    common = (src, "--out", tmp_path / "out", "--engine", zero_engines["zero"], "--mask", mask, "--key", keyfile)
    assert cli("run", "anonymize", *common).returncode == 0
    first = (tmp_path / "out" / "face.png").read_bytes()
    second = cli("run", "anonymize", *common)
    assert second.returncode == 0 and "0 done, 1 skipped, 0 failed" in second.stderr
    assert (tmp_path / "out" / "face.png").read_bytes() == first
    third = cli("run", "anonymize", *common, "--overwrite")
    assert third.returncode == 0 and "1 done" in third.stderr
    assert (tmp_path / "out" / "face.png").read_bytes() != first, "a fresh nonce makes new bytes"
    into_input = cli("run", "anonymize", tmp_path / "out" / "face.png", "--out", tmp_path / "out", "--engine",
                     zero_engines["zero"], "--mask", mask, "--key", keyfile, "--overwrite", "--force")
    assert into_input.returncode == 1 and "would replace the input" in into_input.stderr


def test_a_file_revanon_did_not_make_is_never_skipped_or_replaced_and_out_may_hold_the_inputs(zero_engines, keyfile,
                                                                                           tmp_path):
    folder = tmp_path / "photos"
    original = save_png(folder / "a.png", random_image(32, seed=10))
    Image.fromarray(random_image(32, seed=11)).save(folder / "a.jpg", quality=95)
    mask = save_png(tmp_path / "mask.png", box_mask(32))
    common = ("--engine", zero_engines["zero"], "--mask", mask, "--key", keyfile)
    before = original.read_bytes()
    for extra in ((), ("--overwrite",)):  # a.jpg's output would be a.png: the user's own, not an output
        run = cli("run", "anonymize", folder / "a.jpg", "--out", folder, *common, *extra)
        assert run.returncode == 1 and "is not an anonymized image made by revanon-rt" in run.stderr, run.stderr
    assert original.read_bytes() == before

    # --out holding the input folder: every subfolder is still searched
    save_png(folder / "sub" / "b.png", random_image(32, seed=12))
    held = cli("run", "anonymize", folder, "--out", tmp_path, *common)
    assert held.returncode == 0 and "3 done" in held.stderr, held.stderr
    assert (tmp_path / "sub" / "b.png").exists() and (tmp_path / "a.jpg.png").exists()


def test_no_output_lands_on_any_input_and_renamed_runs_add_to_their_mapping(zero_engines, keyfile, tmp_path):
    folder = tmp_path / "same"
    save_png(folder / "a.png", random_image(32, seed=8))
    Image.fromarray(random_image(32, seed=9)).save(folder / "a.jpg", quality=95)
    mask = save_png(tmp_path / "mask.png", box_mask(32))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    common = ("--engine", zero_engines["zero"], "--mask", mask, "--key", keyfile)
    as_folder = cli("run", "anonymize", folder, "--out", folder, *common)
    # the next run of the folder would take these outputs for inputs
    assert as_folder.returncode == 2 and "is the input folder" in as_folder.stderr, as_folder.stderr
    into_itself = cli("run", "anonymize", folder / "a.png", folder / "a.jpg", "--out", folder, "--overwrite", *common)
    # a.png is refused; a.jpg must not take the name a.png, which is a.png's input
    assert into_itself.returncode == 1 and "would replace the input" in into_itself.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name in before} == before
    assert sorted(p.name for p in folder.iterdir()) == ["a.jpg", "a.jpg.png", "a.png"]
    typo = cli("run", "anonymize", folder / "a.png", "--out", tmp_path / "t", "--device", "gpu", *common)
    assert typo.returncode == 2 and "--device must be auto, cpu, cuda or cuda:N" in typo.stderr

    names = tmp_path / "names.json"
    first = cli("run", "anonymize", folder / "a.png", "--out", tmp_path / "n", "--rename", "--mapping", names, *common)
    assert first.returncode == 0, first.stderr
    second = cli("run", "anonymize", folder / "a.png", folder / "a.jpg", "--out", tmp_path / "n", "--rename",
                 "--mapping", names, *common)
    # a.png is already in the mapping: skipped under its name; a.jpg gets the next number
    assert second.returncode == 0 and "1 done, 1 skipped" in second.stderr, second.stderr
    assert json.loads(names.read_text()) == {str(folder / "a.png"): str(tmp_path / "n" / "000001.png"),
                                             str(folder / "a.jpg"): str(tmp_path / "n" / "000002.png")}
    # the output the mapping names for a.png is itself an input of this run: never replaced, even under --overwrite
    kept = (tmp_path / "n" / "000001.png").read_bytes()
    onto_input = cli("run", "anonymize", folder / "a.png", tmp_path / "n" / "000001.png", "--out", tmp_path / "n",
                     "--rename", "--mapping", names, "--overwrite", *common)
    assert onto_input.returncode == 1 and "000001.png would replace an input" in onto_input.stderr, onto_input.stderr
    assert (tmp_path / "n" / "000001.png").read_bytes() == kept
    # a mapped input rerun into a new --out is numbered there, not skipped as the old folder's output
    moved = cli("run", "anonymize", folder / "a.png", "--out", tmp_path / "n2", "--rename", "--mapping", names, *common)
    assert moved.returncode == 0 and "1 done, 0 skipped" in moved.stderr, moved.stderr
    assert json.loads(names.read_text())[str(folder / "a.png")] == str(tmp_path / "n2" / "000003.png")
    assert (tmp_path / "n2" / "000003.png").exists() and (tmp_path / "n" / "000001.png").read_bytes() == kept
    names.write_text("not json")
    unreadable = cli("run", "anonymize", folder / "a.png", "--out", tmp_path / "n", "--rename", "--mapping", names, *common)
    assert unreadable.returncode == 2 and "cannot read the existing mapping" in unreadable.stderr
    assert names.read_text() == "not json"


def test_recompute_mask_reruns_the_masker_the_metadata_names(zero_engines, keyfile, tmp_path, no_torch_env):
    original = random_image(32, seed=12)
    src = save_png(tmp_path / "face.png", original)
    mask = save_png(tmp_path / "mask.png", box_mask(32))
    engine = ("--engine", zero_engines["zero"], "--key", keyfile)
    assert cli("run", "anonymize", src, "--out", tmp_path / "a", "--mask", mask, *engine).returncode == 0
    anonymized = tmp_path / "a" / "face.png"
    again = cli("run", "deanonymize", anonymized, "--out", tmp_path / "r", "--recompute-mask", "--mask", mask, *engine,
                env=no_torch_env)
    assert again.returncode == 0, again.stderr
    assert np.array_equal(read_rgb(tmp_path / "r" / "face.png"), original), "the same mask file gives the same M"
    assert "recomputed mask differs" not in again.stderr
    other_mask = save_png(tmp_path / "other_mask.png", np.roll(box_mask(32), 8, axis=1))
    differs = cli("run", "deanonymize", anonymized, "--out", tmp_path / "r2", "--recompute-mask", "--mask", other_mask,
                  *engine, env=no_torch_env)
    assert differs.returncode == 0 and "the recomputed mask differs from the stored one in" in differs.stderr
    assert not np.array_equal(read_rgb(tmp_path / "r2" / "face.png"), original)
    without_flags = cli("run", "deanonymize", anonymized, "--out", tmp_path / "x", "--recompute-mask", *engine)
    assert without_flags.returncode == 1 and "re-runs the 'file' masker" in without_flags.stderr
    other_masker = cli("run", "deanonymize", anonymized, "--out", tmp_path / "x", "--recompute-mask", "--mask", mask,
                       "--masker", "bisenet", *engine)
    assert other_masker.returncode == 1 and "re-runs the 'file' masker" in other_masker.stderr
    for unused_flag in (("--mask", mask), ("--parser", tmp_path / "parsing_bisenet.pth"), ("--landmarks", "68")):
        unused = cli("run", "deanonymize", anonymized, "--out", tmp_path / "x", *unused_flag, *engine)
        assert unused.returncode == 2 and "only matter with --recompute-mask" in unused.stderr
    assert not (tmp_path / "x").exists()


def test_recompute_mask_recovers_a_crop_whose_stored_mask_is_of_another_latent_grid(models, zero_engines, keyfile,
                                                                                     tmp_path):
    """Made on a 64x64 pixel-space grid, recovered on the latent model's 16x16 under --ignore-model-mismatch: the
    stored mask cannot be compared with the recomputed one, and --recompute-mask is what works around it."""
    from revanon_rt.engines import open_engine
    from revanon_rt.errors import MetadataError
    from revanon_rt.masks import FileMasker
    from revanon_rt.pipeline import Options, anonymize_image, deanonymize_image
    from revanon_rt.reference import TorchReference

    mask = save_png(tmp_path / "mask.png", box_mask(64))
    secret = Secret.from_key(read_key_file(keyfile))
    made = anonymize_image(load_image(save_png(tmp_path / "face.png", random_image(64, seed=14))), None,
                           open_engine(zero_engines["zero64"]), FileMasker(mask), secret, Options(steps=2), "face.png")
    latent = TorchReference(models["ldm"])
    stored_only = Options(ignore_model_mismatch=True)
    with pytest.raises(MetadataError, match="the stored mask is 64x64, the model's latent grid is 16x16"):
        deanonymize_image(made.image, made.header_text(), "face.png", latent, secret, stored_only, "face.png")
    recomputed = deanonymize_image(made.image, made.header_text(), "face.png", latent, secret,
                                   Options(ignore_model_mismatch=True, recompute_mask=True), "face.png",
                                   maskers={"file": FileMasker(mask)})
    assert recomputed.header["state"] == "recovered"
    assert any("model fingerprint differs" in note for note in recomputed.warnings)


def test_bad_inputs_fail_one_by_one_with_named_errors(models, zero_engines, keyfile, tmp_path):
    inputs = tmp_path / "in"
    save_png(inputs / "good.png", random_image(32, seed=7))
    save_png(inputs / "wrong_size.png", random_image(48, seed=7))
    save_png(inputs / "not_square.png", random_image(32, seed=7)[:, :20])
    (inputs / "garbage.png").write_bytes(b"definitely not a png")
    full = (inputs / "good.png").read_bytes()
    (inputs / "truncated.png").write_bytes(full[: len(full) // 2])
    (inputs / "header_only.png").write_bytes(full[:25])  # shorter than the header the 16-bit alpha check reads
    (inputs / "empty.png").write_bytes(b"")
    frames = [Image.fromarray(random_image(32, seed=s)) for s in (8, 9)]
    frames[0].save(inputs / "animated.gif", save_all=True, append_images=frames[1:])
    frames[0].save(inputs / "pages.tif", save_all=True, append_images=frames[1:])
    with open(inputs / "with_preview.tif", "w+b") as fh, TiffImagePlugin.AppendingTiffWriter(fh) as tiff:
        for page, tags in ((frames[0], {}), (frames[0].resize((8, 8)), {254: 1})):
            # NewSubfileType 1: a reduced-resolution copy, as scanners add
            page.save(tiff, format="TIFF", tiffinfo=tags)
            tiff.newFrame()
    frames[0].save(inputs / "icon.ico")  # a format the tool does not read: passed over, and said so
    # a crop whose EXIF block is cut short, as some editors leave it: Pillow warns, the crop is done
    frames[0].save(inputs / "short_exif.jpg", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12")
    mask = save_png(tmp_path / "mask.png", box_mask(32))
    before = tree_digest(inputs)
    result = cli("run", "anonymize", inputs, tmp_path / "missing.png", "--out", tmp_path / "out",
                 "--engine", zero_engines["zero"], "--mask", mask, "--key", keyfile)
    assert result.returncode == 1
    assert "3 done, 0 skipped, 9 failed" in result.stderr
    assert "warning: UserWarning: Corrupt EXIF data" in result.stderr and "warnings.warn" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 9
    assert "passed over 1 file(s) in the input folders of formats this tool does not read (.ico)" in result.stderr
    expectations = {"wrong_size.png": "48x48 is not an aligned face crop of the model's 32x32",
                    "not_square.png": "--mode photo", "garbage.png": "not an image format this tool reads",
                    "truncated.png": "cannot read the image", "header_only.png": "cannot read the image",
                    "missing.png": "no such file", "empty.png": "the file is empty (0 bytes)",
                    "animated.gif": "has 2 frames, and the output would keep only the first",
                    "pages.tif": "has 2 pages"}
    for name, message in expectations.items():
        assert any(name in line and message in line for line in lines), (name, lines)
    assert tree_digest(inputs) == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.png", "short_exif.png", "with_preview.png"]


@pytest.mark.parametrize("case", ["missing_model", "corrupt_weights", "short_key", "no_key", "mask_with_bisenet",
                                  "bisenet_without_parser", "meta_with_many_inputs", "key_and_password",
                                  "mapping_without_rename"])
def test_usage_errors_exit_2_before_any_input(models, keyfile, tmp_path, case):
    src = save_png(tmp_path / "face.png", random_image(32, seed=8))
    mask = save_png(tmp_path / "mask.png", box_mask(32))
    args = ["run", "anonymize", src, "--out", tmp_path / "out", "--model", models["zero"], "--mask", mask,
            "--key", keyfile]
    expected = {"missing_model": "no such model folder", "corrupt_weights": "cannot load the weights",
                "short_key": "short.key", "no_key": "no key", "mask_with_bisenet": "--masker bisenet",
                "bisenet_without_parser": "--parser", "meta_with_many_inputs": "--meta goes with exactly one",
                "key_and_password": "either --key or --password-file", "mapping_without_rename": "it needs --rename"}[case]
    if case == "missing_model":
        args[6] = tmp_path / "nowhere"
    elif case == "corrupt_weights":
        broken = shutil.copytree(models["zero"], tmp_path / "broken")
        weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[8:40] = b"{" * 32  # the header is no longer JSON
        weights.write_bytes(bytes(data))
        args[6] = broken
        expected = "diffusion_pytorch_model.safetensors"
    elif case == "short_key":
        (tmp_path / "short.key").write_text("abcd\n")
        args[-1] = tmp_path / "short.key"
    elif case == "no_key":
        args = args[:-2]
    elif case == "mask_with_bisenet":
        args += ["--masker", "bisenet"]
    elif case == "bisenet_without_parser":
        args = args[:7] + args[9:]
    elif case == "key_and_password":
        (tmp_path / "pw.txt").write_text("a password")
        args += ["--password-file", tmp_path / "pw.txt"]
    elif case == "mapping_without_rename":
        args += ["--mapping", tmp_path / "names.json"]
    elif case == "meta_with_many_inputs":
        args = ["run", "deanonymize", src, src.with_name("mask.png"), "--out", tmp_path / "out", "--model",
                models["zero"], "--key", keyfile, "--meta", tmp_path / "m.json"]
    result = cli(*args, input="")
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_metadata_problems_on_deanonymize(models, zero_backend, keyfile, tmp_path):
    src = save_png(tmp_path / "face.png", random_image(32, seed=10))
    mask = save_png(tmp_path / "mask.png", box_mask(32))
    anon = _anonymize_with_library(zero_backend, src, tmp_path / "anon.png", keyfile, mask)
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(src, bad / "plain.png")

    def too_many_steps(h):
        h["steps"] = 5000

    def foreign_kdf(h):
        h["kdf"] = {"name": "scrypt", "salt": "AAAAAAAAAAAAAAAAAAAAAA==", "n": 1024, "r": 1, "p": 1}
    _rewrite_metadata(anon, bad / "steps.png", too_many_steps)
    _rewrite_metadata(anon, bad / "kdf.png", foreign_kdf)
    shutil.copy(anon, bad / "other_model.png")
    info = PngImagePlugin.PngInfo()
    info.add_itxt(container.KEYWORD, "[]")
    with Image.open(anon) as im:
        im.save(bad / "list.png", pnginfo=info)
    result = cli("run", "deanonymize", bad, "--out", tmp_path / "out", "--model", models["pixel"], "--key", keyfile)
    assert result.returncode == 1 and "0 done, 0 skipped, 5 failed" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    for name, message in [("plain.png", "no revanon metadata"), ("steps.png", "steps must be an integer in 1..1000"),
                          ("list.png", "the revanon metadata is not a JSON object"),
                          ("kdf.png", "foreign scrypt parameters"), ("other_model.png", "--ignore-model-mismatch")]:
        assert any(name in line and message in line for line in result.stderr.splitlines()), (name, result.stderr)
    anyway = cli("run", "deanonymize", bad / "other_model.png", "--out", tmp_path / "out", "--model", models["pixel"],
                 "--key", keyfile, "--ignore-model-mismatch")
    assert anyway.returncode == 0 and "fingerprint differs" in anyway.stderr


def test_password_sidecar_and_meta_for_stripped_pngs(models, zero_engines, tmp_path):
    src = save_png(tmp_path / "face.png", random_image(32, seed=11))
    mask = save_png(tmp_path / "mask.png", box_mask(32))
    password = tmp_path / "pw.txt"
    password.write_text("Caf\u00e9 au lait\n", encoding="utf-8")
    anon = cli("run", "anonymize", src, "--out", tmp_path / "anon", "--engine", zero_engines["zero"], "--mask", mask,
               "--password-file", password, "--sidecar")
    assert anon.returncode == 0, anon.stderr
    sidecar = tmp_path / "anon" / "face.png.revanon.json"
    header = json.loads(sidecar.read_text())
    assert header["kdf"]["name"] == "scrypt" and header == json.loads(container.read_png_chunk(tmp_path / "anon" / "face.png"))
    stripped = tmp_path / "stripped.png"
    Image.fromarray(read_rgb(tmp_path / "anon" / "face.png")).save(stripped)  # as a platform would re-save it
    assert container.read_png_chunk(stripped) is None
    decomposed = tmp_path / "pw2.txt"
    decomposed.write_text("Cafe\u0301 au lait", encoding="utf-8")  # NFD, no newline: the same password
    rec = cli("run", "deanonymize", stripped, "--out", tmp_path / "rec", "--engine", zero_engines["zero"],
              "--password-file", decomposed, "--meta", sidecar)
    assert rec.returncode == 0, rec.stderr
    assert np.array_equal(read_rgb(tmp_path / "rec" / "stripped.png"), read_rgb(src))
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("cafe au lait")
    refused = cli("run", "deanonymize", stripped, "--out", tmp_path / "rec2", "--engine", zero_engines["zero"],
                  "--password-file", wrong, "--meta", sidecar)
    assert refused.returncode == 1 and AUTH_MESSAGE in refused.stderr
    container.sidecar_path(stripped).write_bytes(sidecar.read_bytes())
    again = cli("run", "anonymize", stripped, "--out", tmp_path / "anon2", "--engine", zero_engines["zero"],
                "--mask", mask, "--password-file", password)
    assert again.returncode == 1 and "a sidecar beside it" in again.stderr, "a stripped anonymized image is still one"


def test_insecure_key_reuse_warns_and_records_a_null_nonce(models, zero_engines, keyfile, tmp_path):
    inputs = tmp_path / "in"
    save_png(inputs / "a.png", random_image(32, seed=12))
    save_png(inputs / "b.png", random_image(32, seed=13))
    mask = save_png(tmp_path / "mask.png", np.full((32, 32), 255, np.uint8))
    result = cli("run", "anonymize", inputs, "--out", tmp_path / "out", "--engine", zero_engines["zero"], "--mask", mask,
                 "--key", keyfile, "--insecure-key-reuse")
    assert result.returncode == 0 and "WARNING: --insecure-key-reuse" in result.stderr
    assert "can undo every image" in result.stderr
    flips = []
    for name in ("a", "b"):
        assert json.loads(container.read_png_chunk(tmp_path / "out" / f"{name}.png"))["faces"][0]["nonce"] is None
        original = read_rgb(inputs / f"{name}.png").astype(int)
        anonymized = read_rgb(tmp_path / "out" / f"{name}.png").astype(int)
        # with ε ≡ 0 the anonymized pixel is the sign-flipped one: 255 - u where r = -1
        flips.append(anonymized == 255 - original)
    assert (flips[0] == flips[1]).mean() > 0.97, "one pattern for every face is what makes key reuse insecure"


def test_an_input_reached_by_a_second_path_is_never_overwritten(zero_engines, keyfile, tmp_path):
    src = save_png(tmp_path / "in" / "a.png", random_image(32, seed=21))
    original = src.read_bytes()
    (tmp_path / "view").mkdir()
    os.link(src, tmp_path / "view" / "a.png")  # as a bind mount or another letter case would reach it
    mask = save_png(tmp_path / "mask.png", box_mask(32))
    run = cli("run", "anonymize", tmp_path / "in", "--out", tmp_path / "view", "--engine", zero_engines["zero"],
              "--mask", mask, "--key", keyfile, "--overwrite")
    assert run.returncode == 1 and "would replace the input" in run.stderr, run.stderr
    assert src.read_bytes() == original


def test_names_and_metadata_that_look_like_markup_are_printed_as_they_are(zero_engines, keyfile, tmp_path):
    inputs = tmp_path / "p[" / "[/x]"
    save_png(inputs / "a.png", random_image(32, seed=22))
    save_png(inputs / "b.png", random_image(32, seed=23))
    mask = save_png(tmp_path / "mask.png", box_mask(32))
    engine = ("--engine", zero_engines["zero"], "--key", keyfile)
    names = tmp_path / "names.json"
    anon = cli("run", "anonymize", inputs, "--out", tmp_path / "anon", "--mask", mask, "--rename", "--mapping", names,
               *engine)
    assert anon.returncode == 0 and "2 done" in anon.stderr, anon.stderr
    assert sorted(json.loads(names.read_text())) == [str(inputs / "a.png"), str(inputs / "b.png")]
    assert names.stat().st_mode & 0o077 == 0, "the mapping ties people's names to outputs"
    _rewrite_metadata(tmp_path / "anon" / "000001.png", tmp_path / "edited.png", lambda h: h.update(format="[/x]"))
    os.replace(tmp_path / "edited.png", tmp_path / "anon" / "000001.png")
    rec = cli("run", "deanonymize", tmp_path / "anon", "--out", tmp_path / "rec", *engine)
    assert rec.returncode == 1 and "1 done, 0 skipped, 1 failed" in rec.stderr, rec.stderr
    assert "format '[/x]' is not revanon/1" in rec.stderr
    info = cli("info", tmp_path / "anon" / "000001.png")
    assert info.returncode == 1 and "'[/x]'" in info.stderr and "Traceback" not in info.stderr


def test_info_reads_the_sidecar_of_a_stripped_png_and_keys_readable_by_others_are_flagged(zero_engines, keyfile, tmp_path,
                                                                                            no_torch_env):
    src = save_png(tmp_path / "face.png", random_image(32, seed=24))
    mask = save_png(tmp_path / "mask.png", box_mask(32))
    shared_key = tmp_path / "shared.key"
    shared_key.write_bytes(keyfile.read_bytes())
    shared_key.chmod(0o644)
    anon = cli("run", "anonymize", src, "--out", tmp_path / "anon", "--engine", zero_engines["zero"], "--mask", mask,
               "--key", shared_key, "--sidecar")
    assert anon.returncode == 0 and "can be read by other users" in anon.stderr, anon.stderr
    stripped = tmp_path / "anon" / "face.png"
    Image.fromarray(read_rgb(stripped)).save(stripped)  # the chunk is gone, the sidecar is still beside it
    info = cli("info", stripped, env=no_torch_env)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["state"] == "anonymized"
    # anyone can write a sidecar: its text reaches the terminal escaped, a C1 control and a bidi override too
    sidecar = container.sidecar_path(stripped)
    forged = json.loads(sidecar.read_text())
    forged["note"] = "\u009b31m\u202e\x7f"
    sidecar.write_text(json.dumps(forged, ensure_ascii=False), encoding="utf-8")
    shown = cli("info", stripped, env=no_torch_env)
    assert shown.returncode == 0 and json.loads(shown.stdout)["note"] == forged["note"]
    assert not {"\u009b", "\u202e", "\x7f"} & set(shown.stdout) and shown.stdout.isascii()
    container.sidecar_path(stripped).unlink()
    missing = cli("info", stripped)
    assert missing.returncode == 1 and "no revanon metadata" in missing.stderr
    quiet = cli("run", "anonymize", src, "--out", tmp_path / "anon2", "--engine", zero_engines["zero"], "--mask", mask,
                "--key", keyfile)
    assert quiet.returncode == 0 and "can be read by other users" not in quiet.stderr


def test_recovery_uses_the_stored_step_count_null_nonce_and_sidecar_beside_the_image(models, keyfile, tmp_path):
    """A random-weight model, so the step count changes the result (with ε ≡ 0 any count round-trips);
    every expected value below is computed from the spec's plain functions, not read from the tool."""
    from revanon_rt.fingerprint import model_fingerprint
    from revanon_rt.keys import flip_pattern, flip_subkey
    from revanon_rt.masks import face_map_from_file, latent_mask, pack_mask
    from revanon_rt.pixels import to_model, to_u8
    from revanon_rt.reference import TorchReference
    from revanon_rt.sampler import transform

    original = random_image(32, seed=51)
    src = save_png(tmp_path / "in" / "face.png", original)
    mask_file = save_png(tmp_path / "mask.png", box_mask(32))
    anon = cli("run", "anonymize", src, "--out", tmp_path / "anon", "--model", models["pixel"], "--mask", mask_file,
               "--key", keyfile, "--steps", "7", "--insecure-key-reuse", "--sidecar")
    assert anon.returncode == 0, anon.stderr
    anonymized_path = tmp_path / "anon" / "face.png"
    header = json.loads(container.read_png_chunk(anonymized_path))
    mask = latent_mask(face_map_from_file(mask_file), (32, 32))
    assert {k: v for k, v in header.items() if k != "auth"} == {  # spec §7, crop mode
        "format": "revanon/1", "state": "anonymized", "steps": 7, "mode": "crop", "masker": "file",
        "model": {"fingerprint": model_fingerprint(models["pixel"]), "image_size": 32}, "kdf": {"name": "raw"},
        "faces": [{"box": [0, 0, 32, 32], "affine": [[1, 0, 0], [0, 1, 0]], "nonce": None, "mask": pack_mask(mask)}]}

    reference = TorchReference(models["pixel"])
    m = mask[None, None].astype(np.float32)
    pattern = flip_pattern(flip_subkey(read_key_file(keyfile)), bytes(16), (3, 32, 32))[None]  # null nonce: zeros

    def spec_transform(rgb, steps):
        return to_u8(transform(reference, to_model(rgb[None]), m, pattern, reference.schedule(steps)))[0]

    anonymized = read_rgb(anonymized_path)
    assert np.array_equal(anonymized, spec_transform(original, 7))
    Image.fromarray(anonymized).save(anonymized_path)  # chunk stripped; the sidecar stays beside it
    assert container.read_png_chunk(anonymized_path) is None
    rec = cli("run", "deanonymize", anonymized_path, "--out", tmp_path / "rec", "--model", models["pixel"],
              "--key", keyfile)
    assert rec.returncode == 0, rec.stderr
    assert "made with --insecure-key-reuse (its nonce is null)" in rec.stderr and "treat the key as exposed" in rec.stderr
    shown = cli("info", anonymized_path)
    assert shown.returncode == 0 and "key reused (--insecure-key-reuse" in shown.stderr
    assert "no auth tag" not in shown.stderr
    recovered = read_rgb(tmp_path / "rec" / "face.png")
    assert np.array_equal(recovered, spec_transform(anonymized, 7))
    assert not np.array_equal(recovered, spec_transform(anonymized, 50)), "the count must matter on this model"
    recovered_header = json.loads(container.read_png_chunk(tmp_path / "rec" / "face.png"))
    assert recovered_header == {**{k: v for k, v in header.items() if k != "auth"}, "state": "recovered"}


def test_authentic_metadata_that_does_not_fit_the_model_or_mode_is_refused_per_image(zero_engines, zero_backend,
                                                                                      keyfile, tmp_path):
    """Headers signed with the right key (so the auth check passes) whose records cannot be applied."""
    from revanon_rt.keys import mac_subkey
    from revanon_rt.masks import pack_mask

    src = save_png(tmp_path / "face.png", random_image(32, seed=13))
    mask = save_png(tmp_path / "mask.png", box_mask(32))
    anon = _anonymize_with_library(zero_backend, src, tmp_path / "anon.png", keyfile, mask)
    k_mac = mac_subkey(read_key_file(keyfile))
    rgb = read_rgb(anon)

    def signed(name, edit):
        def resign(header):
            edit(header)
            header["auth"] = container.compute_auth(k_mac, {k: v for k, v in header.items() if k != "auth"}, rgb)
        return _rewrite_metadata(anon, tmp_path / "bad" / name, resign)

    (tmp_path / "bad").mkdir()
    signed("small_mask.png", lambda h: h["faces"][0].update(mask=pack_mask(np.ones((4, 4), np.uint8))))
    signed("two_faces.png", lambda h: h.update(faces=h["faces"] * 2))
    signed("other_size.png", lambda h: h["model"].update(image_size=64))
    signed("flat_affine.png", lambda h: (h.update(mode="photo"), h["faces"][0].update(affine=[[1, 2, 0], [2, 4, 0]])))
    # whole images whose size is wrong: each is told why, not to resize it or to use --mode photo
    header = container.read_png_chunk(anon)
    for name, side, text in (("resized.png", 48, header), ("broken_record.png", 40, header[:-1]),
                             ("other_model.png", 64, json.dumps({**json.loads(header), "model": {
                                 **json.loads(header)["model"], "image_size": 64}}))):
        info = PngImagePlugin.PngInfo()
        info.add_itxt("revanon", text, zip=False)
        Image.fromarray(rgb).resize((side, side)).save(tmp_path / "bad" / name, pnginfo=info)
    result = cli("run", "deanonymize", tmp_path / "bad", "--out", tmp_path / "out", "--engine", zero_engines["zero"],
                 "--key", keyfile)
    assert result.returncode == 1 and "0 done, 0 skipped, 7 failed" in result.stderr, result.stderr
    assert "--mode photo" not in result.stderr
    for name, message in [("small_mask.png", "the stored mask is 4x4, the model's latent grid is 32x32"),
                          ("two_faces.png", "exactly one face record"),
                          ("other_size.png", "made for 64px crops, this model works at 32px"),
                          ("flat_affine.png", "the affine is not invertible"),
                          ("resized.png", "48x48, but its record is of a 32x32 crop: the image was resized"),
                          ("broken_record.png", "the revanon metadata is not valid JSON"),
                          ("other_model.png", "made for 64px crops, this model works at 32px")]:
        assert any(name in line and message in line for line in result.stderr.splitlines()), (name, result.stderr)
    photo = cli("run", "deanonymize", tmp_path / "bad" / "flat_affine.png", "--out", tmp_path / "out",
                "--engine", zero_engines["zero"], "--key", keyfile, "--recompute-mask", "--mask", mask)
    assert photo.returncode == 1 and "--recompute-mask works on crops" in photo.stderr
    assert not (tmp_path / "out").exists()


def test_a_mask_folder_mirrors_the_inputs(zero_engines, keyfile, tmp_path):
    from revanon_rt.masks import face_map_from_file, latent_mask

    """With a batch-2 engine, so that a bad mask shares its group with good ones: it fails alone."""
    inputs, masks = tmp_path / "in", tmp_path / "masks"
    for relative, seed in (("a.png", 14), ("sub/b.png", 15), ("c.png", 16), ("d.png", 17)):
        save_png(inputs / relative, random_image(32, seed=seed))
    save_png(masks / "a.png", box_mask(32, 0.25, 0.5))
    # a.jpg beside a.png: each has a mask of its own name
    Image.fromarray(random_image(32, seed=18)).save(inputs / "a.jpg", quality=95)
    Image.fromarray(box_mask(32, 0.1, 0.3)).save(masks / "a.jpg", quality=100)
    (masks / "sub").mkdir(parents=True)
    Image.fromarray(box_mask(32, 0.5, 0.9)).save(masks / "sub" / "b.PNG")  # any listed extension, either case
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    bomb = chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 20000, 8, 0, 0, 0, 0))  # 800 Mpixel grey, 58 bytes
    (masks / "d.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bomb + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    result = cli("run", "anonymize", inputs, "--out", tmp_path / "anon", "--engine", zero_engines["zero"],
                 "--mask", masks, "--key", keyfile)
    assert result.returncode == 1 and "3 done, 0 skipped, 2 failed" in result.stderr, result.stderr
    assert "c.png: no mask for it under" in result.stderr and "d.png: the mask's pixel count is over" in result.stderr
    table = [line.split()[0] for line in result.stderr.splitlines() if line.strip().endswith(("done", "failed"))
             or " failed " in line or " done " in line]
    assert [name for name in table if name.endswith(".png")] == ["a.png", "c.png", "d.png", "sub/b.png"], table
    for relative, mask_file in (("a.png", masks / "a.png"), ("a.jpg.png", masks / "a.jpg"),
                                ("sub/b.png", masks / "sub" / "b.PNG")):
        face = json.loads(container.read_png_chunk(tmp_path / "anon" / relative))["faces"][0]
        assert np.array_equal(unpack_mask(face["mask"], relative), latent_mask(face_map_from_file(mask_file), (32, 32)))


def _on_a_terminal(*args, answers: tuple = ()) -> tuple[int, str]:
    """The CLI with a terminal for its standard input, as a user at a shell has. Each answer is typed once its
    prompt shows and the terminal's echo is off: click prints the prompt before getpass turns echo off, and
    getpass discards whatever was typed before that."""
    terminal, its_side = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "revanon_rt", *map(str, args)], stdin=its_side,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200"))
    seen = bytearray()

    def read():
        for byte in iter(lambda: proc.stdout.read(1), b""):
            seen.extend(byte)

    def prompts() -> int:
        return seen.count(b"Password") + seen.count(b"Repeat for confirmation")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        for number, answer in enumerate(answers, 1):
            deadline = time.monotonic() + 120
            while ((prompts() < number or termios.tcgetattr(its_side)[3] & termios.ECHO)
                   and proc.poll() is None and time.monotonic() < deadline):
                time.sleep(0.05)
            os.write(terminal, answer.encode() + b"\n")
        proc.wait(timeout=300)
        reader.join(timeout=30)
    finally:
        proc.kill()
        os.close(terminal)
        os.close(its_side)
    return proc.returncode, seen.decode(errors="replace")


def test_the_password_is_asked_for_after_every_other_check(zero_engines, tmp_path):
    face = save_png(tmp_path / "face.png", random_image(32, seed=13))
    mask = save_png(tmp_path / "mask.png", box_mask(32))
    code, output = _on_a_terminal("run", "anonymize", face, "--out", tmp_path / "a", "--engine", tmp_path / "nope",
                                  "--mask", mask)
    assert code == 2 and "Password" not in output and "nope" in output, output
    code, output = _on_a_terminal("run", "anonymize", face, "--out", tmp_path / "a", "--engine", zero_engines["zero"],
                                  "--mask", mask, answers=("correct horse", "correct horse"))
    assert code == 0 and "Password" in output and "1 done" in output, output
    code, output = _on_a_terminal("run", "deanonymize", tmp_path / "a" / "face.png", "--out", tmp_path / "r",
                                  "--engine", zero_engines["zero"], answers=("correct horse",))
    assert code == 0 and "1 done" in output, output
    assert np.array_equal(read_rgb(tmp_path / "r" / "face.png"), read_rgb(face))


def test_flag_mistakes_get_messages_that_say_what_to_do(models, zero_engines, keyfile, tmp_path):
    face = save_png(tmp_path / "in" / "face.png", random_image(32, seed=19))
    mask = save_png(tmp_path / "mask.png", box_mask(32))
    run = ("run", "anonymize", face, "--out", tmp_path / "out", "--mask", mask)
    parser_ignored = cli(*run, "--engine", zero_engines["zero"], "--key", keyfile, "--parser", tmp_path / "p.pth")
    assert parser_ignored.returncode == 2 and "--parser goes with --model" in parser_ignored.stderr
    both = cli(*run, "--engine", zero_engines["zero"], "--model", models["zero"], "--key", keyfile)
    assert both.returncode == 2 and "not both" in both.stderr
    images_as_engine = cli(*run, "--engine", tmp_path / "in", "--key", keyfile)
    assert images_as_engine.returncode == 2 and "not an engine folder" in images_as_engine.stderr
    assert "--overwrite" not in images_as_engine.stderr, "never advise overwriting a folder of images"
    folder_as_key = cli(*run, "--engine", zero_engines["zero"], "--key", tmp_path / "in")
    assert folder_as_key.returncode == 2 and "chmod" not in folder_as_key.stderr, folder_as_key.stderr
    no_meta = cli("run", "deanonymize", face, "--out", tmp_path / "r", "--engine", zero_engines["zero"],
                  "--key", keyfile, "--meta", tmp_path / "nope.json")
    assert no_meta.returncode == 2 and "--meta" in no_meta.stderr and "no such file" in no_meta.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "r").exists()
