"""The main job: a synthetic face, anonymized with a fresh key, recovered, shown side by side.

It runs on the project's demo model when one is present: models/demo-lfw64-latent, the one model here
that brings identities back, else the pixel models demo-lfw128 and demo-lfw64. The face is sampled from
the model itself (no real person) and masked where the crop template puts a face. Otherwise it runs on a
tiny ε ≡ 0 pixel model it builds, on a drawn face; that model recovers exactly but only sign-flips pixels
where a trained model would paint a new face. Where dlib is installed, the demo also says whether the
anonymized and the recovered face still match the original.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .errors import UsageError
from .images import LoadedImage, encode_png, write_atomic
from .keys import Secret, keygen, read_key_file
from .masks import FileMasker
from .pipeline import Options, anonymize_image, deanonymize_image
from .pixels import psnr

REPO_MODELS = Path(__file__).resolve().parents[1] / "models"
DEMO_MODELS = (REPO_MODELS / "demo-lfw64-latent", REPO_MODELS / "demo-lfw128", REPO_MODELS / "demo-lfw64")
# dlib cosine at FAR 0.1% on the LFW dev split's clean impostor pairs (bench/results/eval-lfw64-latent-anchored-dev.md)
SAME_PERSON_COSINE = 0.929


def demo_model() -> Path | None:
    """The best demo model present: the first of DEMO_MODELS with weights."""
    return next((m for m in DEMO_MODELS if (m / "unet").is_dir()), None)


def synthetic_face(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A drawn face (no real person) and its face mask (white = face)."""
    rng = np.random.default_rng(seed)
    s = size / 128
    im = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(im)
    top, bottom = rng.integers(60, 200, 3), rng.integers(20, 120, 3)
    for y in range(size):
        c = top + (bottom - top) * y / size
        draw.line([(0, y), (size, y)], fill=tuple(int(v) for v in c))
    skin = tuple(int(v) for v in rng.integers([170, 120, 90], [240, 190, 160]))
    hair = tuple(int(v) for v in rng.integers(10, 90, 3))
    draw.ellipse([28 * s, 12 * s, 100 * s, 80 * s], fill=hair)
    draw.rectangle([50 * s, 90 * s, 78 * s, 128 * s], fill=skin)
    draw.ellipse([34 * s, 24 * s, 94 * s, 108 * s], fill=skin)
    for cx in (50, 78):
        draw.ellipse([(cx - 7) * s, 54 * s, (cx + 7) * s, 62 * s], fill=(245, 245, 245))
        draw.ellipse([(cx - 3) * s, 55 * s, (cx + 3) * s, 61 * s], fill=tuple(int(v) for v in rng.integers(20, 120, 3)))
        draw.line([(cx - 8) * s, 48 * s, (cx + 8) * s, 46 * s], fill=hair, width=max(1, int(2 * s)))
    draw.line([64 * s, 60 * s, 61 * s, 78 * s, 66 * s, 80 * s], fill=(150, 90, 80), width=max(1, int(s)))
    draw.arc([52 * s, 80 * s, 76 * s, 96 * s], 20, 160, fill=(170, 60, 70), width=max(1, int(2 * s)))
    im = im.filter(ImageFilter.GaussianBlur(0.6 * s))
    mask = Image.new("L", (size, size))
    ImageDraw.Draw(mask).ellipse([34 * s, 24 * s, 94 * s, 108 * s], fill=255)
    return np.asarray(im).copy(), np.asarray(mask).copy()


def template_face_mask(size: int) -> np.ndarray:
    """Where an aligned crop holds its face: the landmark masker's region around the template's points."""
    from .faces import template_region

    return template_region(size, out=size) * np.uint8(255)


def _side_by_side(panels: list[np.ndarray], scale: int) -> np.ndarray:
    gap = np.full((panels[0].shape[0], 4, 3), 255, np.uint8)
    row = np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=1)
    return np.asarray(Image.fromarray(row).resize((row.shape[1] * scale, row.shape[0] * scale),
                                                  Image.Resampling.NEAREST))


# The demo rewrites its files on every run; this mark tells its own folder from one that holds a user's
# face.png or recovered.png.
DEMO_MARK = ".revanon-demo"


def demo_folder(out: Path) -> Path:
    """OUT, made or reused only when it is empty or the demo's own."""
    out = Path(out)
    try:
        if out.exists():
            if not out.is_dir():
                raise UsageError(f"--out {out}: a file, not a folder")
            if not (out / DEMO_MARK).exists() and any(out.iterdir()):
                raise UsageError(f"--out {out}: holds files the demo did not write, which it would overwrite; "
                                 "choose a new or empty folder")
        out.mkdir(parents=True, exist_ok=True)
        (out / DEMO_MARK).touch()
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot be made or written ({exc.strerror or exc})") from None
    return out


def run_demo(out: Path, model: Path | None = None, device: str = "cpu", steps: int = 50, seed: int = 0,
             face: str | None = None, log=print) -> dict:
    """`face` is "sampled" or "drawn"; None picks sampled for a trained model, drawn for the tiny one."""
    from .reference import TorchReference
    from .tiny import save_tiny_pixel

    drawn = face == "drawn"
    # a model given is loaded before --out is claimed: a mistyped model leaves no folder behind
    backend = TorchReference(model, device=device) if model is not None else None
    out = demo_folder(out)
    if model is None:
        model = demo_model()
        if model is None:
            drawn = face != "sampled"
            model = out / "tiny-zero-eps-128"
            if not model.is_dir():
                log(f"no demo model yet: building a tiny ε ≡ 0 pixel model in {model}")
                save_tiny_pixel(model, image_size=128, zero_eps=True)
        backend = TorchReference(model, device=device)
    size = backend.image_size
    if drawn:
        rgb, mask = synthetic_face(size, seed)
    else:
        from .train import sample_faces

        log(f"sampling a face from {model} (50 DDIM steps)")
        rgb, mask = sample_faces(backend, 1, steps=50, seed=seed)[0], template_face_mask(size)
    face_path, mask_path, key_path = out / "face.png", out / "face_mask.png", out / "demo.key"
    write_atomic(face_path, encode_png(rgb, None, None, {}), overwrite=True)
    write_atomic(mask_path, encode_png(np.repeat(mask[..., None], 3, axis=2), None, None, {}), overwrite=True)
    if not key_path.exists():
        keygen(key_path)
    secret = Secret.from_key(read_key_file(key_path))
    opts = Options(steps=steps)

    t0 = time.perf_counter()
    anonymized = anonymize_image(LoadedImage(face_path, rgb, None, None), None, backend, FileMasker(mask_path),
                                 secret, opts, Path("face.png"))
    t1 = time.perf_counter()
    for note in anonymized.warnings:
        log(f"warning: {note}")
    anon_path = out / "anonymized.png"
    write_atomic(anon_path, anonymized.png_bytes(), overwrite=True)
    recovered = deanonymize_image(anonymized.image, anonymized.header_text(), str(anon_path), backend, secret,
                                  opts, Path("anonymized.png"))
    t2 = time.perf_counter()
    write_atomic(out / "recovered.png", recovered.png_bytes(), overwrite=True)

    overlay = rgb.copy()
    overlay[mask >= 128] = (0.65 * overlay[mask >= 128] + [0, 89, 0]).astype(np.uint8)
    sheet = _side_by_side([rgb, overlay, anonymized.image.rgb, recovered.image.rgb], scale=max(1, 256 // size))
    write_atomic(out / "side_by_side.png", encode_png(sheet, None, None, {}), overwrite=True)
    report = {
        "model": str(model), "face": "drawn" if drawn else f"sampled from the model (seed {seed})", "image_size": size, "steps": steps,
        "anonymize_seconds": round(t1 - t0, 2), "recover_seconds": round(t2 - t1, 2),
        "psnr_anonymized_db": round(psnr(anonymized.image.rgb, rgb), 2),
        "psnr_recovered_db": None if np.array_equal(recovered.image.rgb, rgb) else round(psnr(recovered.image.rgb, rgb), 2),
        "recovered_bit_exact": bool(np.array_equal(recovered.image.rgb, rgb)),
        "warnings": anonymized.warnings,
        "identity": identity_check(rgb, anonymized.image.rgb, recovered.image.rgb),
    }
    log(f"original | mask | anonymized | recovered -> {out / 'side_by_side.png'}")
    recovery = ("bit-exact" if report["recovered_bit_exact"] else f"PSNR {report['psnr_recovered_db']} dB")
    log(f"anonymized: PSNR {report['psnr_anonymized_db']} dB against the original; recovered: {recovery}; "
        f"{report['anonymize_seconds']} s + {report['recover_seconds']} s on {device}")
    identity = report["identity"]
    if identity is None:
        log("identity not checked: dlib's face recognizer comes with the faces extra (pip install 'revanon-rt[faces]')")
    else:
        def verdict(cosine):
            return f"{cosine:.3f}, {'a match' if cosine > SAME_PERSON_COSINE else 'no match'}"
        log(f"identity, dlib cosine to the original (above {SAME_PERSON_COSINE} is a match; 0.1% of different people's "
            f"LFW pairs pass it): anonymized {verdict(identity['anonymized'])}; recovered {verdict(identity['recovered'])}")
    return report


def identity_check(original: np.ndarray, anonymized: np.ndarray, recovered: np.ndarray) -> dict | None:
    """dlib's cosine between the original face and each output, or None without dlib."""
    try:
        from .faces import Recognizer

        recognizer = Recognizer()
    except UsageError:  # no dlib, or its models missing: the demo itself still ran
        return None
    reference = recognizer.describe(original)[0]
    return {"threshold": SAME_PERSON_COSINE,
            **{name: round(float(reference @ recognizer.describe(rgb)[0]), 4)
               for name, rgb in (("anonymized", anonymized), ("recovered", recovered))}}
