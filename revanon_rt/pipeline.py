"""Anonymization and recovery of aligned crops, in groups that fill the model's batch, top to bottom:

    image -> mask -> encode -> invert -> keyed flip -> denoise -> decode -> container

Recovery reads each image's record first and hands a photo's to photo.py.

Everything here works on decoded images and metadata text; reading inputs and writing
outputs is the caller's business (see batch.py), so the same code serves the CLI,
`verify`, the evaluation and tests.
"""

from __future__ import annotations


from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import container
from .errors import (AuthError, InputError, MetadataError, ModelMismatchError, StateError, UsageError, detached,
                     quoted)
from .images import LoadedImage, encode_png, not_a_crop
from .keys import NONCE_BYTES, ZERO_NONCE, Secret, flip_pattern, flip_subkey, mac_subkey, new_nonce
from .masks import latent_mask, pack_mask
from .pixels import clamped_share, nonfinite_rows, to_model, to_u8
from .sampler import ModelBackend, StepCallback, transform
from .schedule import DEFAULT_STEPS


@dataclass
class Options:
    steps: int = DEFAULT_STEPS
    insecure_key_reuse: bool = False
    force: bool = False
    skip_auth: bool = False
    ignore_model_mismatch: bool = False
    recompute_mask: bool = False


@dataclass
class Output:
    image: LoadedImage
    header: dict
    warnings: list[str] = field(default_factory=list)
    detail: str = ""

    def png_bytes(self) -> bytes:
        return encode_png(self.image.rgb, self.image.alpha, self.image.icc_profile,
                          {container.KEYWORD: container.to_text(self.header)})

    def header_text(self) -> str:
        return container.to_text(self.header)


# Above this share of clamped face values, an anonymized image warns that it may not recover.
CLAMPED_SHARE_WARN_ABOVE = 0.005


def crop_patterns(backend: ModelBackend, nonces: list[bytes], k_flip: bytes) -> np.ndarray:
    """The ±1 flip pattern of every face in a batch (spec §5), N x C x h x w."""
    return np.stack([flip_pattern(k_flip, nonce, tuple(backend.latent_shape)) for nonce in nonces])


def transform_crops_float(backend: ModelBackend, rgbs: np.ndarray, masks: np.ndarray, nonces: list[bytes],
                          k_flip: bytes, steps: int, callback: StepCallback | None = None) -> np.ndarray:
    """T on a batch of aligned crops: N x H x W x 3 uint8 and N x h x w latent masks -> N x 3 x H x W float32."""
    return _transform_with_patterns(backend, rgbs, masks, crop_patterns(backend, nonces, k_flip), steps, callback)


def _transform_with_patterns(backend: ModelBackend, rgbs: np.ndarray, masks: np.ndarray, patterns: np.ndarray,
                             steps: int, callback: StepCallback | None = None) -> np.ndarray:
    x, m, schedule = to_model(rgbs), masks[:, None].astype(np.float32), backend.schedule(steps)
    if backend.supports_fused:
        return backend.fused_transform(x, m, patterns, schedule)
    return transform(backend, x, m, patterns, schedule, callback)


def transform_crops(backend: ModelBackend, rgbs: np.ndarray, masks: np.ndarray, nonces: list[bytes], k_flip: bytes,
                    steps: int, callback: StepCallback | None = None) -> np.ndarray:
    """T on a batch of aligned crops, as the uint8 crops that are stored (spec §2)."""
    return to_u8(transform_crops_float(backend, rgbs, masks, nonces, k_flip, steps, callback))


def clamping_notes(source, shares) -> list[str]:
    """A warning when the model generated face values beyond the pixel range, which 8-bit storage clamps."""
    worst = float(np.max(shares)) if len(shares) else 0.0
    if worst <= CLAMPED_SHARE_WARN_ABOVE:
        return []
    return [f"{source}: the model generated {worst:.1%} of the face's values beyond the pixel range, and storing "
            "8 bits clamps them; recovery may not bring this face back. Verify recovery before deleting the "
            "original (README: Security in plain words)"]


def _pixels(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):  # rows holding NaN are refused by nonfinite_rows, not stored
        return to_u8(x)


def nonfinite_error(label: str) -> InputError:
    return InputError(f"{label}: the model gave NaN or Inf values, which 8-bit pixels cannot hold, so nothing was "
                      "written (an fp16 or bf16 engine can overflow: use an fp32 one)")


def face_mask_or_refuse(mask: np.ndarray, label: str, hint: str = "") -> np.ndarray:
    """An empty mask would give back the input labelled anonymized, so it is refused."""
    if not mask.any():
        raise InputError(f"{label}: its mask marks no face (no pixel of it is white), so nothing would be "
                         f"anonymized{hint}")
    return mask


def check_crop(image: LoadedImage, image_size: int, recovering: bool = False) -> None:
    width, height = image.size
    if (width, height) != (image_size, image_size):
        raise not_a_crop(image.path, width, height, image_size, recovering)


def _check_model_size(header: dict, source: str, image_size: int) -> None:
    if header["model"]["image_size"] != image_size:
        raise ModelMismatchError(f"{source}: made for {header['model']['image_size']}px crops, "
                                 f"this model works at {image_size}px")


def recovery_crop_size(metadata_text: str, source: str, image_size: int) -> int | None:
    """The size the image under this record must have, known before its pixels are decoded: None for a
    photo, else the model's crop size. Metadata that does not parse, and a crop made for another model
    size, are refused here, so that neither is reported as an image of the wrong size."""
    header = container.parse_header(metadata_text, source)
    if header["mode"] == "photo":
        return None
    _check_model_size(header, source, image_size)
    return image_size


def check_double_anonymization(image: LoadedImage, existing_metadata: str | None, opts: Options) -> list[str]:
    """Refuses an input that carries revanon metadata unless --force; under --force, the notes that warn
    what a second anonymization costs."""
    if existing_metadata is None:
        return []
    state = container.recorded(existing_metadata, "state")
    if not opts.force:
        what = f"is a revanon {state} image" if state in ("anonymized", "recovered") else "carries revanon metadata"
        raise StateError(f"{image.path}: {what} (in the PNG or a sidecar beside it); anonymizing it again needs --force")
    if state != "anonymized":
        return []
    # a v1 image holds one set of records: the new one replaces the nonces and masks of the first
    return [f"{image.path}: was already anonymized, and an image records one anonymization: recovering this "
            "output undoes only the second, and the original face cannot be recovered from it, even with the key. "
            "Keep the first anonymized file to undo both"]


def face_nonces(opts: Options, count: int, given: list[bytes] | None = None) -> tuple[list[bytes], list[bytes | None]]:
    """The nonces the faces are flipped with, and the ones their records store: a fresh nonce per
    face, or under --insecure-key-reuse the zero nonce for all, stored as null (spec §5)."""
    if opts.insecure_key_reuse:
        return [ZERO_NONCE] * count, [None] * count
    used = list(given) if given is not None else [new_nonce() for _ in range(count)]
    # fixed nonces (tests, spec §9 comparisons): a reader refuses any but 16 bytes, one per face
    if len(used) != count or not all(isinstance(n, bytes) and len(n) == NONCE_BYTES for n in used):
        raise UsageError(f"{count} fixed nonce(s) of {NONCE_BYTES} bytes each are needed, not {quoted(given)}")
    # a repeated or zero nonce reuses a flip pattern, which only --insecure-key-reuse may do, and records as null
    if len(set(used)) != count or ZERO_NONCE in used:
        raise UsageError("fixed nonces must differ from each other and from the zero nonce; key reuse is "
                         "--insecure-key-reuse, whose records say so")
    return used, list(used)


@dataclass
class Crop:
    """One input of a group: the decoded image, the metadata it already carries (anonymize) or is to be
    recovered with (deanonymize), its path relative to the input folder (for --mask folders), and the
    name its errors give (default: the image's path)."""

    image: LoadedImage
    metadata: str | None
    relative: Path | str
    source: str | None = None

    @property
    def label(self) -> str:
        return self.source or str(self.image.path)


def _face_maps(masker, crops: list[Crop]) -> list[np.ndarray | Exception]:
    """Face maps for the crops in one masker call (one parser call per engine batch); where that call
    fails, each crop is asked alone so that the error lands on the crop that caused it."""
    if not crops:
        return []
    try:
        return list(masker.face_maps(np.stack([c.image.rgb for c in crops]), [c.relative for c in crops]))
    except Exception:  # noqa: BLE001 - retried one by one below
        return [_attempt(lambda c=c: masker.face_maps(c.image.rgb[None], [c.relative])[0]) for c in crops]


def _attempt(call):
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - the caller reports it against one input
        return detached(exc)


def in_parts(items: list, size: int) -> list[list]:
    """items in consecutive lists of at most `size` (a backend's or the evaluation's batch)."""
    size = max(1, int(size))
    return [items[start:start + size] for start in range(0, len(items), size)]


def _failed(results: list, indices: list[int], error: Exception) -> list:
    for i in indices:
        results[i] = error
    return results


def anonymize_crops(crops: list[Crop], backend: ModelBackend, masker, secret: Secret, opts: Options, *,
                    nonces: list[bytes] | None = None, salt: bytes | None = None,
                    callback: StepCallback | None = None) -> list[Output | Exception]:
    """Anonymize aligned crops together, so that an engine built for a batch gets full batches. Each
    crop gets its Output, or the error that stopped it alone. `nonces` (one per crop) and `salt` may be
    fixed for bit-for-bit comparisons (spec §9)."""
    double_run_notes: dict[int, list[str]] = {}

    def checked(i: int, crop: Crop) -> Crop:
        double_run_notes[i] = check_double_anonymization(crop.image, crop.metadata, opts)
        check_crop(crop.image, backend.image_size)
        return crop

    results: list = [_attempt(lambda i=i, c=c: checked(i, c)) for i, c in enumerate(crops)]
    passed = [i for i, r in enumerate(results) if isinstance(r, Crop)]
    masks: dict[int, np.ndarray] = {}
    for i, face_map in zip(passed, _face_maps(masker, [crops[i] for i in passed])):
        if isinstance(face_map, Exception):
            results[i] = face_map
            continue
        mask = _attempt(lambda: face_mask_or_refuse(latent_mask(face_map, backend.latent_shape[1:]), crops[i].label))
        if isinstance(mask, Exception):
            results[i] = mask
        else:
            masks[i] = mask
    ready = sorted(masks)
    if not ready:
        return results
    key, kdf = secret.for_anonymize(salt)
    used, stored = face_nonces(opts, len(ready), None if nonces is None else [nonces[i] for i in ready])
    mask_stack = np.stack([masks[i] for i in ready])
    x = _attempt(lambda: transform_crops_float(backend, np.stack([crops[i].image.rgb for i in ready]), mask_stack,
                                               used, flip_subkey(key), opts.steps, callback))
    if isinstance(x, Exception):  # the model failed the group: its crops, not those refused above, take the error
        return _failed(results, ready, x)
    shares = clamped_share(x, mask_stack)
    for i, rgb, nonce_field, share, broken in zip(ready, _pixels(x), stored, shares, nonfinite_rows(x)):
        if broken:
            results[i] = nonfinite_error(crops[i].label)
            continue
        image = crops[i].image
        header = container.new_header(
            steps=opts.steps, mode="crop", masker=masker.name, fingerprint=backend.fingerprint,
            image_size=backend.image_size, kdf=kdf,
            faces=[container.crop_face_record(backend.image_size, nonce_field, pack_mask(masks[i]))])
        header["auth"] = container.compute_auth(mac_subkey(key), header, rgb)
        results[i] = Output(LoadedImage(image.path, rgb, image.alpha, image.icc_profile), header,
                            double_run_notes[i] + clamping_notes(image.path, [share]))
    return results


def anonymize_image(image: LoadedImage, existing_metadata: str | None, backend: ModelBackend, masker, secret: Secret,
                    opts: Options, relative, *, nonce: bytes | None = None, salt: bytes | None = None,
                    callback: StepCallback | None = None) -> Output:
    """Anonymize one aligned crop."""
    return single(anonymize_crops([Crop(image, existing_metadata, relative)], backend, masker, secret, opts,
                                  nonces=None if nonce is None else [nonce], salt=salt, callback=callback))


@dataclass
class Authentic:
    """An image's metadata once its auth tag, state and model have been checked."""

    header: dict
    key: bytes = field(repr=False)
    verified: bool
    notes: list[str]


def check_metadata(crop: Crop, backend: ModelBackend, secret: Secret, opts: Options) -> Authentic:
    """Parse the metadata and check the auth MAC before anything else is done with the image, then the
    state and the model."""
    source, image = crop.label, crop.image
    header = container.parse_header(crop.metadata, source)
    notes: list[str] = []
    if header["state"] != "anonymized" and not opts.force:
        raise StateError(f"{source}: its state is {header['state']!r}, not 'anonymized'; "
                         "de-anonymizing it again needs --force")
    key = secret.for_header(header["kdf"], source)
    authentic = container.auth_matches(mac_subkey(key), header, image.rgb)
    if not authentic:
        if not opts.skip_auth:
            if header["state"] != "anonymized" and "auth" not in header:
                raise AuthError(f"{source}: a {header['state']} image carries no auth tag, so nothing can show that "
                                "this key made it; de-anonymizing it again needs --skip-auth as well as --force")
            raise AuthError(f"{source}: {container.AUTH_FAILED}")
        notes.append(f"{source}: auth check failed and was skipped (--skip-auth); the output is marked unverified")
    # spec §7: an output made under --skip-auth is marked unverified even where this image's check passed
    verified = authentic and not opts.skip_auth
    if any(face["nonce"] is None for face in header["faces"]):
        notes.append(f"{source}: made with --insecure-key-reuse (its nonce is null): every face made so with this "
                     "key has one flip pattern, so anyone holding one original/anonymized pair can undo the others; "
                     "treat the key as exposed")
    if header["model"]["fingerprint"] != backend.fingerprint:
        if not opts.ignore_model_mismatch:
            raise ModelMismatchError(
                f"{source}: made with model {header['model']['fingerprint'][:16]}…, this is "
                f"{backend.fingerprint[:16]}…; use the same model, or --ignore-model-mismatch")
        notes.append(f"{source}: model fingerprint differs (--ignore-model-mismatch)")
    _check_model_size(header, source, backend.image_size)
    if header["mode"] == "photo" and opts.recompute_mask:
        raise InputError(f"{source}: --recompute-mask works on crops; photo records keep their masks")
    return Authentic(header, key, verified, notes)


def _recovery_mask(crop: Crop, checked: Authentic, backend: ModelBackend, maskers: dict | None) -> np.ndarray:
    """The crop's latent mask: the stored one, or under --recompute-mask the named masker's."""
    source, header = crop.label, checked.header
    check_crop(crop.image, backend.image_size, recovering=True)
    if len(header["faces"]) != 1:
        raise MetadataError(f"{source}: a crop-mode image has exactly one face record")
    latent_hw = tuple(backend.latent_shape[1:])
    if maskers is None:
        return container.stored_mask(header["faces"][0], latent_hw, source)
    masker = maskers.get(header["masker"])
    if masker is None:
        needs = {"bisenet": "a parser (--parser with --model, or an engine built with one)",
                 "file": "the mask file (--mask)",
                 "landmarks": "dlib (pip install dlib-bin face_recognition_models)"}.get(header["masker"], "its flags")
        raise InputError(f"{source}: --recompute-mask re-runs the {header['masker']!r} masker named in its "
                         f"metadata, which needs {needs}; --masker, if given, must name that masker")
    recomputed = latent_mask(masker.face_maps(crop.image.rgb[None], [crop.relative])[0], latent_hw)
    try:
        differing = int(np.count_nonzero(recomputed != container.stored_mask(header["faces"][0], latent_hw, source)))
    except MetadataError:  # a damaged stored mask is what --recompute-mask works around
        differing = 0
    if differing:
        checked.notes.append(f"{source}: the recomputed mask differs from the stored one in {differing} of "
                             f"{recomputed.size} latent cells, and where they differ the face does not come back; "
                             "without --recompute-mask the stored mask is used")
    return recomputed


def deanonymize_crops(crops: list[Crop], backend: ModelBackend, secret: Secret, opts: Options,
                      maskers: dict | None = None, callback: StepCallback | None = None) -> list[Output | Exception]:
    """Recover images together. Each one's metadata and auth tag are checked first; a photo is then
    recovered on its own (its faces go in waves), and the crops that share a step count go through the
    model as one group, each with its own key and nonce. Each image gets its Output or its own error."""
    return recover_authenticated(crops, authenticate_crops(crops, backend, secret, opts), backend, opts, maskers,
                                 callback)


def authenticate_crops(crops: list[Crop], backend: ModelBackend, secret: Secret,
                       opts: Options) -> list[Authentic | Exception]:
    """Each image's record checked (scrypt, the tag, the model): no model work, so that a library caller
    does it before its turn on the model."""
    return [_attempt(lambda crop=crop: check_metadata(crop, backend, secret, opts)) for crop in crops]


def recover_authenticated(crops: list[Crop], checks: list[Authentic | Exception], backend: ModelBackend,
                          opts: Options, maskers: dict | None = None,
                          callback: StepCallback | None = None) -> list[Output | Exception]:
    """deanonymize_crops, given authenticate_crops' result for the same crops."""
    from .photo import deanonymize_photo

    recompute = (maskers or {}) if opts.recompute_mask else None
    results: list[Output | Exception | None] = [None] * len(crops)
    authentic: dict[int, Authentic] = {}
    for i, checked in enumerate(checks):
        if isinstance(checked, Exception):
            results[i] = checked
        else:
            authentic[i] = checked
    masks: dict[int, np.ndarray] = {}
    for i, checked in authentic.items():
        crop = crops[i]
        if checked.header["mode"] == "photo":
            results[i] = _attempt(lambda: deanonymize_photo(crop.image, checked.header, checked.key, crop.label,
                                                            backend, opts, checked.verified, checked.notes, callback))
            continue
        mask = _attempt(lambda: _recovery_mask(crop, checked, backend, recompute))
        if isinstance(mask, Exception):
            results[i] = mask
        else:
            masks[i] = mask
    by_steps: dict[int, list[int]] = {}
    for i in masks:
        by_steps.setdefault(authentic[i].header["steps"], []).append(i)
    for steps, group in sorted(by_steps.items()):
        patterns = np.stack([flip_pattern(flip_subkey(authentic[i].key),
                                          container.face_nonce(authentic[i].header["faces"][0]) or ZERO_NONCE,
                                          tuple(backend.latent_shape)) for i in group])
        x = _attempt(lambda: _transform_with_patterns(backend, np.stack([crops[i].image.rgb for i in group]),
                                                      np.stack([masks[i] for i in group]), patterns, steps, callback))
        if isinstance(x, Exception):
            _failed(results, group, x)
            continue
        for i, rgb, broken in zip(group, _pixels(x), nonfinite_rows(x)):
            if broken:
                results[i] = nonfinite_error(crops[i].label)
                continue
            checked, image = authentic[i], crops[i].image
            results[i] = Output(LoadedImage(image.path, rgb, image.alpha, image.icc_profile),
                                container.recovered_header(checked.header, checked.verified), checked.notes)
    return results


def deanonymize_image(image: LoadedImage, metadata_text: str, source: str, backend: ModelBackend, secret: Secret,
                      opts: Options, relative, maskers: dict | None = None, callback: StepCallback | None = None) -> Output:
    """Recover one image (crop or photo mode, as its metadata says)."""
    return single(deanonymize_crops([Crop(image, metadata_text, relative, source)], backend, secret, opts, maskers,
                                    callback))


def single(results: list) -> Output:
    """The Output of a one-input call, or its error raised."""
    if isinstance(results[0], Exception):
        raise results[0]
    return results[0]
