"""Where DDIM inversion stops retracing a trajectory, level by level, for one model.

Recovery works only if inverting the anonymized image walks back along the trajectory that
denoising took to make it. This records the latent at every level of both walks (through the
spec's own loop functions, by logging what ε is asked about) and reports their distance:

- reconstruction: denoising a real image's inverted z_T, against that inversion;
- sample: inverting a face sampled from Gaussian noise (no mask), against the sampling walk;
- anonymized: inverting the anonymized image, against the denoising walk that made it,
  with the whole image as the mask (a pure ODE, no re-injection) and with the template mask;
and each image inverted as computed (float), rounded to the 8-bit grid without clamping, and as
stored (an 8-bit PNG, clamped to the pixel range first, spec §2). The unclamped row separates
rounding from clamping: an untrained-enough model generates values beyond [-1, 1].

The distance at a level is RMS(walk back − walk forth) / RMS(walk forth), inside the mask.
"recovered z_T" is the last of these: how far the key's flip lands from the original z_T.

    python bench/inversion_drift.py --model DIR [--count 8] [--steps 50]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dev_crop_arguments, dev_crop_setup, machine, write_results  # noqa: E402

SHOWN_FRACTIONS = (0, 0.02, 0.04, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 0.98, 1)


class Recorder:
    """An ε function that keeps every latent it is asked about: the walk, level by level."""

    def __init__(self, eps_fn):
        self.eps_fn = eps_fn
        self.seen: list[np.ndarray] = []

    def __call__(self, z, t):
        self.seen.append(z.copy())
        return self.eps_fn(z, t)


def relative_rms(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    """Per image, RMS(a − b) / RMS(b) over the masked elements; the mean over images."""
    values = []
    for ai, bi, wi in zip(a, b, where):
        wi = np.broadcast_to(wi, ai.shape).astype(bool)
        values.append(float(np.sqrt(np.mean((ai[wi] - bi[wi]) ** 2)) / np.sqrt(np.mean(bi[wi] ** 2))))
    return float(np.mean(values))


def out_of_range_share(x: np.ndarray, mask: np.ndarray) -> dict:
    """How much of the image (inside the mask, in pixel-space units) lies beyond [-1, 1]: what 8-bit storage clamps."""
    from revanon_rt.pixels import pixel_region

    where = np.broadcast_to(pixel_region(mask, x.shape[-2:]), x.shape)
    values = x[where]
    return {"share": float(np.mean(np.abs(values) > 1)), "max": float(np.abs(values).max())}


def local_energy_spread(z: np.ndarray, block: int = 8) -> float:
    """Std / mean of the RMS over block x block patches (all channels): how unevenly a latent's energy is
    spread. Sign flips keep it, so a flipped z_T is noise only if z_T's spread is Gaussian noise's."""
    n, c, h, w = z.shape
    b = min(block, h, w)
    rms = np.sqrt((z[:, :, : h // b * b, : w // b * b] ** 2).reshape(n, c, h // b, b, w // b, b).mean(axis=(1, 3, 5)))
    return float(np.mean(rms.std(axis=(1, 2)) / rms.mean(axis=(1, 2))))


def by_level(forth: list[np.ndarray], back: list[np.ndarray], where: np.ndarray) -> list[float]:
    """forth[k] and back[k] are both the latents at level k (k inversion steps from the image)."""
    return [relative_rms(b, f, where) for f, b in zip(forth, back)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    dev_crop_arguments(parser)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()

    from revanon_rt.pixels import to_model, to_u8
    from revanon_rt.sampler import denoise, invert, keyed_flip

    backend, rgb, template, flips = dev_crop_setup(args)
    size = backend.image_size
    c, h, w = backend.latent_shape
    sched = backend.schedule(args.steps)
    S = sched.steps
    n = len(rgb)
    masks = {"whole image": np.ones((n, 1, h, w), np.float32),
             "template face": np.repeat(template[None, None].astype(np.float32), n, axis=0)}

    def walk_down(z_T, mask, keep):
        """Denoise, returning the latents at levels S, ..., 0 reordered as levels 0..S."""
        recorder = Recorder(backend.eps)
        z0 = denoise(recorder, z_T, sched, mask, list(keep[:S]))
        return (recorder.seen + [z0])[::-1]

    def walk_up(z0):
        return invert(backend.eps, z0, sched)

    def as_png(z0):
        """The latent of the image as it is stored: decoded, clamped and rounded to 8 bits (spec §2), encoded."""
        return backend.encode(to_model(to_u8(backend.decode(z0))))

    def on_grid(z0):
        """Rounded to the 8-bit grid but not clamped: separates rounding from clamping out-of-range values."""
        x = backend.decode(z0)
        return backend.encode((np.rint((x + 1) * np.float32(127.5)) / np.float32(127.5) - 1).astype(np.float32))

    stored = (("float", lambda z: z), ("8-bit grid, unclamped", on_grid), ("8-bit PNG", as_png))

    start = time.perf_counter()
    rows = {}
    z0 = backend.encode(to_model(rgb))
    keep = walk_up(z0)
    whole = masks["whole image"]
    down = walk_down(keep[S], whole, keep)
    rows["reconstruction"] = by_level(keep, down, whole)
    print("reconstruction", [round(v, 4) for v in rows["reconstruction"]], flush=True)

    noise = np.random.default_rng(0).standard_normal((n, c, h, w)).astype(np.float32)
    energy_spread = {"inverted z_T": local_energy_spread(keep[S]), "Gaussian noise": local_energy_spread(noise)}
    sampled = walk_down(noise, whole, [noise] * S)
    rows["sample"] = by_level(sampled, walk_up(sampled[0]), whole)
    print("sample", [round(v, 4) for v in rows["sample"]], flush=True)

    out_of_range = {"sample": out_of_range_share(backend.decode(sampled[0]), whole)}
    for source, store in stored[1:]:
        rows[f"sample, {source}"] = by_level(sampled, walk_up(store(sampled[0])), whole)
        print(f"sample, {source}", [round(v, 4) for v in rows[f"sample, {source}"]], flush=True)

    for label, mask in masks.items():
        anon_down = walk_down(keyed_flip(keep[S], mask, flips), mask, keep)
        out_of_range[f"anonymized, {label}"] = out_of_range_share(backend.decode(anon_down[0]), mask)
        for source, store in stored:
            anon_up = walk_up(store(anon_down[0]))
            row = f"anonymized, {label}" + ("" if source == "float" else f", {source}")
            rows[row] = by_level(anon_down, anon_up, mask)
            recovered_z_T = keyed_flip(anon_up[S], mask, flips)
            rows[row].append(relative_rms(recovered_z_T, keep[S], mask))
            print(row, [round(v, 4) for v in rows[row]], flush=True)
    seconds = time.perf_counter() - start

    shown = sorted({round(f * S) for f in SHOWN_FRACTIONS})
    header = "| walk | " + " | ".join(f"k={k}" for k in shown) + " | recovered z_T |"
    lines = [f"# Inversion drift: {args.model} ({size} px, {S} steps)", "",
             f"{n} LFW dev crops. Relative RMS distance between the latent reached walking back and the one "
             "walked forth, at k inversion steps from the image (k = 0: the image; "
             f"k = {S}: z_T), inside the mask. Timestep of level k: t = {list(sched.timesteps)[::-1][0]} "
             f"at k = 1 up to {sched.timesteps[0]} at k = {S}.", "",
             header, "|---|" + "---|" * (len(shown) + 1)]
    for label, values in rows.items():
        cells = " | ".join(f"{values[k]:.3f}" for k in shown)
        last = f"{values[S + 1]:.3f}" if len(values) > S + 1 else ""
        lines.append(f"| {label} | {cells} | {last} |")
    lines += ["", "Image values beyond [-1, 1] inside the mask, which 8-bit storage clamps: "
              + "; ".join(f"{k}: {100 * v['share']:.1f}% (max |x| {v['max']:.2f})" for k, v in out_of_range.items())
              + ".",
              "", "Spread of local energy (std / mean of 8 x 8 patch RMS), which sign flips keep: "
              + "; ".join(f"{k}: {v:.3f}" for k, v in energy_spread.items()) + "."]
    name = args.name or f"inversion-drift-{args.model.name}-{S}"
    write_results(name, {"model": str(args.model), "machine": machine(), "images": n, "steps": S, "seconds": seconds,
                         "timesteps": list(sched.timesteps), "rows": rows,
                         "out_of_range": out_of_range, "local_energy_spread": energy_spread}, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
