"""Photo-mode recovery with a trained model, on group photos composed from LFW originals.

For every face it separates three things:
- the resampling floor: the original crop pasted straight back (crop, then paste; no model);
- crop-mode recovery: the same aligned crop anonymized and recovered in crop space;
- photo-mode recovery: the whole photo anonymized and recovered from its records,
and gives the dlib identity of the face in the original, anonymized and recovered photo.
Only numbers leave this script: the composed photos hold LFW faces and are never written.

    python bench/photo_recovery.py --model models/demo-lfw64 [--engine DIR] [--photos 6]
"""

from __future__ import annotations

import argparse
import io
import secrets
import statistics
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_results  # noqa: E402

ORIGINALS = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw" / "dev-250-originals.zip"
BACKGROUND = (90, 110, 95)
# (face side in the photo as a fraction of the 250 px original, rotation in degrees): small, medium, large
SCALES = [(0.45, -7.0), (0.8, 5.0), (1.3, -3.0)]


def compose(names: list[str], archive: zipfile.ZipFile, rng) -> np.ndarray:
    """Three faces side by side at the SCALES, with a little jitter, on a plain background."""
    sides = [int(250 * s) for s, _ in SCALES]
    canvas = Image.new("RGB", (sum(sides) + 40 * (len(sides) + 1), max(sides) + 80), BACKGROUND)
    x = 40
    for name, side, (_, angle) in zip(names, sides, SCALES):
        im = Image.open(io.BytesIO(archive.read(name))).convert("RGB")
        im = im.resize((side, side), Image.Resampling.BICUBIC)
        im = im.rotate(angle + rng.uniform(-2, 2), Image.Resampling.BICUBIC, fillcolor=BACKGROUND)
        canvas.paste(im, (x, 40 + int(rng.integers(0, 30))))
        x += side + 40
    return np.asarray(canvas).copy()


def region_psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    from revanon_rt.pixels import psnr

    return psnr(a[where], b[where])


def scaled_affine(affine: np.ndarray, factor: float) -> np.ndarray:
    """The same alignment into a crop `factor` times larger (pixel centres at integers)."""
    offset = (factor - 1) / 2
    return np.vstack([affine[0] * factor + [0, 0, offset], affine[1] * factor + [0, 0, offset]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--floor-only", type=int, nargs="+", metavar="CROP_SIZE",
                        help="no model: only the resampling floor, for these crop sizes (for example 64 128 256)")
    parser.add_argument("--engine", type=Path, help="An engine of the same model (faster); default: the reference")
    parser.add_argument("--photos", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--originals", type=Path, default=ORIGINALS, help="LFW dev-250-originals.zip")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default=None, help="results file stem (default photo-recovery-<model>)")
    args = parser.parse_args()
    if args.floor_only:
        return floor_only(args)
    if args.model is None:
        parser.error("--model is required (or --floor-only)")

    from revanon_rt.faces import DlibFaces, LandmarksMasker, Recognizer
    from revanon_rt.images import LoadedImage
    from revanon_rt.keys import Secret, flip_subkey
    from revanon_rt.masks import unpack_mask
    from revanon_rt.photo import Selection, anonymize_photo, deanonymize_photo, paste_back, sample_crop
    from revanon_rt.pipeline import Options, transform_crops
    from revanon_rt.pixels import pixel_region

    if args.engine:
        from revanon_rt.engines import open_engine
        backend = open_engine(args.engine, device=args.device)
    else:
        from revanon_rt.reference import TorchReference
        backend = TorchReference(args.model, device=args.device)
    size = backend.image_size
    detector, masker, recognizer = DlibFaces(), LandmarksMasker(), Recognizer()
    key = secrets.token_bytes(32)
    secret, opts = Secret.from_key(key), Options()
    rng = np.random.default_rng(args.seed)
    archive = zipfile.ZipFile(args.originals)
    names = sorted(n for n in archive.namelist() if n.endswith(".jpg"))
    picks = rng.choice(len(names), size=(args.photos, len(SCALES)), replace=False)

    faces, photos = [], []
    for p in range(args.photos):
        photo = compose([names[i] for i in picks[p]], archive, rng)
        start = time.perf_counter()
        found = detector.detect(photo)
        detect_s = time.perf_counter() - start
        start = time.perf_counter()
        anon = anonymize_photo(LoadedImage(Path(f"photo{p}.png"), photo, None, None), None, backend, masker, secret,
                               opts, None, detector=detector, selection=Selection(), allow_no_faces=True)
        anon_s = time.perf_counter() - start
        start = time.perf_counter()
        rec = deanonymize_photo(anon.image, anon.header, key, f"photo{p}", backend, opts, True, [])
        recover_s = time.perf_counter() - start
        records = anon.header["faces"]
        regions = []
        print(f"photo {p}: {len(found)}/{len(SCALES)} faces, detect {detect_s:.2f}s, anonymize {anon_s:.1f}s, "
              f"recover {recover_s:.1f}s", flush=True)
        for record in records:
            affine, mask = np.array(record["affine"]), unpack_mask(record["mask"], "bench")
            marker = paste_back(np.zeros_like(photo), np.full((size, size, 3), 255, np.uint8), affine, mask)
            where = marker[..., 0] > 0
            regions.append(where)
            crop = sample_crop(photo, affine, size)
            floor = paste_back(photo, crop, affine, mask)
            nonce = secrets.token_bytes(16)
            crop_anon = transform_crops(backend, crop[None], mask[None], [nonce], flip_subkey(key), opts.steps)
            crop_rec = transform_crops(backend, crop_anon, mask[None], [nonce], flip_subkey(key), opts.steps)[0]
            crop_where = pixel_region(mask, (size, size))
            big = scaled_affine(affine, 256 / size)
            ids = {k: recognizer.describe(sample_crop(img, big, 256))[0]
                   for k, img in (("original", photo), ("anonymized", anon.image.rgb), ("recovered", rec.image.rgb))}
            face_px = float(np.sqrt(where.sum()))
            faces.append({
                "photo": p, "face_region_px": int(where.sum()), "face_scale": face_px / np.sqrt(crop_where.sum()),
                "psnr_resampling_floor": region_psnr(floor, photo, where),
                "psnr_crop_mode_recovered": region_psnr(crop_rec, crop, crop_where),
                "psnr_photo_recovered": region_psnr(rec.image.rgb, photo, where),
                "psnr_photo_anonymized": region_psnr(anon.image.rgb, photo, where),
                "cos_original_anonymized": float(ids["original"] @ ids["anonymized"]),
                "cos_original_recovered": float(ids["original"] @ ids["recovered"]),
            })
        outside = ~np.any(regions, axis=0) if regions else np.ones(photo.shape[:2], bool)
        photos.append({"faces_placed": len(SCALES), "faces_found": len(found), "detect_s": detect_s,
                       "anonymize_s": anon_s, "recover_s": recover_s,
                       "background_identical": bool(np.array_equal(anon.image.rgb[outside], photo[outside])
                                                    and np.array_equal(rec.image.rgb[outside], photo[outside]))})

    def stat(key, rows=faces):
        values = [r[key] for r in rows if np.isfinite(r[key])]
        return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)} if values else None

    summary = {k: stat(k) for k in faces[0] if k.startswith(("psnr", "cos"))} if faces else {}
    by_scale = {}
    for lo, hi, label in ((0, 1.5, "face at or below crop size"), (1.5, 3, "1.5-3x crop size"), (3, 99, ">3x crop size")):
        rows = [r for r in faces if lo <= r["face_scale"] < hi]
        if rows:
            by_scale[label] = {"faces": len(rows), **{k: stat(k, rows)["mean"] for k in
                                                     ("psnr_resampling_floor", "psnr_crop_mode_recovered",
                                                      "psnr_photo_recovered", "cos_original_recovered")}}
    total_faces = sum(p["faces_found"] for p in photos)
    timing = {"backend": "engine " + str(args.engine) if args.engine else "PyTorch reference",
              "per_photo_anonymize_s": statistics.fmean(p["anonymize_s"] for p in photos),
              "per_photo_recover_s": statistics.fmean(p["recover_s"] for p in photos),
              "per_face_anonymize_s": sum(p["anonymize_s"] for p in photos) / max(1, total_faces),
              "per_face_recover_s": sum(p["recover_s"] for p in photos) / max(1, total_faces),
              "per_photo_detect_s": statistics.fmean(p["detect_s"] for p in photos)}
    result = {"model": str(args.model), "device": args.device, "crop_size": size, "machine": machine(), "photos": photos, "faces": faces,
              "summary": summary, "by_scale": by_scale, "timing": timing,
              "faces_found": f"{total_faces}/{len(SCALES) * len(photos)}",
              "background_identical": all(p["background_identical"] for p in photos)}
    name = args.name or f"photo-recovery-{Path(args.model).name}"
    write_results(name, result, markdown(result))
    print(markdown(result))


def floor_only(args) -> None:
    """The loss of resampling twice (photo -> crop -> photo) with the crop itself pasted back: what
    photo-mode recovery cannot beat, at each crop size, whatever the model."""
    from revanon_rt.faces import DlibFaces, LandmarksMasker
    from revanon_rt.masks import latent_mask
    from revanon_rt.photo import Selection, crop_landmarks, paste_back, plan_faces, sample_crop

    detector, masker = DlibFaces(), LandmarksMasker()
    rng = np.random.default_rng(args.seed)
    archive = zipfile.ZipFile(args.originals)
    names = sorted(n for n in archive.namelist() if n.endswith(".jpg"))
    picks = rng.choice(len(names), size=(args.photos, len(SCALES)), replace=False)
    rows, detected = [], 0
    for p in range(args.photos):
        photo = compose([names[i] for i in picks[p]], archive, rng)
        found = detector.detect(photo)
        detected += len(found)
        for size in args.floor_only:
            for face in plan_faces(found, size, Selection()):
                face_map = masker.face_map_from_landmarks(crop_landmarks(face.landmarks, face.affine), size)
                mask = latent_mask(face_map, (size, size))
                where = paste_back(np.zeros_like(photo), np.full((size, size, 3), 255, np.uint8),
                                   face.affine, mask)[..., 0] > 0
                floor = paste_back(photo, sample_crop(photo, face.affine, size), face.affine, mask)
                rows.append({"photo": p, "crop_size": size, "face_scale": float(np.sqrt(where.sum() / mask.sum())),
                             "psnr_resampling_floor": region_psnr(floor, photo, where)})
    lines = ["# Photo mode: the resampling floor (crop, then paste back, no model)", "",
             f"{args.photos} composed group photos of LFW faces ({len(SCALES)} faces each, sides "
             f"{', '.join(str(int(250 * s)) for s, _ in SCALES)} px of 250 px originals; dlib found {detected} faces for {args.photos * len(SCALES)} placed). PSNR of the face region "
             "after sampling the aligned crop and pasting it straight back: the best photo-mode recovery can do.", "",
             "| crop size | faces | face scale in photo (mean) | PSNR mean dB | min | max |", "|---|---|---|---|---|---|"]
    for size in args.floor_only:
        sel = [r for r in rows if r["crop_size"] == size]
        values = [r["psnr_resampling_floor"] for r in sel]
        lines.append(f"| {size} | {len(sel)} | {statistics.fmean(r['face_scale'] for r in sel):.2f}x | "
                     f"{statistics.fmean(values):.2f} | {min(values):.2f} | {max(values):.2f} |")
    lines += ["", "By face size (terciles of face scale, face region side in the photo over its side in the crop):", "",
              "| crop size | scale | PSNR dB |", "|---|---|---|"]
    for size in args.floor_only:
        sel = sorted((r for r in rows if r["crop_size"] == size), key=lambda r: r["face_scale"])
        third = max(1, len(sel) // 3)
        for part in (sel[:third], sel[third:2 * third], sel[2 * third:]):
            if part:
                lines.append(f"| {size} | {statistics.fmean(r['face_scale'] for r in part):.2f}x | "
                             f"{statistics.fmean(r['psnr_resampling_floor'] for r in part):.2f} |")
    lines += ["", "The photos are LFW's 250 px originals enlarged, so the large faces hold little detail beyond "
              "250 px; sharper photos lose more at large scales."]
    text = "\n".join(lines) + "\n"
    name = args.name or "photo-resampling-floor"
    write_results(name, {"machine": machine(), "faces_placed": args.photos * len(SCALES), "faces_found": detected,
                         "rows": rows}, text)
    print(text)


def markdown(r: dict) -> str:
    s, t = r["summary"], r["timing"]
    lines = [f"# Photo-mode recovery: {r['model']} ({r['crop_size']} px crops)", "",
             f"{len(r['photos'])} composed group photos, faces found {r['faces_found']}, background byte-identical "
             f"after anonymization and recovery: {r['background_identical']}. Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores.",
             "", "| face region | mean | min | max |", "|---|---|---|---|"]
    labels = {"psnr_resampling_floor": "PSNR, crop + paste with no model (resampling floor), dB",
              "psnr_crop_mode_recovered": "PSNR, crop-mode recovery (in the crop), dB",
              "psnr_photo_recovered": "PSNR, photo-mode recovery (in the photo), dB",
              "psnr_photo_anonymized": "PSNR, anonymized vs original, dB",
              "cos_original_anonymized": "dlib cosine, original vs anonymized",
              "cos_original_recovered": "dlib cosine, original vs recovered"}
    for k, label in labels.items():
        if s.get(k):
            lines.append(f"| {label} | {s[k]['mean']:.3f} | {s[k]['min']:.3f} | {s[k]['max']:.3f} |")
    lines += ["", "| face size in the photo | faces | floor dB | crop-mode dB | photo-mode dB | cos recovered |",
              "|---|---|---|---|---|---|"]
    for label, b in r["by_scale"].items():
        lines.append(f"| {label} | {b['faces']} | {b['psnr_resampling_floor']:.2f} | {b['psnr_crop_mode_recovered']:.2f}"
                     f" | {b['psnr_photo_recovered']:.2f} | {b['cos_original_recovered']:.3f} |")
    lines += ["", f"Time ({t['backend']}): detection {t['per_photo_detect_s']:.2f} s per photo; anonymize "
              f"{t['per_photo_anonymize_s']:.1f} s per photo ({t['per_face_anonymize_s']:.1f} s per face); recover "
              f"{t['per_photo_recover_s']:.1f} s per photo ({t['per_face_recover_s']:.1f} s per face).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
