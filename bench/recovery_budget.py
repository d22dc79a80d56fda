"""Where crop-mode recovery loses fidelity, for one model, on aligned LFW dev crops.

Each row removes one source of error, so that the gaps between rows are the losses:
- reconstruction: invert and denoise with no flip (the DDIM discretization and model error alone);
- recovery in float: anonymize and recover without rounding the anonymized image to 8 bits;
- recovery: the real path (the anonymized image is an 8-bit PNG);
- recovery with the whole image as the mask, in float: no re-injection (spec §6 step 4 puts the
  original latents back outside the mask after every step, which makes the anonymizing trajectory
  something DDIM inversion cannot retrace exactly), in float and from the 8-bit PNG;
each at the spec's 50 steps and at more steps. Rows of earlier runs with other step counts are kept. The mask is the landmark masker's face region at the
crop template, as in the evaluation's fallback; recovery reads the stored mask, so a mask mismatch
only arises with --recompute-mask and is not part of this budget.

    python bench/recovery_budget.py --model DIR [--images dev-128.zip] [--count 8] [--steps 50 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LFW_DEV_CROPS, RESULTS, dev_crop_arguments, dev_crop_setup, machine, write_results  # noqa: E402


def budget_psnrs(backend, rgb: np.ndarray, masks: np.ndarray, flips: np.ndarray, schedule, region_psnr):
    """The budget's paths for one schedule, as face-region PSNRs against the crops rgb (N x H x W x 3 uint8).
    Also returns the anonymized output (float) and the recovered crops (uint8), for callers that measure more."""
    from revanon_rt.pixels import to_model, to_u8
    from revanon_rt.sampler import transform

    x, whole = to_model(rgb), np.ones_like(masks)
    anonymized = transform(backend, x, masks, flips, schedule)
    anonymized_whole = transform(backend, x, whole, flips, schedule)
    recovered = to_u8(transform(backend, to_model(to_u8(anonymized)), masks, flips, schedule))
    psnrs = {
        "psnr_reconstruction": region_psnr(to_u8(transform(backend, x, masks, np.ones_like(flips), schedule)), rgb),
        "psnr_anonymized": region_psnr(to_u8(anonymized), rgb),
        "psnr_recovered_float": region_psnr(to_u8(transform(backend, anonymized, masks, flips, schedule)), rgb),
        "psnr_recovered": region_psnr(recovered, rgb),
        # the 8-bit PNG both clamps and rounds; this splits the two
        "psnr_recovered_clamped_float": region_psnr(
            to_u8(transform(backend, np.clip(anonymized, -1, 1), masks, flips, schedule)), rgb),
        "psnr_recovered_whole_mask_float": region_psnr(
            to_u8(transform(backend, anonymized_whole, whole, flips, schedule)), rgb),
        "psnr_recovered_whole_mask": region_psnr(
            to_u8(transform(backend, to_model(to_u8(anonymized_whole)), whole, flips, schedule)), rgb),
    }
    return psnrs, anonymized, recovered


class LatentWalk:
    """A backend's ε and schedule with identity in place of E and D: the transform walks the latents
    themselves, so decoding and re-encoding the anonymized image is taken out of recovery."""

    def __init__(self, backend):
        self.backend = backend

    def encode(self, z):
        return z.astype(np.float32, copy=True)

    decode = encode

    def eps(self, z, t):
        return self.backend.eps(z, t)


def autoencoder_psnrs(backend, rgb: np.ndarray, masks: np.ndarray, flips: np.ndarray, schedule, region_psnr):
    """For a latent model, the rows that split off the autoencoder: its own round trip D(E(x)), and
    recovery when the anonymized latents are recovered directly, never decoded to an image."""
    from revanon_rt.pixels import to_model, to_u8
    from revanon_rt.sampler import transform

    latents, walk = backend.encode(to_model(rgb)), LatentWalk(backend)
    anonymized = transform(walk, latents, masks, flips, schedule)
    whole = np.ones_like(masks)
    anonymized_whole = transform(walk, latents, whole, flips, schedule)
    return {
        "psnr_autoencoder": region_psnr(to_u8(backend.decode(latents)), rgb),
        "psnr_recovered_latent": region_psnr(to_u8(backend.decode(transform(walk, anonymized, masks, flips, schedule))),
                                             rgb),
        "psnr_recovered_latent_whole_mask": region_psnr(
            to_u8(backend.decode(transform(walk, anonymized_whole, whole, flips, schedule))), rgb),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    dev_crop_arguments(parser)
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 200])
    args = parser.parse_args()

    from revanon_rt.pixels import pixel_region, psnr

    backend, rgb, mask, flips = dev_crop_setup(args)
    size = backend.image_size
    masks = np.repeat(mask[None, None].astype(np.float32), len(rgb), axis=0)
    where = np.repeat(pixel_region(mask, (size, size))[None], len(rgb), 0)

    def region_psnr(a, b):
        return psnr(a[where], b[where])

    rows = []
    for steps in args.steps:
        start = time.perf_counter()
        psnrs, _, _ = budget_psnrs(backend, rgb, masks, flips, backend.schedule(steps), region_psnr)
        if backend.encoder is not None:
            psnrs.update(autoencoder_psnrs(backend, rgb, masks, flips, backend.schedule(steps), region_psnr))
        rows.append({"steps": steps, "seconds": time.perf_counter() - start, **psnrs})
        print(rows[-1], flush=True)
    name = args.name or f"recovery-budget-{args.model.name}"
    previous = RESULTS / f"{name}.json"
    if previous.exists():
        earlier = json.loads(previous.read_text())
        # Rows measured on other weights (the model trained on since) or other crops must not sit beside these.
        same_crops = (earlier.get("images") == len(rgb)
                      and earlier.get("images_from", LFW_DEV_CROPS.name) == Path(args.images).name)
        if earlier.get("fingerprint") == backend.fingerprint and same_crops:
            kept = [r for r in earlier["rows"] if r["steps"] not in args.steps]
            rows = sorted(kept + rows, key=lambda r: r["steps"])
        else:
            print(f"{previous} was measured on other weights or crops; replacing it", flush=True)
    lines = [f"# Crop-mode recovery budget: {args.model} ({size} px)", "",
             f"{len(rgb)} LFW dev crops, face-region PSNR (dB) against the originals; mask: the template face region.",
             f"Model fingerprint {backend.fingerprint[:16]}….", "",
             "| steps | reconstruction (no flip) | anonymized | recovered, float anonymized "
             "| recovered, float anonymized clamped to [−1, 1] | recovered (8-bit PNG) "
             "| recovered, whole-image mask, float | recovered, whole-image mask (8-bit PNG) |",
             "|---|---|---|---|---|---|---|---|"]

    def shown(value):
        return "not run" if value is None else f"{value:.2f}"

    for r in rows:
        lines.append(f"| {r['steps']} | {r['psnr_reconstruction']:.2f} | {r['psnr_anonymized']:.2f} | "
                     f"{r['psnr_recovered_float']:.2f} | {shown(r.get('psnr_recovered_clamped_float'))} | "
                     f"{r['psnr_recovered']:.2f} | {shown(r.get('psnr_recovered_whole_mask_float'))} | "
                     f"{shown(r.get('psnr_recovered_whole_mask'))} |")
    if any("psnr_autoencoder" in r for r in rows):
        lines += ["", "A latent model's autoencoder, split off (face-region PSNR, dB):", "",
                  "| steps | autoencoder alone, D(E(x)) (8-bit) | recovered in the latent, never decoded "
                  "| the same, whole-image mask |", "|---|---|---|---|"]
        lines += [f"| {r['steps']} | {r['psnr_autoencoder']:.2f} | {r['psnr_recovered_latent']:.2f} | "
                  f"{r['psnr_recovered_latent_whole_mask']:.2f} |" for r in rows if "psnr_autoencoder" in r]
    write_results(name, {"model": str(args.model), "fingerprint": backend.fingerprint, "machine": machine(),
                         "images": len(rgb), "images_from": Path(args.images).name, "rows": rows},
                  "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
