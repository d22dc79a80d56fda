"""What sharing inversions saves in `revanon-rt eval`'s transform stage, on one batch of LFW dev crops.

Runs the evaluation's conditions two ways on the same batch and the same keys:
- separate: every condition is its own transform (encode, invert, flip, denoise), and the attacker's
  estimates and the attacks invert their inputs again, as the evaluation did before;
- shared: evaluate.transform_conditions, which inverts each image once for every key that starts from it.
Counts the UNet calls and image-steps, times both (alternating, so that a drifting machine hits both
alike), and checks that the outputs are identical.

    python bench/eval_sharing.py --engine DIR [--count 16] [--steps 5] [--repeats 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LFW_DEV_CROPS, machine, write_results  # noqa: E402


def separate_conditions(backend, rgbs, masks, nonces, keys, steps, batch):
    """The evaluation's conditions as independent transforms over the same batches."""
    from revanon_rt.evaluate import known_plaintext_estimates
    from revanon_rt.keys import ZERO_NONCE, flip_subkey
    from revanon_rt.pipeline import transform_crops
    from revanon_rt.pixels import to_model, to_u8
    from revanon_rt.sampler import inverted, transform

    n = len(rgbs)
    batches = [slice(i, i + batch) for i in range(0, n, batch)]
    schedule = backend.schedule(steps)

    def each(inputs, key, nonce_list):
        return np.concatenate([transform_crops(backend, inputs[b], masks[b], nonce_list[b], flip_subkey(key), steps)
                               for b in batches])

    def z_t(inputs):
        return np.concatenate([inverted(backend, to_model(inputs[b]), schedule)[-1] for b in batches])

    out = {"anonymized": each(rgbs, keys["key"], nonces)}
    for name, key_name in (("recovered", "key"), ("random_key", "random_key"), ("one_bit_key", "one_bit_key")):
        out[name] = each(out["anonymized"], keys[key_name], nonces)
    reuse = each(rgbs, keys["key"], [ZERO_NONCE] * n)
    z_orig = z_t(rgbs)
    for condition, victims in (("attack_nonce", out["anonymized"]), ("attack_reuse", reuse)):
        z_victims = z_t(victims)
        estimates = known_plaintext_estimates(z_victims, z_orig, masks, [(i + 1) % n for i in range(n)])
        out[condition] = np.concatenate([
            to_u8(transform(backend, to_model(victims[b]), masks[b][:, None], estimates[b], schedule))
            for b in batches])
    return out


class CountingBackend:
    """The backend, with its UNet calls and the images they carried counted."""

    def __init__(self, backend):
        self.inner, self.calls, self.image_steps = backend, 0, 0

    def eps(self, z, t):
        self.calls += 1
        self.image_steps += z.shape[0]
        return self.inner.eps(z, t)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", type=Path, required=True)
    parser.add_argument("--images", type=Path, default=LFW_DEV_CROPS)
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--name", default="eval-sharing-cpu")
    args = parser.parse_args()

    from revanon_rt.engines import open_engine
    from revanon_rt.evaluate import ZipImages, transform_conditions
    from revanon_rt.faces import template_region
    from revanon_rt.masks import latent_mask

    backend = open_engine(args.engine, device="cpu")
    images = ZipImages(args.images, backend.image_size)
    names = sorted(n for n in images.names if n.lower().endswith((".jpg", ".png")))[: args.count]
    rgbs = np.stack([images(n) for n in names])
    c, h, w = backend.latent_shape
    masks = np.repeat(latent_mask(template_region(backend.image_size), (h, w))[None], len(rgbs), axis=0)
    nonces = [bytes([i + 1]) * 16 for i in range(len(rgbs))]
    key = bytes(range(32))
    keys = {"key": key, "random_key": bytes([7]) * 32, "one_bit_key": bytes([key[0] ^ 1]) + key[1:]}

    ways = {"separate": lambda b: separate_conditions(b, rgbs, masks, nonces, keys, args.steps, args.batch),
            "shared": lambda b: transform_conditions(b, rgbs, masks, nonces, keys, args.steps, args.batch)[0]}
    seconds = {way: [] for way in ways}
    counts, outputs = {}, {}
    for _ in range(args.repeats):
        for way, run in ways.items():
            counting = CountingBackend(backend)
            start = time.perf_counter()
            outputs[way] = run(counting)
            seconds[way].append(time.perf_counter() - start)
            counts[way] = {"unet_calls": counting.calls, "unet_image_steps": counting.image_steps}
    identical = all(np.array_equal(outputs["separate"][k], outputs["shared"][k]) for k in outputs["separate"])
    if not identical:
        raise SystemExit("shared and separate conditions differ: the sharing is wrong")

    per_image = {way: counts[way]["unet_image_steps"] / len(rgbs) / args.steps for way in ways}
    data = {"machine": machine(), "engine": str(args.engine), "images": len(rgbs), "batch": args.batch,
            "steps": args.steps, "repeats": args.repeats, "identical_outputs": identical, "counts": counts,
            "unet_image_steps_per_image_per_step": per_image,
            "seconds": {way: {"runs": s, "median": float(np.median(s))} for way, s in seconds.items()}}
    ratio = data["seconds"]["shared"]["median"] / data["seconds"]["separate"]["median"]
    data["shared_over_separate_time"] = ratio
    lines = [f"# Shared inversions in the evaluation: {args.engine.name}", "",
             f"{len(rgbs)} LFW dev crops, batch {args.batch}, {args.steps} steps, {args.repeats} alternating runs "
             f"each, on {data['machine']['cpu']} ({data['machine']['cores']} cores). Outputs identical: {identical}.", "",
             "| conditions | UNet calls | UNet image-steps per image per step | median s |", "|---|---:|---:|---:|"]
    for way in ways:
        lines.append(f"| {way} | {counts[way]['unet_calls']} | {per_image[way]:.0f} | {data['seconds'][way]['median']:.1f} |")
    lines += ["", f"Shared takes {ratio:.0%} of the separate time.", ""]
    write_results(args.name, data, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
