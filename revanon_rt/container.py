"""The revanon PNG container of spec §7: header, auth MAC, chunk I/O and read limits."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

from . import FORMAT
from .encoding import b64decode, b64encode, canonical_json
from .errors import MetadataError, quoted
from .images import PNG_SIGNATURE, open_regular
from .keys import NONCE_BYTES, check_kdf
from .masks import unpack_mask
from .schedule import MAX_STEPS

KEYWORD = "revanon"
MAX_CHUNK_BYTES = 16 * 1024 * 1024
MAX_FACES = 256
STATES = ("anonymized", "recovered")
MODES = ("crop", "photo")
MASKERS = ("bisenet", "landmarks", "file")
AUTH_FAILED = "wrong key, or the image or its metadata was changed"



def face_record(box: list, affine: list, nonce: bytes | None, mask: dict) -> dict:
    """One entry of `faces` (spec §7); nonce None is the --insecure-key-reuse record."""
    return {"box": box, "affine": affine, "nonce": None if nonce is None else b64encode(nonce), "mask": mask}


def crop_face_record(image_size: int, nonce: bytes | None, mask: dict) -> dict:
    return face_record([0, 0, image_size, image_size], [[1, 0, 0], [0, 1, 0]], nonce, mask)


def new_header(*, steps: int, mode: str, masker: str, fingerprint: str, image_size: int,
               kdf: dict, faces: list[dict]) -> dict:
    return {"format": FORMAT, "state": "anonymized", "steps": steps, "mode": mode, "masker": masker,
            "model": {"fingerprint": fingerprint, "image_size": image_size}, "kdf": kdf, "faces": faces}


def pixel_digest(rgb: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(rgb, dtype=np.uint8)).digest()  # the array's buffer, not a copy


def compute_auth(k_mac: bytes, header: dict, rgb: np.ndarray) -> str:
    """HMAC-SHA256(K_mac, canonical(header without auth) ‖ sha256(RGB pixels))."""
    body = {k: v for k, v in header.items() if k != "auth"}
    return b64encode(hmac.new(k_mac, canonical_json(body) + pixel_digest(rgb), hashlib.sha256).digest())


def auth_matches(k_mac: bytes, header: dict, rgb: np.ndarray) -> bool:
    stored = header.get("auth")
    # as bytes: compare_digest refuses str arguments holding non-ASCII characters
    return isinstance(stored, str) and hmac.compare_digest(stored.encode("utf-8"),
                                                           compute_auth(k_mac, header, rgb).encode("ascii"))


def to_text(header: dict) -> str:
    return json.dumps(header, ensure_ascii=False, separators=(",", ":"))


def read_png_chunk(path: Path) -> str | None:
    """The text of the revanon iTXt chunk of a PNG file, or None."""
    try:
        with open_regular(path) as fh:
            return png_chunk_text(fh, path)
    except OSError as exc:
        raise MetadataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def png_chunk_text(fh: BinaryIO, source) -> str | None:
    """read_png_chunk on an open binary file. Walks chunk headers without decoding pixels and refuses
    an oversized or duplicated chunk before reading it."""
    found: list[str] = []
    if fh.read(8) != PNG_SIGNATURE:
        return None
    while True:
        head = fh.read(8)
        if len(head) < 8:
            break
        length, ctype = struct.unpack(">I4s", head)
        if ctype == b"iTXt" and length >= len(KEYWORD) + 1:
            if fh.read(len(KEYWORD) + 1) == KEYWORD.encode("latin-1") + b"\0":
                if length > MAX_CHUNK_BYTES:
                    raise MetadataError(
                        f"{source}: the revanon chunk is {length} bytes, over the limit of {MAX_CHUNK_BYTES}")
                found.append(_itxt_text(fh.read(length - len(KEYWORD) - 1), source))
                fh.seek(4, 1)
                continue
            fh.seek(-(len(KEYWORD) + 1), 1)
        if ctype == b"IEND":
            break
        fh.seek(length + 4, 1)
    if len(found) > 1:
        raise MetadataError(f"{source}: {len(found)} revanon chunks; v1 files have exactly one")
    return found[0] if found else None


def _itxt_text(rest: bytes, path: Path) -> str:
    # after the keyword: compression flag, method, language\0, translated keyword\0, text
    if len(rest) < 2:
        raise MetadataError(f"{path}: truncated revanon chunk")
    if rest[0] != 0:
        raise MetadataError(f"{path}: the revanon chunk is compressed; v1 writes it uncompressed")
    parts = rest[2:].split(b"\0", 2)
    if len(parts) != 3:
        raise MetadataError(f"{path}: malformed revanon chunk")
    try:
        return parts[2].decode("utf-8")
    except UnicodeDecodeError:
        raise MetadataError(f"{path}: the revanon chunk is not UTF-8") from None


def read_sidecar(path: Path) -> str:
    """A metadata file, which must be a regular file within the chunk limit. It is opened without
    blocking and checked on the open handle, so a FIFO or a device named like a sidecar is refused."""
    try:
        with open_regular(path) as f:
            data = f.read(MAX_CHUNK_BYTES + 1)
        if len(data) > MAX_CHUNK_BYTES:
            raise MetadataError(f"{path}: over the metadata limit of {MAX_CHUNK_BYTES} bytes")
        return data.decode("utf-8")
    except FileNotFoundError:
        raise MetadataError(f"{path}: metadata file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MetadataError(f"{path}: cannot read the metadata ({exc})") from None


def sidecar_path(image_path: Path) -> Path:
    return image_path.with_name(image_path.name + ".revanon.json")


def read_metadata(image_path: Path) -> str | None:
    """The image's revanon chunk, or else the sidecar beside it (for PNGs whose chunk was stripped)."""
    text = read_png_chunk(image_path)
    # os.path.exists, not Path.exists: a name over the file system's limit names no file, it raises nothing
    if text is None and os.path.exists(sidecar_path(image_path)):
        text = read_sidecar(sidecar_path(image_path))
    return text


def recorded(text: str | None, field: str) -> object:
    """One top-level field of the metadata (`mode`, `state`), without validating anything else (None where
    it cannot be read): enough to plan a run; parse_header checks the image when its turn comes."""
    try:
        header = json.loads(text) if text is not None else None
    except (ValueError, RecursionError):
        return None
    return header.get(field) if isinstance(header, dict) else None


def parse_header(text: str, source: str) -> dict:
    """Parse and validate metadata from an untrusted file; errors name the source."""
    if len(text) > MAX_CHUNK_BYTES:  # the readers' byte limit, for text handed over directly (the API's metadata=)
        raise MetadataError(f"{source}: the revanon metadata is {len(text)} characters, over the limit of "
                            f"{MAX_CHUNK_BYTES} bytes")
    try:
        header = json.loads(text, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:  # ValueError: bad JSON, a repeated key, an over-long integer
        raise MetadataError(f"{source}: the revanon metadata is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise MetadataError(f"{source}: the revanon metadata is not a JSON object")
    try:
        canonical_json(header)
    except UnicodeEncodeError:
        raise MetadataError(f"{source}: the revanon metadata holds text that is not valid Unicode") from None
    if header.get("format") != FORMAT:
        raise MetadataError(f"{source}: format {quoted(header.get('format'))} is not {FORMAT}")
    _require(header.get("state") in STATES, source, f"unknown state {quoted(header.get('state'))}")
    steps = header.get("steps")
    _require(isinstance(steps, int) and not isinstance(steps, bool) and 1 <= steps <= MAX_STEPS,
             source, f"steps must be an integer in 1..{MAX_STEPS}, not {quoted(steps)}")
    _require(header.get("mode") in MODES, source, f"unknown mode {quoted(header.get('mode'))}")
    _require(header.get("masker") in MASKERS, source, f"unknown masker {quoted(header.get('masker'))}")
    model = header.get("model")
    _require(isinstance(model, dict) and isinstance(model.get("fingerprint"), str)
             and re.fullmatch(r"[0-9a-f]{64}", model["fingerprint"]) is not None
             and type(model.get("image_size")) is int and 1 <= model["image_size"] <= 65536,
             source, "malformed model record")
    check_kdf(header.get("kdf"), source)
    faces = header.get("faces")
    _require(isinstance(faces, list), source, "faces must be a list")
    _require(len(faces) <= MAX_FACES, source, f"{len(faces)} faces, over the limit of {MAX_FACES}")
    for index, face in enumerate(faces):
        _check_face(face, f"{source} (face {index})")
    _require("auth" not in header or isinstance(header["auth"], str), source, "auth must be a string")
    return header


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A repeated key is refused: readers that keep the first value and readers that keep the last
    would see different headers behind one valid MAC."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"the key {quoted(key)} appears more than once")
        seen.add(key)
    return dict(pairs)


def _check_face(face: object, source: str) -> None:
    _require(isinstance(face, dict), source, "a face record must be an object")
    box, affine = face.get("box"), face.get("affine")
    _require(isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box), source, "malformed box")
    _require(isinstance(affine, list) and len(affine) == 2
             and all(isinstance(row, list) and len(row) == 3 and all(_is_number(v) for v in row) for row in affine),
             source, "malformed affine")
    nonce = face.get("nonce", "missing")
    if nonce is not None:
        try:
            raw = b64decode(nonce)
        except ValueError:
            raise MetadataError(f"{source}: the nonce is not base64") from None
        _require(len(raw) == NONCE_BYTES, source, f"the nonce must be {NONCE_BYTES} bytes")
    unpack_mask(face.get("mask"), source)


def face_nonce(face: dict) -> bytes | None:
    return None if face["nonce"] is None else b64decode(face["nonce"])


def stored_mask(face: dict, latent_hw: tuple[int, int], source: str) -> np.ndarray:
    """A face record's mask, which must match the model's latent grid."""
    mask = unpack_mask(face["mask"], source)
    if mask.shape != tuple(latent_hw):
        raise MetadataError(f"{source}: the stored mask is {mask.shape[0]}x{mask.shape[1]}, "
                            f"the model's latent grid is {latent_hw[0]}x{latent_hw[1]}")
    return mask


def recovered_header(header: dict, verified: bool) -> dict:
    """The metadata of a recovered image: the same records, state 'recovered', no auth tag."""
    out = {k: v for k, v in header.items() if k != "auth"}
    out["state"] = "recovered"
    if not verified:
        out["unverified"] = True
    return out


def _is_number(v: object) -> bool:
    """A finite number that fits a float64: a 400-digit integer is JSON, but no coordinate."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def _require(ok: bool, source: str, message: str) -> None:
    if not ok:
        raise MetadataError(f"{source}: {message}")
