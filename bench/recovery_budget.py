"""Where crop-mode recovery loses fidelity, for one model, on aligned LFW dev crops.

Each row removes one source of error, so that the gaps between rows are the losses:
- reconstruction: invert and denoise with no flip (the DDIM discretization and model error alone);
- recovery in float: anonymize and recover without rounding the anonymized image to 8 bits;
- recovery: the real path (the anonymized image is an 8-bit PNG);
- recovery with the whole image as the mask, in float: no re-injection (spec §6 step 4 puts the
  original latents back outside the mask after every step, which makes the anonymizing trajectory
  something DDIM inversion cannot retrace exactly);
each at the spec's 50 steps and at more steps. Rows of earlier runs with other step counts are kept. The mask is the landmark masker's face region at the
crop template, as in the evaluation's fallback; recovery reads the stored mask, so a mask mismatch
only arises with --recompute-mask and is not part of this budget.

    python bench/recovery_budget.py --model DIR [--images dev-128.zip] [--count 8] [--steps 50 200]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine  # noqa: E402

DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw" / "dev-128.zip"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--images", type=Path, default=DEV)
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()

    from revanon_rt.faces import template_region
    from revanon_rt.keys import flip_pattern, flip_subkey
    from revanon_rt.masks import latent_mask
    from revanon_rt.pixels import psnr, to_model, to_u8
    from revanon_rt.reference import TorchReference
    from revanon_rt.sampler import transform

    backend = TorchReference(args.model, device=args.device)
    size = backend.image_size
    c, h, w = backend.latent_shape
    archive = zipfile.ZipFile(args.images)
    names = sorted(n for n in archive.namelist() if n.endswith((".jpg", ".png")))[: args.count]
    rgb = np.stack([np.asarray(Image.open(io.BytesIO(archive.read(n))).convert("RGB")
                               .resize((size, size), Image.Resampling.LANCZOS)) for n in names])
    mask = latent_mask(template_region(size), (h, w))
    masks = np.repeat(mask[None, None].astype(np.float32), len(rgb), axis=0)
    k_flip = flip_subkey(bytes(32))
    flips = np.stack([flip_pattern(k_flip, bytes([i]) * 16, (c, h, w)) for i in range(len(rgb))])
    where = np.repeat(np.kron(mask, np.ones((size // h, size // w), np.uint8)).astype(bool)[None], len(rgb), 0)

    def region_psnr(a, b):
        return psnr(a[where], b[where])

    rows = []
    for steps in args.steps:
        sched = backend.schedule(steps)
        start = time.perf_counter()
        x = to_model(rgb)
        identity = transform(backend, x, masks, np.ones_like(flips), sched)
        anonymized = transform(backend, x, masks, flips, sched)
        recovered_float = transform(backend, anonymized, masks, flips, sched)
        recovered = transform(backend, to_model(to_u8(anonymized)), masks, flips, sched)
        whole = np.ones_like(masks)
        recovered_whole = transform(backend, transform(backend, x, whole, flips, sched), whole, flips, sched)
        rows.append({"steps": steps, "seconds": time.perf_counter() - start,
                     "psnr_reconstruction": region_psnr(to_u8(identity), rgb),
                     "psnr_anonymized": region_psnr(to_u8(anonymized), rgb),
                     "psnr_recovered_float": region_psnr(to_u8(recovered_float), rgb),
                     "psnr_recovered": region_psnr(to_u8(recovered), rgb),
                     "psnr_recovered_whole_mask_float": region_psnr(to_u8(recovered_whole), rgb)})
        print(rows[-1], flush=True)
    name = args.name or f"recovery-budget-{args.model.name}"
    previous = RESULTS / f"{name}.json"
    if previous.exists():
        kept = [r for r in json.loads(previous.read_text())["rows"] if r["steps"] not in args.steps]
        rows = sorted(kept + rows, key=lambda r: r["steps"])
    lines = [f"# Crop-mode recovery budget: {args.model} ({size} px)", "",
             f"{len(rgb)} LFW dev crops, face-region PSNR (dB) against the originals; mask: the template face region.", "",
             "| steps | reconstruction (no flip) | anonymized | recovered, float anonymized | recovered (8-bit PNG) "
             "| recovered, whole-image mask, float |", "|---|---|---|---|---|---|"]
    for r in rows:
        whole = r.get("psnr_recovered_whole_mask_float")
        lines.append(f"| {r['steps']} | {r['psnr_reconstruction']:.2f} | {r['psnr_anonymized']:.2f} | "
                     f"{r['psnr_recovered_float']:.2f} | {r['psnr_recovered']:.2f} | "
                     f"{'not run' if whole is None else f'{whole:.2f}'} |")
    (RESULTS / f"{name}.json").write_text(json.dumps({"model": str(args.model), "machine": machine(), "images": len(rgb),
                                                      "rows": rows}, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
