"""The loop math (spec §3, §6) against exact identities and an independent computation."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

from conftest import crops_zip, random_image
from revanon_rt import keys
from revanon_rt.pipeline import transform_crops
from revanon_rt.pixels import to_model
from revanon_rt.reference import TorchReference
from revanon_rt.sampler import denoise, invert, keyed_flip, transform
from revanon_rt.tiny import COMPVIS_SCHEDULER


@pytest.fixture(scope="module")
def zero_backend(models):
    return TorchReference(models["zero"])


@pytest.fixture(scope="module")
def pixel_backend(models):
    return TorchReference(models["pixel"])


def test_zero_eps_round_trip_is_exact(zero_backend):
    """With ε ≡ 0 the two loops are exact inverses: within float rounding before quantization,
    bit-exact after it, and nothing outside the mask moves."""
    rgb = random_image(32, seed=5)[None]
    mask = np.zeros((1, 32, 32), np.uint8)
    mask[:, 4:28, 6:26] = 1
    k_flip = keys.flip_subkey(bytes(range(32)))
    nonce = bytes(range(16))
    x = to_model(rgb)
    pattern = keys.flip_pattern(k_flip, nonce, (3, 32, 32))[None]
    m = mask[:, None].astype(np.float32)
    sched = zero_backend.schedule(50)
    x_anon = transform(zero_backend, x, m, pattern, sched)
    x_back = transform(zero_backend, x_anon, m, pattern, sched)
    assert np.max(np.abs(x_back - x)) < 1e-5
    anon = transform_crops(zero_backend, rgb, mask, [nonce], k_flip, 50)
    back = transform_crops(zero_backend, anon, mask, [nonce], k_flip, 50)
    assert np.array_equal(back, rgb)
    outside = mask[0] == 0
    assert np.array_equal(anon[0][outside], rgb[0][outside])
    assert (anon[0][~outside] != rgb[0][~outside]).mean() > 0.3


def test_denoise_consumes_the_kept_latents(pixel_backend):
    sched = pixel_backend.schedule(10)
    z0 = to_model(random_image(32, seed=1)[None])
    keep = invert(pixel_backend.eps, z0, sched)
    assert len(keep) == 11 and keep[0] is z0
    z_T = keep.pop()
    denoise(pixel_backend.eps, z_T, sched, np.ones((1, 1, 32, 32), np.float32), keep)
    assert keep == []


def _independent_trajectory(model_dir, x, mask, pattern, steps):
    """The spec's transform computed another way: torch tensors, diffusers' own DDIMScheduler.step
    for denoising, and inversion indexed by prev = t - 1000 // S."""
    unet = UNet2DModel.from_pretrained(model_dir, subfolder="unet").eval()
    scheduler = DDIMScheduler.from_config({k: v for k, v in COMPVIS_SCHEDULER.items() if not k.startswith("_")})
    scheduler.set_timesteps(steps)
    abar = scheduler.alphas_cumprod
    ratio = 1000 // steps
    z = torch.from_numpy(x)
    kept = {0: z}
    with torch.no_grad():
        for n, t in enumerate(reversed(scheduler.timesteps.tolist())):
            a_from = abar[t - ratio] if t - ratio >= 0 else torch.tensor(1.0)
            a_to = abar[t]
            eps = unet(z, torch.tensor([t])).sample
            x0 = (z - (1 - a_from) ** 0.5 * eps) / a_from ** 0.5
            z = a_to ** 0.5 * x0 + (1 - a_to) ** 0.5 * eps
            kept[n + 1] = z
        m = torch.from_numpy(mask)
        z = m * (torch.from_numpy(pattern) * z) + (1 - m) * z
        for i, t in enumerate(scheduler.timesteps.tolist()):
            eps = unet(z, torch.tensor([t])).sample
            z = scheduler.step(eps, t, z, eta=0.0).prev_sample
            z = m * z + (1 - m) * kept[steps - 1 - i]
    return kept, z.numpy()


def _relative_error(a, b):
    """Float paths differ (tensor pow vs numpy sqrt), so compare as the spec's verify does: L2 ratio."""
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_trajectory_matches_an_independent_computation(models, pixel_backend):
    steps = 20
    x = to_model(random_image(32, seed=2)[None])
    mask = np.zeros((1, 1, 32, 32), np.float32)
    mask[..., 8:24, 4:30] = 1
    pattern = keys.flip_pattern(keys.flip_subkey(bytes(32)), bytes(16), (3, 32, 32))[None]
    kept_ref, z_ref = _independent_trajectory(models["pixel"], x, mask, pattern, steps)

    sched = pixel_backend.schedule(steps)
    keep = invert(pixel_backend.eps, x, sched)
    # verify's bar. This random UNet amplifies float32 rounding: on an AMD EPYC both float32 paths end
    # 1e-5 from a float64 run after 20 steps, while evaluating ε at t - 1 instead of t is 2e-3 off at step 1
    for i in range(steps + 1):
        assert _relative_error(keep[i], kept_ref[i].numpy()) < 1e-4, f"keep[{i}]"
    z = denoise(pixel_backend.eps, keyed_flip(keep.pop(), mask, pattern), sched, mask, keep)
    assert _relative_error(z, z_ref) < 1e-4
    # the ε of this random model is far from zero: the check above is not vacuous
    assert np.abs(z - x).max() > 0.05


def test_batch_equals_one_at_a_time(pixel_backend):
    rgbs = np.stack([random_image(32, seed=s) for s in (7, 8)])
    masks = np.ones((2, 32, 32), np.uint8)
    nonces = [bytes([1] * 16), bytes([2] * 16)]
    k = keys.flip_subkey(bytes(32))
    both = transform_crops(pixel_backend, rgbs, masks, nonces, k, 5)
    one = transform_crops(pixel_backend, rgbs[1:], masks[1:], nonces[1:], k, 5)
    assert np.abs(both[1].astype(int) - one[0].astype(int)).max() <= 1


def test_sampled_faces_match_diffusers_ddim_with_clip_sample(models, pixel_backend):
    """Generating demo faces bounds x0 as diffusers' clip_sample does (with the ε that the bounded x0
    implies, so the trajectory stays consistent); the transform itself never clips."""
    from revanon_rt.pixels import to_u8
    from revanon_rt.train import sample_faces

    unet = UNet2DModel.from_pretrained(models["pixel"], subfolder="unet").eval()
    config = {k: v for k, v in COMPVIS_SCHEDULER.items() if not k.startswith("_")}
    scheduler = DDIMScheduler.from_config({**config, "clip_sample": True, "clip_sample_range": 1.0})
    scheduler.set_timesteps(10)
    z = torch.from_numpy(np.random.default_rng(4).standard_normal((2, 3, 32, 32)).astype(np.float32))
    with torch.no_grad():
        for t in scheduler.timesteps.tolist():
            z = scheduler.step(unet(z, torch.tensor([t])).sample, t, z, eta=0.0,
                               use_clipped_model_output=True).prev_sample
    expected = to_u8(z.numpy())
    faces = sample_faces(pixel_backend, 2, steps=10, seed=4)
    assert np.abs(faces.astype(int) - expected).max() <= 1 and (faces == expected).mean() > 0.99
    unclipped = sample_faces(pixel_backend, 2, steps=10, seed=4, clip=False)
    assert not np.array_equal(unclipped, faces)


def test_eval_shares_inversions_without_changing_a_bit(pixel_backend):
    """The evaluation inverts each image once for every key that starts from it. Its outputs must be the
    bits that separate transforms over the same batches give, the attacks' included."""
    from revanon_rt.evaluate import transform_conditions
    from revanon_rt.pixels import to_u8

    n, batch, steps = 5, 2, 4  # three batches, the last one short
    rgbs = np.stack([random_image(32, seed=s) for s in range(n)])
    masks = np.zeros((n, 32, 32), np.uint8)
    masks[:, 6:26, 8:24] = 1
    nonces = [bytes([s + 1] * 16) for s in range(n)]
    key = bytes(range(32))
    keyring = {"key": key, "random_key": bytes([9] * 32), "one_bit_key": bytes([key[0] ^ 1]) + key[1:]}
    out, z_orig, z_anon = transform_conditions(pixel_backend, rgbs, masks, nonces, keyring, steps, batch)

    batches = [slice(i, i + batch) for i in range(0, n, batch)]
    sched = pixel_backend.schedule(steps)

    def separately(inputs, k, nonce_list):
        return np.concatenate([transform_crops(pixel_backend, inputs[b], masks[b], nonce_list[b], keys.flip_subkey(k), steps)
                               for b in batches])

    def z_t(inputs):
        return np.concatenate([invert(pixel_backend.eps, pixel_backend.encode(to_model(inputs[b])), sched)[-1] for b in batches])

    anonymized = separately(rgbs, key, nonces)
    reuse = separately(rgbs, key, [keys.ZERO_NONCE] * n)
    np.testing.assert_array_equal(out["anonymized"], anonymized)
    for condition, key_name in (("recovered", "key"), ("random_key", "random_key"), ("one_bit_key", "one_bit_key")):
        np.testing.assert_array_equal(out[condition], separately(anonymized, keyring[key_name], nonces), condition)
    np.testing.assert_array_equal(z_orig, z_t(rgbs))
    np.testing.assert_array_equal(z_anon, z_t(anonymized))
    for condition, victims in (("attack_nonce", anonymized), ("attack_reuse", reuse)):
        z_victims = z_t(victims)
        partner = [(i + 1) % n for i in range(n)]
        estimates = np.stack([np.where(masks[a][None] > 0, np.sign(z_victims[a]) * np.sign(z_orig[a]), 1.0)
                              for a in partner]).astype(np.float32)
        expected = np.concatenate([to_u8(transform(pixel_backend, to_model(victims[b]), masks[b][:, None], estimates[b], sched))
                                   for b in batches])
        np.testing.assert_array_equal(out[condition], expected, condition)
    # a random model: the transforms move pixels, so the equalities above are not between copies
    assert np.abs(out["anonymized"].astype(int) - rgbs).max() > 20
    assert np.abs(out["random_key"].astype(int) - out["recovered"]).max() > 20


def test_eval_linkage_pool_is_inverted_once_per_run(pixel_backend, tmp_path):
    """Every chunk of an evaluation ranks against one pool of candidate originals, whose inversions
    are kept in the run's folder: reused while backend, model and steps match, and redone otherwise."""
    import io

    from revanon_rt.evaluate import ZipImages, _pool_latents, linkage_pool

    archive = crops_zip(tmp_path / "crops.zip", {f"P{i % 3}/P{i % 3}_{i:04d}.png": random_image(32, seed=90 + i)
                                                  for i in range(7)})
    images = ZipImages(archive, 32)
    pool = linkage_pool(images, 4, seed=0)
    assert pool == sorted(images.names), "a zip smaller than the draw is the whole pool"

    def independent(steps):
        sched = pixel_backend.schedule(steps)
        rgbs = np.stack([images(n) for n in pool])
        return np.concatenate([invert(pixel_backend.eps, pixel_backend.encode(to_model(rgbs[i:i + 3])), sched)[-1]
                               for i in range(0, len(pool), 3)])

    cache, ticks = tmp_path / "run" / "linkage-pool.npz", []
    first = _pool_latents(pixel_backend, images, pool, 3, 3, cache, lambda phase, n: ticks.append(n))
    np.testing.assert_array_equal(first, independent(3))
    assert ticks == [0, 3, 3, 1] and cache.exists()

    with np.load(cache) as stored:
        key = str(stored["key"])
    planted = np.full_like(first, 7.0)
    buffer = io.BytesIO()
    np.savez(buffer, key=key, z_T=planted)
    cache.write_bytes(buffer.getvalue())
    np.testing.assert_array_equal(_pool_latents(pixel_backend, images, pool, 3, 3, cache, lambda p, n: None), planted)

    other_steps = _pool_latents(pixel_backend, images, pool, 2, 3, cache, lambda p, n: None)
    np.testing.assert_array_equal(other_steps, independent(2))
    assert not np.array_equal(other_steps, first)
