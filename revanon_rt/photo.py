"""Photo mode (spec §8): find every face, align it to the model's crop, transform the crops,
and paste back only the pixels that land on the face mask. Recovery uses the stored records
(affine, nonce, mask) alone and never re-detects faces.

    photo -> faces -> affines -> crops -> masks -> transform (batched) -> paste back -> container
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import container
from .errors import InputError, MetadataError, UsageError
from .images import LoadedImage
from .keys import ZERO_NONCE, Secret, flip_subkey, mac_subkey
from .masks import latent_mask, pack_mask
from .pixels import clamped_share, nonfinite_rows, to_u8
from .pipeline import (Options, Output, clamping_notes, face_mask_or_refuse, face_nonces, in_parts,
                       nonfinite_error, check_double_anonymization, transform_crops_float)
from .sampler import ModelBackend


# -- the geometry of §8 -----------------------------------------------------------------------

def _bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear samples of an H x W x C uint8 image at float coordinates, edges replicated, float32."""
    h, w = image.shape[:2]
    x = np.clip(x, 0, w - 1).astype(np.float32)
    y = np.clip(y, 0, h - 1).astype(np.float32)
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    img = image.astype(np.float32)
    one = np.float32(1)
    top = img[y0, x0] * (one - fx) + img[y0, x1] * fx
    bottom = img[y1, x0] * (one - fx) + img[y1, x1] * fx
    return top * (one - fy) + bottom * fy


def _round_to_u8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def inverse_affine(affine: np.ndarray) -> np.ndarray:
    linear, shift = affine[:, :2], affine[:, 2]
    inv = np.linalg.inv(linear)
    return np.hstack([inv, (-inv @ shift)[:, None]])


# A record's affine is only known to be finite: under --skip-auth a forged one may overflow the geometry,
# which then samples nothing, and numpy's warnings about it would only clutter the one-line report.
@np.errstate(all="ignore")
def sample_crop(photo: np.ndarray, affine: np.ndarray, size: int) -> np.ndarray:
    """The size x size crop whose pixel (u, v) is the photo's bilinear sample at affine⁻¹(u, v)."""
    inv = inverse_affine(affine)
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    x = inv[0, 0] * u + inv[0, 1] * v + inv[0, 2]
    y = inv[1, 0] * u + inv[1, 1] * v + inv[1, 2]
    return _round_to_u8(_bilinear(photo, x, y))


@np.errstate(all="ignore")  # as sample_crop
def footprint(affine: np.ndarray, size: int, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """The photo pixel box (x0, y0, x1, y1), end-exclusive, that can land inside the crop."""
    inv = inverse_affine(affine)
    corners = np.array([[0, 0], [size - 1, 0], [0, size - 1], [size - 1, size - 1]], dtype=np.float64)
    xy = corners @ inv[:, :2].T + inv[:, 2]
    h, w = shape
    x0, y0 = np.floor(xy.min(0)).astype(int) - 1
    x1, y1 = np.ceil(xy.max(0)).astype(int) + 2
    return max(0, x0), max(0, y0), min(w, x1), min(h, y1)


@np.errstate(all="ignore")  # as sample_crop
def paste_back(photo: np.ndarray, crop: np.ndarray, affine: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A copy of the photo where pixel p is replaced iff affine(p) lands inside the crop on a crop
    pixel whose mask cell is face; the new value is the crop's bilinear sample at affine(p)."""
    size = crop.shape[0]
    out = photo.copy()
    x0, y0, x1, y1 = footprint(affine, size, photo.shape[:2])
    if x0 >= x1 or y0 >= y1:
        return out
    y, x = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    u = (affine[0, 0] * x + affine[0, 1] * y + affine[0, 2]).astype(np.float32)
    v = (affine[1, 0] * x + affine[1, 1] * y + affine[1, 2]).astype(np.float32)
    inside = (u >= 0) & (u <= size - 1) & (v >= 0) & (v <= size - 1)
    ui = np.clip(np.rint(u), 0, size - 1).astype(np.int64)
    vi = np.clip(np.rint(v), 0, size - 1).astype(np.int64)
    h, w = mask.shape
    on_face = mask[vi * h // size, ui * w // size].astype(bool)
    replace = inside & on_face
    if replace.any():
        values = _round_to_u8(_bilinear(crop, u[replace], v[replace]))
        region = out[y0:y1, x0:x1]
        region[replace] = values
    return out


def waves(boxes: list[tuple[int, int, int, int]]) -> list[list[int]]:
    """Consecutive runs of faces whose footprints do not overlap: each run may go in one batch and
    the result equals processing the faces one after another in this order."""
    def overlap(a, b):
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    groups: list[list[int]] = []
    for i, box in enumerate(boxes):
        if groups and not any(overlap(box, boxes[j]) for j in groups[-1]):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


# -- finding faces ----------------------------------------------------------------------------

@dataclass
class PlannedFace:
    box: list[float]
    affine: np.ndarray
    landmarks: np.ndarray | None = None
    number: int | None = None  # as --dry-run draws it and --skip counts it


@dataclass
class Selection:
    faces: str = "all"  # or "largest"
    min_face: int = 0
    skip: tuple[int, ...] = ()

    def apply(self, found, source=None, check: bool = True) -> tuple[list[int], list[int]]:
        """Indices into `found`: the faces --dry-run numbers (those of at least --min-face; face i
        of the drawing is eligible[i]), and the faces transformed after --skip and --faces. With check,
        a --skip number the photo does not have is refused: the user meant some other face."""
        eligible = [i for i, f in enumerate(found) if f.size >= self.min_face]
        beyond = sorted(n for n in self.skip if n >= len(eligible))
        if beyond and check:
            numbered = f", 0 to {len(eligible) - 1}" if eligible else ""
            raise InputError(f"{source or 'photo'}: --skip {','.join(map(str, beyond))}: it has {len(eligible)} "
                             f"face(s) to number{numbered} (see --dry-run)")
        kept = [i for number, i in enumerate(eligible) if number not in self.skip]
        if self.faces == "largest" and kept:
            kept = [max(kept, key=lambda i: found[i].size)]
        return eligible, kept


def plan_faces(found, crop_size: int, selection: Selection, source=None) -> list[PlannedFace]:
    """Detected faces in record order (top to bottom, left to right), numbered as --dry-run draws
    them, filtered by --min-face, --skip and --faces."""
    from .faces import similarity_to_template

    planned = []
    eligible, kept = selection.apply(found, source)
    for i in kept:
        f = found[i]
        # the stored affine is what recovery reads: use exactly its JSON float values from here on
        affine = np.array(similarity_to_template(f.landmarks, crop_size).tolist(), dtype=np.float64)
        planned.append(PlannedFace([round(v, 2) for v in f.box], affine, f.landmarks, eligible.index(i)))
    return planned


def crop_landmarks(landmarks: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return landmarks @ affine[:, :2].T + affine[:, 2]


# -- the transform over a photo ---------------------------------------------------------------

def _run_faces(backend: ModelBackend, photo: np.ndarray, affines: list[np.ndarray], masks: list[np.ndarray],
               nonces: list[bytes], k_flip: bytes, steps: int, order: list[int], source,
               callback=None) -> tuple[np.ndarray, list[float]]:
    """Transform the faces in `order`, batching runs whose footprints do not overlap, at most the backend's
    batch at a time (a crowd would otherwise go through the model at once). Also returns, per face, the
    share of its values that 8-bit storage clamped."""
    size = backend.image_size
    current = photo
    clamped = []
    boxes = [footprint(affines[i], size, photo.shape[:2]) for i in order]
    for wave in waves(boxes):
        # the faces of a wave do not overlap, so its parts give what the whole wave gives
        for part in in_parts(wave, backend.batch):
            chosen = [order[j] for j in part]
            crops = np.stack([sample_crop(current, affines[i], size) for i in chosen])
            chosen_masks = np.stack([masks[i] for i in chosen])
            x = transform_crops_float(backend, crops, chosen_masks, [nonces[i] for i in chosen], k_flip, steps,
                                      callback)
            broken = nonfinite_rows(x)
            if broken.any():
                raise nonfinite_error(f"{source} (face {chosen[int(np.argmax(broken))]})")
            clamped.extend(clamped_share(x, chosen_masks))
            for crop, i in zip(to_u8(x), chosen):
                current = paste_back(current, crop, affines[i], masks[i])
    return current, clamped


def require_five_landmarks(n_landmarks: int) -> None:
    """Photo mode aligns each face with the 5-point model and draws its region from those same points."""
    if n_landmarks != 5:
        raise UsageError("photo mode finds, aligns and masks faces with dlib's 5-point landmarks; --landmarks 68 "
                         "works on aligned crops (--mode crop)")


def face_masks_for_crops(masker, crops: np.ndarray, landmarks: list, relative, latent_hw,
                         per_call: int = 1) -> list[np.ndarray]:
    if getattr(masker, "name", "") == "landmarks":
        require_five_landmarks(masker.n_landmarks)
        maps = [masker.face_map_from_landmarks(lm, crops.shape[1]) for lm in landmarks]
    else:
        maps = [m for part in in_parts(list(range(len(crops))), per_call)
                for m in masker.face_maps(crops[part], [relative] * len(part))]
    return [latent_mask(m, latent_hw) for m in maps]


def anonymize_photo(image: LoadedImage, existing_metadata: str | None, backend: ModelBackend, masker, secret: Secret,
                    opts: Options, relative, *, detector=None, selection: Selection | None = None,
                    planned: list[PlannedFace] | None = None, found: list | None = None,
                    nonces: list[bytes] | None = None, salt: bytes | None = None, callback=None,
                    allow_no_faces: bool = False) -> Output:
    """Anonymize every selected face of a photo. `planned` replaces detection (a library detecting outside
    its model's turn, tests, tools), with the `found` faces it was planned from, if any, for the message when
    none was selected; `nonces` and `salt` may be fixed for bit-for-bit comparisons. A photo with no face to
    anonymize is refused unless allow_no_faces, so that an unchanged photo is never taken for an anonymized one."""
    notes = check_double_anonymization(image, existing_metadata, opts)
    key, kdf = secret.for_anonymize(salt)
    size = backend.image_size
    if planned is None:
        found = detector.detect(image.rgb)
        planned = plan_faces(found, size, selection or Selection(), image.path)
    if len(planned) > container.MAX_FACES:  # readers refuse more: its faces could never be recovered
        raise InputError(f"{image.path}: {len(planned)} faces selected, and a revanon v1 image records at most "
                         f"{container.MAX_FACES}; select fewer (--min-face, --skip) or split the photo")
    if planned:
        rgb, records = _anonymize_faces(image, planned, backend, masker, key, opts, relative, nonces, callback, notes)
    else:
        why = (f"{len(found)} face(s) found and none selected (--min-face, --skip, --faces)" if found else
               "no faces found")
        if not allow_no_faces:
            raise InputError(f"{image.path}: {why}, so nothing was anonymized (--allow-no-faces, or "
                             "allow_no_faces=True, writes such a photo unchanged, with its record)")
        notes.append(f"{image.path}: {why}; the pixels pass through unchanged")
        face_nonces(opts, 0, nonces)  # fixed nonces for faces that are not there are a caller's mistake
        rgb, records = image.rgb.copy(), []
    header = container.new_header(steps=opts.steps, mode="photo", masker=masker.name, fingerprint=backend.fingerprint,
                                  image_size=size, kdf=kdf, faces=records)
    header["auth"] = container.compute_auth(mac_subkey(key), header, rgb)
    return Output(LoadedImage(image.path, rgb, image.alpha, image.icc_profile), header, notes,
                  detail=f"{len(planned)} face(s)")


def _anonymize_faces(image: LoadedImage, planned: list[PlannedFace], backend: ModelBackend, masker, key: bytes,
                     opts: Options, relative, nonces: list[bytes] | None, callback, notes: list[str]):
    """The photo with its planned faces anonymized, and their records; notes gets what the user should hear."""
    size = backend.image_size
    affines = [p.affine for p in planned]
    crops = np.stack([sample_crop(image.rgb, a, size) for a in affines])
    landmarks = [crop_landmarks(p.landmarks, p.affine) if p.landmarks is not None else None for p in planned]
    masks = face_masks_for_crops(masker, crops, landmarks, relative, backend.latent_shape[1:], backend.batch)
    masks = [face_mask_or_refuse(m, f"{image.path} (face at {p.box})",
                                 "" if p.number is None else f"; --skip {p.number} leaves this face out")
             for m, p in zip(masks, planned)]
    used, stored = face_nonces(opts, len(planned), nonces)
    rgb, clamped = _run_faces(backend, image.rgb, affines, masks, used, flip_subkey(key), opts.steps,
                              list(range(len(planned))), image.path, callback)
    notes += clamping_notes(image.path, clamped)
    records = [container.face_record(p.box, p.affine.tolist(), n, pack_mask(m)) for p, n, m in zip(planned, stored, masks)]
    return rgb, records


def deanonymize_photo(image: LoadedImage, header: dict, key: bytes, source: str, backend: ModelBackend, opts: Options,
                      verified: bool, notes: list[str], callback=None) -> Output:
    """Recover the faces of a photo from its records, in reverse order. The caller has already
    checked auth, state and model (pipeline.check_metadata)."""
    latent_hw = tuple(backend.latent_shape[1:])
    affines, masks, nonces = [], [], []
    for index, face in enumerate(header["faces"]):
        affine = np.array(face["affine"], dtype=np.float64)
        if abs(np.linalg.det(affine[:, :2])) < 1e-9:
            raise MetadataError(f"{source} (face {index}): the affine is not invertible")
        mask = container.stored_mask(face, latent_hw, f"{source} (face {index})")
        affines.append(affine)
        masks.append(mask)
        nonces.append(container.face_nonce(face) or ZERO_NONCE)
    order = list(range(len(affines)))[::-1]
    rgb = _run_faces(backend, image.rgb, affines, masks, nonces, flip_subkey(key), header["steps"], order, source,
                     callback)[0] if order else image.rgb.copy()
    return Output(LoadedImage(image.path, rgb, image.alpha, image.icc_profile),
                  container.recovered_header(header, verified), notes, detail=f"{len(affines)} face(s)")


def draw_faces(rgb: np.ndarray, found, selection: Selection) -> np.ndarray:
    """--dry-run: every detected face boxed and numbered as --skip counts them; skipped ones in grey."""
    from PIL import Image, ImageDraw, ImageFont

    im = Image.fromarray(rgb).convert("RGB")
    draw = ImageDraw.Draw(im)
    eligible, kept = selection.apply(found, check=False)  # the drawing is how the user finds the numbers
    width = max(2, rgb.shape[1] // 300)
    try:  # numbers readable on a photo fitted to a screen; the built-in bitmap font is 10 px at any size
        font = ImageFont.load_default(size=max(14, rgb.shape[1] // 50))
    except (ImportError, OSError, TypeError):  # a Pillow without FreeType
        font = ImageFont.load_default()
    for i, face in enumerate(found):
        if i not in eligible:
            draw.rectangle(face.box, outline=(150, 150, 150), width=1)
    # the faces that will be transformed go last, so that an overlapping skipped box never hides them
    for number, i in sorted(enumerate(eligible), key=lambda pair: pair[1] in kept):
        colour = (255, 40, 40) if i in kept else (150, 150, 150)
        box = found[i].box
        draw.rectangle(box, outline=colour, width=width)
        label = draw.textbbox((box[0] + width, box[1] + width), str(number), font=font)
        draw.rectangle(label, fill=colour)
        draw.text((box[0] + width, box[1] + width), str(number), fill=(255, 255, 255), font=font)
    return np.asarray(im)


def describe_faces(found, selection: Selection) -> str:
    """--dry-run's line per photo: each numbered face's size and place, and which are left out."""
    eligible, kept = selection.apply(found, check=False)
    parts = [f"{number}: {found[i].size:.0f} px at {found[i].box[0]:.0f},{found[i].box[1]:.0f}"
             + ("" if i in kept else " (left out)") for number, i in enumerate(eligible)]
    small = len(found) - len(eligible)
    return (f"{len(found)} face(s)" + (f"; {', '.join(parts)}" if parts else "")
            + (f"; {small} under --min-face" if small else ""))
