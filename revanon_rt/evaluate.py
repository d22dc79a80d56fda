"""`revanon-rt eval`: identity evaluation on LFW pairs, the reference paper's protocol.

For every pair the second image is transformed (anonymized; recovered with the right key, with a
random key, with a key one bit away; two known-plaintext attacks) and compared with the first image
using dlib's 128-D descriptor (cosine). The threshold is set at FAR = 0.1% on clean impostor scores.

Two stages, so that the heavy one can run where the model runs and the other where dlib is:
    transform: masks, every transformed image (PNG), attack outputs, linkage ranks
    score:     descriptors of all images, then the metrics
A chunk (--start/--limit) writes its own folder; `eval-merge` summarizes all chunks of a folder, and
`eval-merge --extend` adds them to an earlier summary whose chunks are gone.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import re
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError, UsageError
from .faces import template_region
from .engines.manifest import file_sha256
from .images import encode_png, image_members, write_atomic, zip_image_rgb
from .keys import ZERO_NONCE, flip_subkey
from .masks import face_map_from_file, latent_mask
from .pixels import pixel_region, psnr, to_model, to_u8
from .pipeline import crop_patterns, in_parts
from .sampler import flipped_and_denoised, inverted

CONDITIONS = ("original", "anonymized", "recovered", "random_key", "one_bit_key", "attack_nonce", "attack_reuse")
FAR = 0.001


@dataclass(frozen=True)
class Pair:
    first: str
    second: str
    same: bool


def member(name: str, number: str) -> str:
    """The zip member of LFW's image `number` of `name`. Names become folders of the outputs, so one that
    could lead out of them (a path separator, `..`) is refused."""
    if not re.fullmatch(r"[^/\\\x00]+", name) or name in (".", ".."):
        raise UsageError(f"{name!r}: not a person's name in a pairs file (names hold no path separators)")
    if not str(number).isdigit():
        raise UsageError(f"{number!r}: not an image number in a pairs file")
    return f"{name}/{name}_{int(number):04d}.jpg"


def identity(name: str) -> str:
    return name.split("/")[0]


def read_pairs(path: Path) -> list[Pair]:
    """LFW pairs.txt: a header line, then `name i j` (same person) or `name1 i name2 j`."""
    try:
        lines = [line.split() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the pairs file ({exc})") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a text pairs file (is it the --images zip?)") from None
    pairs = []
    for fields in lines[1:]:
        if len(fields) == 3:
            pairs.append(Pair(member(fields[0], fields[1]), member(fields[0], fields[2]), True))
        elif len(fields) == 4:
            pairs.append(Pair(member(fields[0], fields[1]), member(fields[2], fields[3]), False))
        else:
            raise UsageError(f"{path}: a pair line has 3 or 4 fields, not {fields!r}")
    return pairs


class ZipImages:
    """Crops from the zip at the model's size (Lanczos when the sizes differ), cached."""

    def __init__(self, path: Path, size: int):
        try:
            self.archive = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile) as exc:
            raise UsageError(f"{path}: not a readable zip ({exc})") from None
        self.names = set(self.archive.namelist())
        self.image_names = image_members(self.archive)
        self.path, self.size = path, size
        self._cache: dict[str, np.ndarray] = {}

    def check_pairs(self, pairs: list[Pair]) -> None:
        """Every image the pairs name is in the zip: found now, not after a chunk's transform."""
        missing = sorted({name for p in pairs for name in (p.first, p.second)} - self.names)
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise UsageError(f"{self.path}: the pairs name {len(missing)} image(s) the zip does not hold: {shown}")

    def content_crcs(self, names: list[str]) -> list[int]:
        return [self.archive.getinfo(n).CRC for n in names]

    def __call__(self, name: str) -> np.ndarray:
        if name not in self._cache:
            if name not in self.names:
                raise UsageError(f"{name}: not in the images zip")
            im = zip_image_rgb(self.archive, name, self.path)
            if im.size != (self.size, self.size):
                im = im.resize((self.size, self.size), Image.Resampling.LANCZOS)
            self._cache[name] = np.asarray(im).copy()
        return self._cache[name]


def _png_name(name: str) -> str:
    return name.rsplit(".", 1)[0] + ".png"


def _save(folder: Path, name: str, rgb: np.ndarray) -> None:
    write_atomic(folder / _png_name(name), encode_png(rgb, None, None, {}), overwrite=True)


def _load(folder: Path, name: str) -> np.ndarray:
    with Image.open(folder / _png_name(name)) as im:
        return np.asarray(im.convert("RGB")).copy()


# -- the transform stage --------------------------------------------------------------------------

def _inverted(backend, rgbs: np.ndarray, steps: int) -> list[np.ndarray]:
    """keep list of the DDIM inversion of one batch of uint8 crops."""
    return inverted(backend, to_model(rgbs), backend.schedule(steps))


def _denoised(backend, keep: list[np.ndarray], masks: np.ndarray, patterns: np.ndarray, steps: int) -> np.ndarray:
    """The second half of T from a shared inversion, as stored uint8 crops; keep is left intact."""
    return to_u8(flipped_and_denoised(backend, list(keep), masks[:, None], patterns, backend.schedule(steps)))


def known_plaintext_estimates(z_anon: np.ndarray, z_orig: np.ndarray, masks: np.ndarray,
                              partners: list[int]) -> np.ndarray:
    """The flips an attacker estimates from each partner's original and anonymized image:
    sign(z_T anonymized) * sign(z_T original) inside the partner's mask, no flip outside it."""
    return np.stack([np.where(masks[a][None] > 0, np.sign(z_anon[a]) * np.sign(z_orig[a]), 1.0)
                     for a in partners]).astype(np.float32)


def transform_conditions(backend, rgbs: np.ndarray, masks: np.ndarray, nonces: list[bytes], keys: dict[str, bytes],
                         steps: int, batch: int, tick=lambda phase, n: None) -> tuple[dict, np.ndarray, np.ndarray]:
    """Every transformed stack of the evaluation, and z_T of the originals and of the anonymized images.

    keys: "key", "random_key", "one_bit_key". Conditions that start from the same image share its
    inversion, which is deterministic: the anonymized image is inverted once for the three recoveries
    and the attack, the original once for anonymization, key reuse and the attacker's estimate. The
    outputs are the bits that separate transform_crops calls give, with 41% fewer UNet calls.
    """
    batches = in_parts(list(range(len(rgbs))), batch)
    patterns = {name: crop_patterns(backend, nonces, flip_subkey(k)) for name, k in keys.items()}
    reused = crop_patterns(backend, [ZERO_NONCE] * len(rgbs), flip_subkey(keys["key"]))
    out = {name: np.zeros_like(rgbs) for name in
           ("anonymized", "recovered", "random_key", "one_bit_key", "attack_nonce", "attack_reuse")}
    reuse = np.zeros_like(rgbs)
    z_orig = np.zeros((len(rgbs), *backend.latent_shape), np.float32)

    tick("anonymize", 0)
    for idx in batches:
        keep = _inverted(backend, rgbs[idx], steps)
        z_orig[idx] = keep[-1]
        out["anonymized"][idx] = _denoised(backend, keep, masks[idx], patterns["key"][idx], steps)
        reuse[idx] = _denoised(backend, keep, masks[idx], reused[idx], steps)
        tick("anonymize", len(idx))

    # Known plaintext: the attacker holds A = the next target's original and anonymized image, and
    # estimates the flips as sign(z_T(anonymized A)) * sign(z_T(original A)) inside A's mask. The
    # attack on a batch waits for the next batch's inversion, which holds the last target's A.
    def attack_pending(condition, z_anon, pending):
        idx, keep = pending
        estimates = known_plaintext_estimates(z_anon, z_orig, masks, [(i + 1) % len(rgbs) for i in idx])
        out[condition][idx] = _denoised(backend, keep, masks[idx], estimates, steps)

    z_anonymized = {}
    # "recover": the three keys and the attack with per-face nonces; "attack": the attack under key reuse
    for phase, condition, stack, recoveries in (
            ("recover", "attack_nonce", out["anonymized"], ("recovered", "random_key", "one_bit_key")),
            ("attack", "attack_reuse", reuse, ())):
        tick(phase, 0)
        z_anon = z_anonymized[condition] = np.zeros_like(z_orig)
        pending = None
        for idx in batches:
            keep = _inverted(backend, stack[idx], steps)
            z_anon[idx] = keep[-1]
            for name, key_name in zip(recoveries, ("key", "random_key", "one_bit_key")):
                out[name][idx] = _denoised(backend, keep, masks[idx], patterns[key_name][idx], steps)
            if pending is not None:
                attack_pending(condition, z_anon, pending)
            pending = (idx, keep)
            tick(phase, len(idx))
        attack_pending(condition, z_anon, pending)  # its last partner is target 0, inverted first
    return out, z_orig, z_anonymized["attack_nonce"]


def run_transform(backend, pairs: list[Pair], images: ZipImages, out: Path, *, masker=None, mask_dir: Path | None = None,
                  steps: int = 50, batch: int = 16, candidates: int = 100, seed: int = 0, progress=None,
                  pool_cache: Path | None = None, genuine_only: bool = False, pairs_total: int | None = None,
                  pairs_sha256: str | None = None) -> dict:
    """Write masks and every transformed second image; return the run's facts (no secrets).

    pool_cache: a file that keeps the linkage pool's inversions for the other chunks of the run.
    genuine_only: transform only the second images of genuine pairs. TAR counts nothing else, and
    impostor pairs still give their clean images to the threshold.
    pairs_total: how many pairs the whole pairs file holds, so that a merge can say which no chunk covers.
    pairs_sha256: the pairs file's, so that a merge refuses chunks of different pairs files."""
    keys = evaluation_keys(seed)
    targets = sorted({p.second for p in pairs if p.same or not genuine_only})
    if len(targets) == 1:
        raise UsageError(f"this chunk transforms one image ({targets[0]}); the known-plaintext attack takes the "
                         "attacker's pair from another image of the same chunk, so give a chunk with at least two")
    for stale in ("features.npz", "transform.json"):  # a chunk done again: its old scores describe other images
        (out / stale).unlink(missing_ok=True)
    started = time.perf_counter()
    pool = linkage_pool(images, candidates - 1, seed)
    ranks, ranked, fallbacks, least_candidates = [], [], [], 1 + min(len(pool), candidates - 1)
    if targets:
        ranks, ranked, fallbacks, least_candidates = _transform_targets(
            backend, targets, images, out, seed, keys, pool, masker=masker, mask_dir=mask_dir, steps=steps,
            batch=batch, candidates=candidates, tick=progress or (lambda phase, n: None), pool_cache=pool_cache)
    facts = {"targets": targets, "steps": steps, "model_fingerprint": backend.fingerprint,
             "precision": getattr(backend, "precision", "fp32"), "images_sha256": file_sha256(images.path),
             "pairs_sha256": pairs_sha256,
             "image_size": backend.image_size, "latent_shape": list(backend.latent_shape),
             "linkage_ranks": ranks, "linkage_names": ranked, "linkage_candidates": least_candidates,
             "linkage_pool": pool, "genuine_only": genuine_only,
             "transform_seconds": time.perf_counter() - started, "mask_fallbacks": len(fallbacks),
             "mask_fallback_names": fallbacks,
             "pairs": [[p.first, p.second, p.same] for p in pairs], "pairs_total": pairs_total}
    out.mkdir(parents=True, exist_ok=True)
    (out / "transform.json").write_text(json.dumps(facts, indent=1))
    return facts


def _transform_targets(backend, targets: list[str], images: ZipImages, out: Path, seed: int, keys: dict[str, bytes],
                       pool: list[str], *, masker, mask_dir, steps, batch, candidates, tick, pool_cache):
    """Masks, every condition's images and the linkage ranks of the targets; returns (ranks, the names they
    belong to, the targets whose mask fell back to the template, the fewest candidates a target was ranked
    among)."""
    c, h, w = backend.latent_shape
    rgbs = np.stack([images(n) for n in targets])
    maps, fallbacks = [], []
    tick("masks", 0)
    for name, rgb in zip(targets, rgbs):
        if mask_dir is not None:
            own = mask_dir / name  # named as the member, or as the member with .png, as `run`'s --mask folder
            face_map = face_map_from_file(own if own.is_file() else mask_dir / _png_name(name))
        else:
            try:
                face_map = masker.face_maps(rgb[None], [name])[0]
            except InputError:
                if masker.name != "landmarks":
                    raise
                # the crops are aligned: where dlib finds no face, the template says where it is
                face_map = template_region(images.size)
                fallbacks.append(name)
        _save(out / "masks", name, np.repeat((face_map * 255).astype(np.uint8)[..., None], 3, axis=2))
        maps.append(face_map)
        tick("masks", 1)
    masks = np.stack([latent_mask(f, (h, w)) for f in maps])
    nonces = [image_nonce(seed, name) for name in targets]

    transformed, z_orig, z_anon = transform_conditions(backend, rgbs, masks, nonces, keys, steps, batch, tick)
    results = {"original": rgbs, **transformed}

    # Key-free linkage: rank `candidates` originals by the correlation of |z_T| inside the mask.
    z_pool = _pool_latents(backend, images, pool, steps, batch, pool_cache, tick)
    ranks, ranked, least = [], [], candidates
    for i, name in enumerate(targets):
        others = [j for j, p in enumerate(pool) if identity(p) != identity(name)][: candidates - 1]
        least = min(least, 1 + len(others))
        cands = np.concatenate([z_orig[i:i + 1], z_pool[others]])
        m = np.broadcast_to(masks[i][None] > 0, (c, h, w))
        probe = np.abs(z_anon[i])[m]
        if probe.size < 2 or np.ptp(probe) == 0:
            continue  # an empty mask flips nothing and ranks nothing: no correlation to compare
        with np.errstate(invalid="ignore", divide="ignore"):
            scores = np.nan_to_num([np.corrcoef(probe, np.abs(cand)[m])[0, 1] for cand in cands], nan=-1.0)
        ranks.append(int(np.sum(scores > scores[0])))  # 0 = the true source ranked first
        ranked.append(name)

    for condition, stack in results.items():
        for name, rgb in zip(targets, stack):
            _save(out / "images" / condition, name, rgb)
    return ranks, ranked, fallbacks, least


def evaluation_keys(seed: int) -> dict[str, bytes]:
    """The run's key, a random key and the key one bit away: throwaway keys drawn from the seed, so that an
    evaluation can be repeated exactly."""
    rng = np.random.default_rng(seed)
    keys = {"key": bytes(rng.integers(0, 256, 32, dtype=np.uint8)),
            "random_key": bytes(rng.integers(0, 256, 32, dtype=np.uint8))}
    keys["one_bit_key"] = bytes([keys["key"][0] ^ 0x01]) + keys["key"][1:]
    return keys


def image_nonce(seed: int, name: str) -> bytes:
    """Each image's nonce, from the run's seed and its name: distinct per face as the tool's are, and the
    same whichever chunk transforms the image."""
    return hashlib.sha256(f"revanon-eval/{seed}/{name}".encode()).digest()[:16]


def linkage_pool(images: ZipImages, count: int, seed: int) -> list[str]:
    """The candidate originals of the linkage test: one draw from the whole zip, the same for every
    chunk of an evaluation, so that their inversions are computed once. Each image is ranked against
    the pool members of other identities (count + 20 are drawn so that count of them remain)."""
    names = list(images.image_names)
    if len(names) > count + 20:
        rng = np.random.default_rng([seed, 1])
        names = [names[i] for i in sorted(rng.choice(len(names), count + 20, replace=False))]
    return names


def _pool_latents(backend, images: ZipImages, pool: list[str], steps: int, batch: int, cache: Path | None,
                  tick) -> np.ndarray:
    """z_T of every pool image, from the cache when it was made by this backend, model and step count."""
    key = {**backend.identity, "fingerprint": backend.fingerprint, "steps": steps, "names": pool,
           "crc32": images.content_crcs(pool)}  # the same names in a re-made zip are other pixels
    tick("linkage", 0)
    if cache is not None and cache.exists():
        with np.load(cache) as stored:
            if json.loads(str(stored["key"])) == key:
                tick("linkage", len(pool))
                return stored["z_T"]
    c, h, w = backend.latent_shape
    z_pool = np.zeros((len(pool), c, h, w), np.float32)
    for idx in in_parts(list(range(len(pool))), batch):
        z_pool[idx] = _inverted(backend, np.stack([images(pool[i]) for i in idx]), steps)[-1]
        tick("linkage", len(idx))
    if cache is not None:
        buffer = io.BytesIO()
        np.savez(buffer, key=json.dumps(key), z_T=z_pool)
        write_atomic(cache, buffer.getvalue(), overwrite=True)
    return z_pool


# -- the score stage -----------------------------------------------------------------------------

def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM over channels, Gaussian window 11 (σ 1.5), as in Wang et al. 2004."""
    radius, sigma = 5, 1.5
    g = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    g /= g.sum()

    def blur(x):
        x = np.apply_along_axis(lambda r: np.convolve(r, g, mode="valid"), 0, x)
        return np.apply_along_axis(lambda r: np.convolve(r, g, mode="valid"), 1, x)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for ch in range(a.shape[2]):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        mx, my = blur(x), blur(y)
        sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
        values.append(np.mean(((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))))
    return float(np.mean(values))


def region_quality(original: np.ndarray, anonymized: np.ndarray, recovered: np.ndarray, inside: np.ndarray) -> dict:
    """Where recovery is lost: PSNR inside and outside the region, and whether the outside came back
    byte for byte (it does for a pixel model; a latent model's decoder redraws it). NaN for an empty side."""
    outside = ~inside

    def side(image, where):
        return psnr(image[where], original[where]) if where.any() else float("nan")

    return {"psnr_outside_anonymized": side(anonymized, outside), "psnr_outside_recovered": side(recovered, outside),
            "psnr_inside_anonymized": side(anonymized, inside), "psnr_inside_recovered": side(recovered, inside),
            "identical_outside_anonymized": bool(outside.any() and np.array_equal(anonymized[outside], original[outside])),
            "identical_outside_recovered": bool(outside.any() and np.array_equal(recovered[outside], original[outside]))}


REGION_FIGURES = ("psnr_outside_anonymized", "psnr_outside_recovered", "psnr_inside_anonymized", "psnr_inside_recovered",
                  "identical_outside_anonymized", "identical_outside_recovered")


def run_score(out: Path, images: ZipImages, recognizer, progress=None) -> Path:
    """Descriptors of the first images and of every condition of the second ones, saved in features.npz."""
    facts = json.loads((out / "transform.json").read_text())
    pairs = [Pair(*p) for p in facts["pairs"]]
    firsts = sorted({p.first for p in pairs})
    tick = progress or (lambda phase, n: None)
    started = time.perf_counter()
    descriptors, found = {}, {}
    tick("score", 0)
    for name in firsts:
        descriptors[("clean", name)], found[("clean", name)] = recognizer.describe(images(name))
        tick("score", 1)
    quality = {"psnr": [], "ssim": []}
    for name in sorted({p.second for p in pairs}):  # the clean second images, transformed or not
        descriptors[("original", name)], found[("original", name)] = recognizer.describe(images(name))
        tick("score", 1)
    for condition in CONDITIONS[1:]:
        for name in facts["targets"]:
            rgb = _load(out / "images" / condition, name)
            descriptors[(condition, name)], found[(condition, name)] = recognizer.describe(rgb)
            if condition == "recovered":
                original = images(name)
                quality["psnr"].append(psnr(rgb, original))
                quality["ssim"].append(ssim(rgb, original))
            tick("score", 1)
    regions = {figure: [] for figure in REGION_FIGURES}
    if "latent_shape" in facts:  # transforms from before it was recorded have no regions
        for name in facts["targets"]:
            face_map = face_map_from_file(out / "masks" / _png_name(name))
            size = facts["image_size"]
            inside = pixel_region(latent_mask(face_map, tuple(facts["latent_shape"][1:])), (size, size))
            sides = region_quality(images(name), *(_load(out / "images" / c, name) for c in ("anonymized", "recovered")),
                                   inside)
            for figure in REGION_FIGURES:
                regions[figure].append(sides[figure])
    keys = sorted(descriptors)
    np.savez(out / "features.npz", keys=np.array(["\t".join(k) for k in keys]),
             descriptors=np.stack([descriptors[k] for k in keys]), found=np.array([found[k] for k in keys]),
             psnr=np.array(quality["psnr"]), ssim=np.array(quality["ssim"]),
             **{f"region_{figure}": np.array(values) for figure, values in regions.items()},
             linkage_ranks=np.array(facts["linkage_ranks"]), linkage_candidates=facts["linkage_candidates"],
             pairs=np.array(["\t".join([p.first, p.second, "1" if p.same else "0"]) for p in pairs]),
             transform_seconds=facts["transform_seconds"], score_seconds=time.perf_counter() - started)
    return out / "features.npz"


def _setting(chunk: Path) -> dict:
    """What must match for chunks to be summarized together: the model, its steps and precision, the
    linkage test, and the pairs and images (absent from chunks made before they were recorded)."""
    facts = json.loads((chunk / "transform.json").read_text())
    return {**{k: facts[k] for k in ("model_fingerprint", "steps", "image_size", "linkage_candidates")},
            "precision": facts.get("precision", "fp32"),
            **{k: facts.get(k) for k in ("images_sha256", "pairs_sha256")}}


def settings_differ(a: dict | None, b: dict | None) -> bool:
    """Settings compared on what both record: chunks and summaries from before the pairs and images
    were recorded still merge with newer ones (precision was fp32 then)."""
    a, b = ({"precision": "fp32", **(s or {})} for s in (a, b))
    if (a.keys() ^ b.keys()) - {"images_sha256", "pairs_sha256"}:
        return True
    return any(a[k] != b[k] for k in a.keys() & b.keys() if a[k] is not None and b[k] is not None)


def _pair_range(chunk_name: str) -> range:
    try:
        _, start, end = chunk_name.split("-")
        return range(int(start), int(end))
    except ValueError:
        raise UsageError(f"{chunk_name}: not a chunk folder name (chunk-START-END)") from None


def _joined(ranges) -> list[list[int]]:
    """Ranges that touch joined into one: [0, 320), [320, 400), [600, 800) -> [0, 400], [600, 800]."""
    spans: list[list[int]] = []
    for r in sorted(ranges, key=lambda r: r.start):
        if spans and spans[-1][1] == r.start:
            spans[-1][1] = r.stop
        else:
            spans.append([r.start, r.stop])
    return spans


def pair_ranges(chunk_names: list[str]) -> str:
    """'0-319, 600-799' for the chunks that cover those pairs."""
    return ", ".join(f"{start}-{stop - 1}" for start, stop in _joined(_pair_range(name) for name in chunk_names))


def uncovered_pairs(folder: Path, chunk_names: list[str]) -> tuple[str, int] | None:
    """The pairs of the pairs file that no chunk covers, as '4-7', and the file's pair count; None where
    the chunks do not record that count (chunks made before it was recorded)."""
    totals = set()
    for name in chunk_names:
        try:
            totals.add(json.loads((Path(folder) / name / "transform.json").read_text()).get("pairs_total"))
        except (OSError, ValueError):
            totals.add(None)
    if None in totals or not totals:
        return None
    total = max(totals)
    covered = set().union(*(_pair_range(name) for name in chunk_names))
    spans = _joined(range(i, i + 1) for i in range(total) if i not in covered)
    return ", ".join(f"{a}-{b - 1}" if b - a > 1 else str(a) for a, b in spans), total


def _refuse_overlaps(chunk_names: list[str]) -> None:
    seen: dict[int, str] = {}
    for name in chunk_names:
        for index in _pair_range(name):
            if index in seen:
                raise UsageError(f"pair {index} is in both {seen[index]} and {name}: each pair may be counted once")
            seen[index] = name


def chunk_folder(out: Path, start: int, end: int) -> Path:
    """Where pairs start..end-1 of a run are transformed and scored; merges find chunks by this name."""
    return Path(out) / f"chunk-{start:05d}-{end:05d}"


def transformed_image_size(chunk: Path) -> int:
    """The crop size a chunk's transforms were made at, for scoring them without the model."""
    facts = chunk / "transform.json"
    if not facts.is_file():
        raise UsageError(f"{chunk}: no transforms to score; run this chunk with --stage transform (or all) first")
    return json.loads(facts.read_text())["image_size"]


def write_chunk_summary(chunk: Path, title: str) -> dict:
    """metrics.json, metrics.md and the contact sheet of one scored chunk."""
    summary = summarize([chunk / "features.npz"])
    (chunk / "metrics.json").write_text(json.dumps(summary, indent=1))
    (chunk / "metrics.md").write_text(markdown(summary, title))
    write_atomic(chunk / "contact_sheet.png", encode_png(contact_sheet(chunk), None, None, {}), overwrite=True)
    return summary


def merge_chunks(folder: Path, title: str, extend: Path | None = None) -> dict:
    """One summary of every scored chunk in `folder` (metrics.json, metrics.md there). With `extend`, the
    chunks are scored at that summary's threshold and added to it (for runs whose old chunks are gone)."""
    files = sorted(folder.glob("chunk-*/features.npz"))
    if not files:
        raise UsageError(f"{folder}: no chunk-*/features.npz to merge; run eval with --stage score first")
    unscored = sorted(c.name for c in folder.glob("chunk-*") if (c / "transform.json").is_file()
                      and not (c / "features.npz").is_file())
    if unscored:  # merging without them would quietly drop their pairs
        raise UsageError(f"{folder}: {', '.join(unscored)} have transforms but no scores; run eval --stage score "
                         "on them, or move them out of the folder")
    if extend is None:
        summary = summarize(files)
    else:
        if extend.resolve() == (folder / "metrics.json").resolve():
            raise UsageError(f"{extend}: the summary to extend would be overwritten; copy it out of {folder} first")
        summary = extended(read_summary(extend), files)
    (folder / "metrics.json").write_text(json.dumps(summary, indent=1))
    (folder / "metrics.md").write_text(markdown(summary, title))
    return summary


def read_summary(path: Path) -> dict:
    """A summary (metrics.json) that more chunks can be added to."""
    try:
        base = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read it ({exc})") from None
    if not isinstance(base, dict) or not {"threshold_cosine_far_0.1%", "chunks"} <= base.keys():
        raise UsageError(f"{path}: not an eval summary (metrics.json)")
    if "target_images" not in base:
        raise UsageError(f"{path}: made before summaries kept the names of the images they count, so an image "
                         "that the added chunks share with it would count twice; merge all the chunks in one folder")
    return base


def extended(base: dict, feature_files: list[Path]) -> dict:
    """base with these chunks added, scored at its threshold, for runs whose earlier chunks are gone."""
    return combine(base, summarize(feature_files, threshold=base["threshold_cosine_far_0.1%"],
                                   counted=set(base["target_images"])))


def summarize(feature_files: list[Path], threshold: float | None = None, counted: set[str] = frozenset()) -> dict:
    """TAR@FAR=0.1% per condition and the other figures, over every chunk given.

    Each pair is scored against its own chunk's transforms. An image that two chunks share was transformed
    in both; the per-image figures (cosine, detection, PSNR, SSIM, regions, linkage) count it once, from its
    first chunk. threshold: use this one instead of setting it here. counted: images an earlier summary
    already counts in its per-image figures (eval-merge --extend), which these figures leave out."""
    chunks = [path.parent for path in feature_files]
    _refuse_overlaps([c.name for c in chunks])
    settings = [_setting(c) for c in chunks]
    # every pair: a chunk that records no pairs file agrees with any, so two that do must be compared directly
    if any(settings_differ(a, b) for a, b in itertools.combinations(settings, 2)):
        raise UsageError("the chunks differ in model, steps, precision, linkage test, pairs or images: "
                         + ", ".join(f"{c.name}: {s}" for c, s in zip(chunks, settings)))
    clean: dict[str, np.ndarray] = {}
    genuine = {condition: [] for condition in CONDITIONS}
    same_image, psnrs, ssims, ranks = [], [], [], []
    regions = {figure: [] for figure in REGION_FIGURES}
    detected = {condition: [] for condition in ("original", "anonymized", "recovered")}
    pair_count, seconds, candidates, fallbacks = 0, 0.0, 0, 0
    seen: set[str] = set(counted)
    for path in feature_files:
        data = np.load(path)
        desc, found = {}, {}
        for key, d, f in zip(data["keys"], data["descriptors"], data["found"]):
            condition, name = str(key).split("\t")
            desc[(condition, name)], found[(condition, name)] = d, bool(f)
        pairs = [tuple(str(p).split("\t")) for p in data["pairs"]]
        pair_count += len(pairs)
        for first, second, same in pairs:
            clean[first], clean[second] = desc[("clean", first)], desc[("original", second)]
            if same == "1":
                for condition in CONDITIONS:
                    genuine[condition].append(float(desc[("clean", first)] @ desc[(condition, second)]))
        targets = sorted(name for condition, name in desc if condition == "anonymized")  # as the arrays are

        def once(values, names=targets):
            return [v for v, name in zip(values, names) if name not in seen]

        same_image += once([float(desc[("original", s)] @ desc[("anonymized", s)]) for s in targets])
        for condition in detected:
            detected[condition] += once([found[(condition, s)] for s in targets])
        psnrs += once(data["psnr"])
        ssims += once(data["ssim"])
        for figure in REGION_FIGURES:
            if f"region_{figure}" in data.files:
                regions[figure] += once(data[f"region_{figure}"])
        facts = json.loads((path.parent / "transform.json").read_text())
        # runs from before the names were kept: the ranks line up with the targets unless a mask was empty
        ranked = facts.get("linkage_names", targets if len(data["linkage_ranks"]) == len(targets) else None)
        ranks += once(data["linkage_ranks"], ranked) if ranked is not None else list(data["linkage_ranks"])
        chunk_fallbacks = len(once(facts["mask_fallback_names"], facts["mask_fallback_names"])) \
            if "mask_fallback_names" in facts else facts.get("mask_fallbacks")  # older runs kept only the count
        fallbacks = None if fallbacks is None or chunk_fallbacks is None else fallbacks + chunk_fallbacks
        seen.update(targets)
        candidates = int(data["linkage_candidates"])
        seconds += float(data["transform_seconds"]) + float(data["score_seconds"])
    # clean impostor scores: every cross-identity combination of clean images
    names = sorted(clean)
    matrix = np.stack([clean[n] for n in names])
    sims = matrix @ matrix.T
    ids = np.array([identity(n) for n in names])
    upper = np.triu(np.ones_like(sims, dtype=bool), 1)
    impostor = sims[upper & (ids[:, None] != ids[None, :])]
    if threshold is None:
        threshold = float(np.quantile(impostor, 1 - FAR, method="higher")) if len(impostor) else 1.0
    tar = {condition: float(np.mean(np.array(scores) > threshold)) if scores else None
           for condition, scores in genuine.items()}
    ranks_arr = np.array(ranks)
    linkage = {"candidates": candidates, "top1": float(np.mean(ranks_arr < 1)) if ranks else None,
               "top5": float(np.mean(ranks_arr < 5)) if ranks else None,
               "chance_top1": 1 / max(1, candidates), "chance_top5": min(1.0, 5 / max(1, candidates))}
    return {
        "pairs": pair_count, "genuine_pairs": len(genuine["original"]), "impostor_scores": int(len(impostor)),
        "threshold_cosine_far_0.1%": threshold,
        "tar_at_far_0.1%": {("clean" if k == "original" else k): v for k, v in tar.items()},
        "cosine_original_vs_anonymized": _mean_std(same_image),
        "recovery_psnr_db": _mean_std(psnrs), "recovery_ssim": _mean_std(ssims),
        "face_detection_rate": {c: float(np.mean(flags)) if flags else None for c, flags in detected.items()},
        "linkage": linkage,
        "mask_regions": _region_summary(regions),
        "mask_fallbacks": fallbacks,
        "wall_seconds": seconds,
        "setting": settings[0],
        "counts": {"genuine_pairs": len(genuine["original"]), "cosine": len(same_image),
                   "face_detection": len(same_image), "recovery": len(psnrs), "linkage": len(ranks),
                   "region_outside": _finite_count(regions["psnr_outside_recovered"]),
                   "region_inside": _finite_count(regions["psnr_inside_recovered"])},
        "chunks": [c.name for c in chunks],
        "target_images": sorted(seen - set(counted)),
    }


def _finite_count(values: list[float]) -> int:
    return int(np.isfinite(np.array(values, dtype=float)).sum())


def _region_summary(regions: dict[str, list]) -> dict | None:
    """PSNR per side of the mask and the share of images whose outside came back byte for byte;
    images whose mask leaves one side empty count only on the other."""
    if not regions["psnr_inside_recovered"]:
        return None
    outside = np.isfinite(np.array(regions["psnr_outside_recovered"], dtype=float))
    inside = np.isfinite(np.array(regions["psnr_inside_recovered"], dtype=float))

    def kept(figure, where):
        return _mean_std([v for v, k in zip(regions[figure], where) if k])

    return {"outside_psnr_db": {c: kept(f"psnr_outside_{c}", outside) for c in ("anonymized", "recovered")},
            "inside_psnr_db": {c: kept(f"psnr_inside_{c}", inside) for c in ("anonymized", "recovered")},
            "outside_byte_identical": {c: float(np.mean(np.array(regions[f"identical_outside_{c}"])[outside]))
                                       if outside.any() else None for c in ("anonymized", "recovered")}}


def _mean_std(values: list[float]) -> dict | None:
    return {"mean": float(np.mean(values)), "std": float(np.std(values))} if values else None


def _whole(fraction: float | None, n: int) -> int:
    if n == 0:
        return 0
    count = round(fraction * n)
    if abs(count - fraction * n) > 1e-6:
        raise UsageError(f"a fraction {fraction} of {n} is not a whole count: the summary's counts are wrong")
    return count


def _pooled(a: dict | None, na: int, b: dict | None, nb: int) -> dict | None:
    if a is None or b is None:
        return a or b
    mean = (na * a["mean"] + nb * b["mean"]) / (na + nb)
    second_moment = (na * (a["std"] ** 2 + a["mean"] ** 2) + nb * (b["std"] ** 2 + b["mean"] ** 2)) / (na + nb)
    return {"mean": mean, "std": float(np.sqrt(max(0.0, second_moment - mean**2)))}


def combine(base: dict, extra: dict) -> dict:
    """One summary of two, without their images: extra must be scored at base's threshold.

    This extends a committed summary whose chunks are gone. The threshold stays base's, so the
    added chunks' clean images are not among its impostor scores."""
    for which, summary in (("base", base), ("added", extra)):
        if "counts" not in summary:
            raise UsageError(f"the {which} summary has no counts: summaries from before counts existed cannot be combined")
    if base["threshold_cosine_far_0.1%"] != extra["threshold_cosine_far_0.1%"]:
        raise UsageError("score the added chunks at the base summary's threshold")
    if settings_differ(base.get("setting"), extra.get("setting")):
        raise UsageError(f"the summaries differ in model, steps, precision, linkage test, pairs or images: "
                         f"{base.get('setting')} vs {extra.get('setting')}")
    _refuse_overlaps(base["chunks"] + extra["chunks"])
    shared = sorted(set(base.get("target_images", ())) & set(extra.get("target_images", ())))
    if shared:
        raise UsageError(f"{len(shared)} image(s) ({', '.join(shared[:3])}) are counted in both summaries; score the "
                         "added chunks with the base's images as counted")
    # summaries from before the mask regions were measured count none of them
    n, m = ({"region_outside": 0, "region_inside": 0, **summary["counts"]} for summary in (base, extra))
    both = {k: n[k] + m[k] for k in n}

    def mix(fraction_a, fraction_b, key):
        return (_whole(fraction_a, n[key]) + _whole(fraction_b, m[key])) / both[key] if both[key] else None

    ta, tb = base["tar_at_far_0.1%"], extra["tar_at_far_0.1%"]
    la, lb = base["linkage"], extra["linkage"]
    return {
        "pairs": base["pairs"] + extra["pairs"], "genuine_pairs": both["genuine_pairs"],
        "impostor_scores": base["impostor_scores"], "threshold_cosine_far_0.1%": base["threshold_cosine_far_0.1%"],
        "threshold_from": base.get("threshold_from", base["chunks"]),
        "tar_at_far_0.1%": {c: mix(ta[c], tb[c], "genuine_pairs") for c in ta},
        "cosine_original_vs_anonymized": _pooled(base["cosine_original_vs_anonymized"], n["cosine"],
                                                 extra["cosine_original_vs_anonymized"], m["cosine"]),
        "recovery_psnr_db": _pooled(base["recovery_psnr_db"], n["recovery"], extra["recovery_psnr_db"], m["recovery"]),
        "recovery_ssim": _pooled(base["recovery_ssim"], n["recovery"], extra["recovery_ssim"], m["recovery"]),
        "face_detection_rate": {c: mix(base["face_detection_rate"][c], extra["face_detection_rate"][c], "face_detection")
                                for c in base["face_detection_rate"]},
        "linkage": {**la, "top1": mix(la["top1"], lb["top1"], "linkage"), "top5": mix(la["top5"], lb["top5"], "linkage")},
        "mask_regions": _combined_regions(base.get("mask_regions"), n, extra.get("mask_regions"), m),
        "mask_fallbacks": None if base.get("mask_fallbacks") is None or extra.get("mask_fallbacks") is None
        else base["mask_fallbacks"] + extra["mask_fallbacks"],
        "wall_seconds": base["wall_seconds"] + extra["wall_seconds"],
        "setting": base["setting"], "counts": both, "chunks": base["chunks"] + extra["chunks"],
        "target_images": sorted(set(base.get("target_images", ())) | set(extra.get("target_images", ()))),
    }


def _combined_regions(a: dict | None, n: dict, b: dict | None, m: dict) -> dict | None:
    if a is None or b is None:
        return a or b
    return {"outside_psnr_db": {c: _pooled(a["outside_psnr_db"][c], n["region_outside"], b["outside_psnr_db"][c],
                                           m["region_outside"]) for c in a["outside_psnr_db"]},
            "inside_psnr_db": {c: _pooled(a["inside_psnr_db"][c], n["region_inside"], b["inside_psnr_db"][c],
                                          m["region_inside"]) for c in a["inside_psnr_db"]},
            "outside_byte_identical": {
                c: (_whole(a["outside_byte_identical"][c], n["region_outside"])
                    + _whole(b["outside_byte_identical"][c], m["region_outside"])) / (n["region_outside"] + m["region_outside"])
                if n["region_outside"] + m["region_outside"] else None for c in a["outside_byte_identical"]}}


def markdown(summary: dict, title: str) -> str:
    t = summary["tar_at_far_0.1%"]
    rows = [("clean second image", t["clean"]), ("anonymized", t["anonymized"]),
            ("recovered, right key", t["recovered"]), ("recovered, random key (--skip-auth)", t["random_key"]),
            ("recovered, key one bit away (--skip-auth)", t["one_bit_key"]),
            ("known-plaintext attack, per-face nonce", t["attack_nonce"]),
            ("known-plaintext attack, --insecure-key-reuse", t["attack_reuse"])]
    lines = [f"# {title}", "", f"{summary['pairs']} pairs ({summary['genuine_pairs']} genuine), threshold at FAR 0.1% "
             f"from {summary['impostor_scores']} clean impostor scores: cosine {summary['threshold_cosine_far_0.1%']:.3f}.",
             "", "| second image | TAR@FAR=0.1% | pairs passing | 95% interval |", "|---|---:|---:|---:|"]
    if "threshold_from" in summary:
        later = [c for c in summary["chunks"] if c not in summary["threshold_from"]]
        lines[3:3] = ["", f"The impostor scores come from the clean images of pairs {pair_ranges(summary['threshold_from'])}. "
                      f"Pairs {pair_ranges(later)} were added at that threshold; their own clean images are not among them."]
    n = summary["genuine_pairs"]

    def row(label, passing, trials):
        low, high = wilson_interval(passing, trials)
        return f"| {label} | {100 * passing / trials:.1f}% | {passing} of {trials} | {100 * low:.1f}–{100 * high:.1f}% |"

    # A random key, a key one bit away and another face's stolen pattern each multiply the face's own pattern by
    # one independent of it (SHAKE outputs of other inputs): the net flips on the original are uniformly random in
    # all three, so they measure one rate, pooled after the last of them over three times the trials.
    independent = [t[c] for c in ("random_key", "one_bit_key", "attack_nonce")]
    for label, value in rows:
        if value is not None:
            lines.append(row(label, _whole(value, n), n))
        if label == "known-plaintext attack, per-face nonce" and None not in independent:
            lines.append(row("random key, one bit away and nonce attack, pooled (one rate: each nets the original a "
                             "uniformly random flip pattern)", sum(_whole(v, n) for v in independent), 3 * n))
    c = summary["cosine_original_vs_anonymized"]
    lines.append("")
    if c:
        lines.append(f"- cosine, original vs its anonymized version: {c['mean']:.3f} ± {c['std']:.3f}")
    if summary["recovery_psnr_db"]:
        p, s = summary["recovery_psnr_db"], summary["recovery_ssim"]
        lines.append(f"- recovery: PSNR {p['mean']:.2f} ± {p['std']:.2f} dB, SSIM {s['mean']:.4f} ± {s['std']:.4f}")
    d = summary["face_detection_rate"]
    if d["anonymized"] is not None:
        lines.append(f"- face detection rate: original {100 * d['original']:.1f}%, anonymized {100 * d['anonymized']:.1f}%, "
                     f"recovered {100 * d['recovered']:.1f}%")
    r = summary.get("mask_regions")
    if r:
        o, i, same = r["outside_psnr_db"], r["inside_psnr_db"], r["outside_byte_identical"]
        if same["anonymized"] == same["recovered"] == 1.0:
            lines.append(f"- outside the mask ({summary['counts']['region_outside']} images): byte-identical to the "
                         "original in every anonymized and recovered image")
        elif o["recovered"]:
            lines.append(f"- outside the mask ({summary['counts']['region_outside']} images): PSNR anonymized "
                         f"{_db(o['anonymized'])}, recovered {_db(o['recovered'])}; byte-identical to the original: "
                         f"anonymized {100 * same['anonymized']:.1f}%, recovered {100 * same['recovered']:.1f}%")
        if i["recovered"]:
            lines.append(f"- inside the mask ({summary['counts']['region_inside']} images): PSNR anonymized "
                         f"{_db(i['anonymized'])}, recovered {_db(i['recovered'])}")
    k = summary["linkage"]
    if k["top1"] is not None:
        lines.append(f"- key-free linkage among {k['candidates']} candidates: top-1 {100 * k['top1']:.1f}% "
                     f"(chance {100 * k['chance_top1']:.1f}%), top-5 {100 * k['top5']:.1f}% (chance {100 * k['chance_top5']:.1f}%)")
    if summary.get("mask_fallbacks"):
        lines.append(f"- masks: dlib found no face in {summary['mask_fallbacks']} of {summary['counts']['cosine']} "
                     "transformed images, which took the template face region of the aligned crop instead (where "
                     "`run anonymize --masker landmarks` stops and asks for a mask)")
    lines.append(f"- wall time: {summary['wall_seconds']:.0f} s")
    return "\n".join(lines) + "\n"


def wilson_interval(passes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% (Wilson score) interval of a pass rate: what a TAR of a few hundred pairs can tell apart."""
    if trials == 0:
        return 0.0, 1.0
    p = passes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * (p * (1 - p) / trials + z * z / (4 * trials * trials)) ** 0.5 / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def _db(figure: dict) -> str:
    return f"{figure['mean']:.2f} ± {figure['std']:.2f} dB"


def contact_sheet(out: Path, count: int = 12) -> np.ndarray:
    """original | mask overlay | anonymized | recovered | random key, for the first pairs. Not for committing."""
    facts = json.loads((out / "transform.json").read_text())
    rows = []
    for name in facts["targets"][:count]:
        original = _load(out / "images" / "original", name)
        mask = _load(out / "masks", name)[..., 0]
        small = np.asarray(Image.fromarray(mask).resize(original.shape[:2][::-1], Image.Resampling.NEAREST)) > 127
        overlay = original.copy()
        overlay[small] = (0.65 * overlay[small] + [0, 89, 0]).astype(np.uint8)
        rows.append(np.concatenate([original, overlay] + [_load(out / "images" / c, name)
                                                          for c in ("anonymized", "recovered", "random_key")], axis=1))
    return np.concatenate(rows, axis=0) if rows else np.zeros((1, 1, 3), np.uint8)
