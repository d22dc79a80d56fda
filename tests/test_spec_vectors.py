"""revanon v1 test vectors (spec §2, §3, §5, §7): the fixed bytes every implementation must produce."""

import json

import numpy as np
import pytest

from conftest import SHARED
from revanon_rt import container, keys, pixels
from revanon_rt.encoding import b64encode, canonical_json
from revanon_rt.fingerprint import model_fingerprint
from revanon_rt.schedule import NoiseSchedule

K = bytes(range(32))


@pytest.fixture(scope="module")
def vectors():
    return json.loads((SHARED / "spec" / "vectors.json").read_text())


def test_subkeys_written_into_the_test():
    assert keys.flip_subkey(K).hex() == "af1d0124ccd87040562383946a5caafdc04877ef755fe23150c999166d5ac5a6"
    assert keys.mac_subkey(K).hex() == "7fa8769dfdbb99bad6e3917e7cfc275758d7c8673d6826555f6ba563bcf07893"


def test_flip_stream_and_pattern_byte_for_byte():
    nonce = bytes.fromhex("6465666768696a6b6c6d6e6f70717273")
    k_flip = keys.flip_subkey(K)
    assert keys.flip_stream(k_flip, nonce, (3, 4, 4), 6).hex() == "692b96620f9d"
    expected = [1, -1, -1, 1, -1, 1, 1, -1, 1, 1, -1, 1, -1, 1, -1, -1, -1, 1, 1, -1, 1, -1, -1, 1,
                -1, 1, -1, -1, -1, 1, 1, -1, 1, 1, 1, 1, -1, -1, -1, -1, 1, -1, 1, 1, 1, -1, -1, 1]
    r = keys.flip_pattern(k_flip, nonce, (3, 4, 4))
    assert r.dtype == np.float32 and r.shape == (3, 4, 4)
    assert r.ravel().tolist() == expected


def test_flip_vector_file(vectors):
    v = vectors["flip [5]"]
    r = keys.flip_pattern(keys.flip_subkey(bytes.fromhex(v["K"])), bytes.fromhex(v["nonce"]), tuple(v["shape"]))
    assert r.ravel().astype(int).tolist() == v["r_c_order"]


def test_one_bit_key_change_flips_about_half_and_nonce_changes_pattern():
    shape = (3, 64, 64)
    nonce = bytes(16)
    base = keys.flip_pattern(keys.flip_subkey(K), nonce, shape)
    flipped_key = bytes([K[0] ^ 1]) + K[1:]
    other = keys.flip_pattern(keys.flip_subkey(flipped_key), nonce, shape)
    frac = float((base != other).mean())
    assert 0.48 < frac < 0.52, frac
    new_nonce = keys.flip_pattern(keys.flip_subkey(K), bytes([1]) + bytes(15), shape)
    assert 0.48 < float((base != new_nonce).mean()) < 0.52
    assert 0.48 < float((base > 0).mean()) < 0.52


def test_scrypt_nfc_vector(vectors):
    v = vectors["scrypt [5]"]
    typed = bytes.fromhex(v["password_typed_utf8"]).decode("utf-8")
    assert keys.normalize_password(typed).hex() == v["nfc_utf8"]
    assert keys.scrypt_key(typed, bytes.fromhex(v["salt"])).hex() == v["K"]
    assert (v["n"], v["r"], v["p"], v["dklen"]) == (keys.SCRYPT_N, keys.SCRYPT_R, keys.SCRYPT_P, keys.KEY_BYTES)


def test_auth_vector(vectors):
    v = vectors["auth [7]"]
    header = v["header"]
    assert canonical_json(header).decode("utf-8") == v["canonical_header_utf8"]
    rgb = np.array(v["pixels_hwc_uint8"], dtype=np.uint8)
    assert container.compute_auth(keys.mac_subkey(bytes.fromhex(v["K"])), header, rgb) == v["auth_b64"]


def test_pixel_vector(vectors):
    v = vectors["pixels [2]"]
    u8 = np.array(v["u8_hwc"], dtype=np.uint8)
    x = pixels.to_model(u8)
    assert x.dtype == np.float32
    assert x.ravel().tolist() == np.array(v["x_float32_chw_flattened"], dtype=np.float32).tolist()
    assert pixels.to_u8(x).ravel().tolist() == v["back_to_u8_hwc_flattened"]


def test_rounding_is_half_to_even():
    """Find float32 inputs whose scaled value is exactly k + 0.5: each must round to the even neighbour."""
    candidates = np.float32(-1) + np.arange(0, 256, dtype=np.float32) / np.float32(127.5) + np.float32(1 / 255)
    scaled = (candidates + np.float32(1)) * np.float32(127.5)
    exact_halves = candidates[((scaled - np.floor(scaled)) == np.float32(0.5)) & (candidates <= 1)]
    assert len(exact_halves) > 10
    got = pixels.to_u8(np.repeat(exact_halves.reshape(1, 1, -1), 3, axis=0))[..., 0].ravel().astype(int)
    halves = ((exact_halves + np.float32(1)) * np.float32(127.5)).astype(np.float64)
    assert all(g % 2 == 0 and abs(g - h) == 0.5 for g, h in zip(got, halves))


def test_schedule_vector(vectors):
    from diffusers import DDIMScheduler

    v = vectors["schedule [3]"]
    config = json.loads((SHARED / "spec" / "compvis-ldm-celebahq-256" / "scheduler_config.json").read_text())
    scheduler = DDIMScheduler.from_config({k: val for k, val in config.items() if not k.startswith("_")})
    noise = NoiseSchedule(scheduler.alphas_cumprod.numpy(), scheduler.config.timestep_spacing,
                          scheduler.config.steps_offset)
    sched = noise.for_steps(v["S"])
    assert list(sched.timesteps[:3]) == v["timesteps_first_3"]
    assert list(sched.timesteps[-3:]) == v["timesteps_last_3"]
    for t, abar in v["abar"].items():
        assert noise.alphas_cumprod[int(t)] == np.float32(abar)
    assert sched.levels[-1] == np.float32(1.0) and len(sched.levels) == v["S"] + 1


def test_fingerprint_vector(vectors):
    v = vectors["fingerprint [7]"]
    assert model_fingerprint(SHARED / "spec" / "fingerprint-example") == v["fingerprint"]


def test_fingerprint_survives_bin_to_safetensors(tmp_path, models):
    """Same tensors stored as .bin or .safetensors give the same fingerprint; any change alters it."""
    import shutil

    import torch
    from safetensors.torch import load_file

    as_bin = tmp_path / "as_bin"
    shutil.copytree(models["pixel"], as_bin)
    weights = as_bin / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), as_bin / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    assert model_fingerprint(as_bin) == model_fingerprint(models["pixel"])
    both = tmp_path / "both"
    shutil.copytree(models["pixel"], both)
    torch.save({"stale": torch.ones(3)}, both / "unet" / "diffusion_pytorch_model.bin")
    assert model_fingerprint(both) == model_fingerprint(models["pixel"]), "*.bin counts only without safetensors"
    config = json.loads((as_bin / "unet" / "config.json").read_text())
    config["_diffusers_version"] = "9.9.9"  # keys starting with _ do not count
    (as_bin / "unet" / "config.json").write_text(json.dumps(config))
    assert model_fingerprint(as_bin) == model_fingerprint(models["pixel"])
    config["norm_eps"] = 1e-6
    (as_bin / "unet" / "config.json").write_text(json.dumps(config))
    assert model_fingerprint(as_bin) != model_fingerprint(models["pixel"])


def test_b64_is_standard_with_padding():
    assert b64encode(b"\xff\xfe") == "//4="
