"""Face maps and latent masks of spec §4, and the maskers that make them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .encoding import b64decode, b64encode
from .errors import InputError, MetadataError, RevanonError, UsageError, quoted
from .images import EXTENSION_FORMATS, SIXTEEN_BIT_GREY_MODES, read_formats, sixteen_bit_to_u8
from .pixels import to_unit

FACE_MAP_SIZE = 512
MAX_MASK_SIDE = 512
# facexlib BiSeNet labels inside the face: skin, brows, eyes, eyeglasses, ears, nose, mouth, lips, neck.
BISENET_FACE_LABELS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14)
BISENET_CLASSES = 19
MASK_EXTENSIONS = tuple(EXTENSION_FORMATS)


def latent_mask(face_map: np.ndarray, latent_hw: tuple[int, int]) -> np.ndarray:
    """M = max-pool of the 512 x 512 face map F onto the latent grid (kernel = stride = 512 / h)."""
    h, w = latent_hw
    if FACE_MAP_SIZE % h or FACE_MAP_SIZE % w:
        raise UsageError(f"a {h}x{w} latent grid does not divide the {FACE_MAP_SIZE}x{FACE_MAP_SIZE} face map")
    kh, kw = FACE_MAP_SIZE // h, FACE_MAP_SIZE // w
    return face_map.reshape(h, kh, w, kw).max(axis=(1, 3)).astype(np.uint8)


def pack_mask(mask: np.ndarray) -> dict:
    return {"shape": [int(s) for s in mask.shape],
            "bits": b64encode(np.packbits(mask.astype(np.uint8).ravel(), bitorder="little").tobytes())}


def unpack_mask(entry: object, source: str) -> np.ndarray:
    try:
        h, w = entry["shape"]
        bits = b64decode(entry["bits"])
    except (TypeError, KeyError, ValueError):
        raise MetadataError(f"{source}: malformed mask record") from None
    if type(h) is not int or type(w) is not int:
        raise MetadataError(f"{source}: the mask shape must be two integers, not {quoted(entry['shape'])}")
    if not (1 <= h <= MAX_MASK_SIDE and 1 <= w <= MAX_MASK_SIDE):
        raise MetadataError(f"{source}: mask shape {h}x{w} is over the limit of {MAX_MASK_SIDE} per side")
    if len(bits) != (h * w + 7) // 8:
        raise MetadataError(f"{source}: the mask holds {len(bits)} bytes, a {h}x{w} mask needs {(h * w + 7) // 8}")
    flat = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), bitorder="little")[: h * w]
    return flat.reshape(h, w).astype(np.uint8)


def face_map_from_image(image: Image.Image) -> np.ndarray:
    """White = face: resize to 512 x 512 with NEAREST, then F = (value >= 128). A 16-bit mask is read by its
    high byte, as inputs are (Pillow's own conversion clamps, so 128 of 65535 would count as white), and a
    mask with transparency is laid on black first, so that what is transparent is never face."""
    if image.mode in SIXTEEN_BIT_GREY_MODES:
        gray = Image.fromarray(sixteen_bit_to_u8(np.asarray(image)))
    elif "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        gray = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("L")
    else:
        gray = image.convert("L")
    gray = gray.resize((FACE_MAP_SIZE, FACE_MAP_SIZE), Image.Resampling.NEAREST)
    return (np.asarray(gray) >= 128).astype(np.uint8)


def face_map_from_file(source, name=None) -> np.ndarray:
    """F from a mask image: a path, or an open binary file that errors call `name`."""
    name = source if name is None else name
    try:
        with Image.open(source, formats=read_formats()) as im:
            im.load()
            return face_map_from_image(ImageOps.exif_transpose(im))  # a mask lines up with the face as displayed
    except (RevanonError, MemoryError):
        raise
    except FileNotFoundError:
        raise InputError(f"{name}: mask file not found") from None
    except Image.DecompressionBombError:
        raise InputError(f"{name}: the mask's pixel count is over the limit (a decompression bomb?)") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{name}: cannot read the mask image ({exc})") from None
    except Exception as exc:  # as images.decode_image
        raise InputError(f"{name}: cannot read the mask image ({type(exc).__name__}: {exc})") from None


class BiSeNetMasker:
    """The default masker: the backend's face parser (facexlib BiSeNet, spec §4)."""

    name = "bisenet"

    def __init__(self, backend):
        self.backend = backend

    def face_maps(self, rgbs: np.ndarray, relatives: list[Path]) -> np.ndarray:
        return self.backend.parse(to_unit(rgbs))


class FileMasker:
    """Masks from an image, or from a folder mirroring the inputs (`a/b.jpg` -> `MASKS/a/b.jpg`, or else
    `MASKS/a/b.<ext>`)."""

    name = "file"

    def __init__(self, mask_path: Path):
        self.mask_path = Path(mask_path)
        if not self.mask_path.exists():
            raise UsageError(f"{self.mask_path}: --mask names no file or folder")

    def path_for(self, relative: Path) -> Path:
        if self.mask_path.is_file():
            return self.mask_path
        # the input's own name first: a.png and a.jpg side by side each have their own mask
        exact = self.mask_path / relative
        if exact.suffix.lower() in MASK_EXTENSIONS and exact.is_file():
            return exact
        stem = self.mask_path / relative.parent / relative.stem
        for ext in MASK_EXTENSIONS:
            for candidate in (stem.with_name(stem.name + ext), stem.with_name(stem.name + ext.upper())):
                if candidate.is_file():
                    return candidate
        raise InputError(f"{relative}: no mask for it under {self.mask_path} (looked for {stem}.png and similar)")

    def face_maps(self, rgbs: np.ndarray, relatives: list[Path]) -> np.ndarray:
        return np.stack([face_map_from_file(self.path_for(rel)) for rel in relatives])
