"""`revanon-rt verify`: the same image through the PyTorch reference and an engine, stage by
stage, plus recovery within and across backends. Both sides run the plain loop functions of
sampler.py, so any difference comes from the engine's ε, E, D or parser."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .engines.backend import in_batches
from .errors import UsageError
from .keys import flip_pattern, flip_subkey
from .masks import face_map_from_image, latent_mask
from .pixels import psnr, to_model, to_u8, to_unit
from .sampler import ModelBackend, denoise, invert, keyed_flip

VERIFY_KEY = bytes(range(32))
VERIFY_NONCE = bytes(range(100, 116))


@dataclass
class Thresholds:
    max_latent_rel_err: float = 1e-4
    min_identical_pixels: float = 0.995
    max_mask_differences: int = 0
    recovery_tolerance_db: float = 0.1


def differences(reference: np.ndarray, other: np.ndarray) -> dict:
    """Largest absolute difference, and the L2 norm of the difference relative to the reference's."""
    a, b = reference.astype(np.float64), other.astype(np.float64)
    norm = float(np.linalg.norm(a))
    return {"max_abs": float(np.abs(a - b).max()), "rel_l2": float(np.linalg.norm(a - b) / norm) if norm else 0.0}


def _verify_pattern(latent_shape) -> np.ndarray:
    return flip_pattern(flip_subkey(VERIFY_KEY), VERIFY_NONCE, tuple(latent_shape))[None]


def _eight_bit_row(reference_rgb: np.ndarray, other_rgb: np.ndarray) -> dict:
    return {"identical_fraction": float(np.mean(reference_rgb == other_rgb)),
            "max_level_difference": int(np.abs(reference_rgb.astype(int) - other_rgb).max())}


def _anonymize_tracked(backend: ModelBackend, rgb: np.ndarray, mask: np.ndarray, steps: int, probe: tuple[int, ...]):
    """The spec's transform with its intermediate values kept for comparison."""
    sched = backend.schedule(steps)
    m = mask[None, None].astype(np.float32)
    pattern = _verify_pattern(backend.latent_shape)
    z0 = backend.encode(to_model(rgb[None]))
    keep = invert(backend.eps, z0, sched)
    probe_steps = {sched.timesteps[i]: i for i in probe}
    probes = {}

    def recording_eps(z, t):
        if t in probe_steps:
            probes[probe_steps[t]] = z.copy()
        return backend.eps(z, t)

    z = denoise(recording_eps, keyed_flip(keep.pop(), m, pattern), sched, m, keep)
    decoded = backend.decode(z)
    return {"z0": z0, "probes": probes, "z_final": z, "decoded": decoded, "rgb": to_u8(decoded)[0]}


def _recover(backend: ModelBackend, anonymized_rgb: np.ndarray, mask: np.ndarray, steps: int) -> np.ndarray:
    from .pipeline import transform_crops

    return transform_crops(backend, anonymized_rgb[None], mask[None], [VERIFY_NONCE], flip_subkey(VERIFY_KEY), steps)[0]


def load_verify_image(path: Path | None, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The user's image, or the demo's synthetic face; plus the synthetic face mask as a fallback."""
    from PIL import Image

    from .demo import synthetic_face
    from .images import load_image

    face, face_mask = synthetic_face(size)
    if path is None:
        return face, face_mask
    rgb = load_image(path).rgb
    if rgb.shape[:2] != (size, size):
        rgb = np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.LANCZOS))
    return rgb, face_mask


def _fused_rows(engine, rgb: np.ndarray, mask: np.ndarray, steps: int, replays: int):
    """A fused loop (compiled engines) against the plain functions on the same engine, and against itself."""
    from .sampler import transform

    sched = engine.schedule(steps)
    x, m = to_model(rgb[None]), mask[None, None].astype(np.float32)
    pattern = _verify_pattern(engine.latent_shape)
    plain = transform(engine, x, m, pattern, sched)
    runs = [engine.fused_transform(x, m, pattern, sched) for _ in range(max(1, replays))]
    rows = {"fused loop vs plain functions": {**differences(plain, runs[0]),
                                              "identical_8bit": float(np.mean(to_u8(plain) == to_u8(runs[0])))},
            "fused loop run to run": {"replays": len(runs),
                                      "bitwise_identical": all(np.array_equal(runs[0], r) for r in runs[1:])}}
    return rows, to_u8(runs[0])[0]


class AtEngineBatch:
    """The reference fed the batches the engine runs. An engine of batch N runs one image as N copies of
    it, and a kernel may round differently at another batch size (the CPU's convolutions do, by about 1e-6),
    so eager PyTorch is compared with the engine on the same calls."""

    def __init__(self, reference, batch: int):
        self.reference, self.engine_batch = reference, batch

    def __getattr__(self, name):
        return getattr(self.reference, name)

    def encode(self, x):
        return in_batches(self.reference.encode, self.engine_batch, x)

    def decode(self, z):
        return in_batches(self.reference.decode, self.engine_batch, z)

    def eps(self, z, t):
        return in_batches(lambda chunk: self.reference.eps(chunk, t), self.engine_batch, z)

    def parse(self, image01):
        return in_batches(self.reference.parse, self.engine_batch, image01)


def run_verify(reference, engine, image: Path | None = None, steps: int = 50,
               thresholds: Thresholds | None = None, log=print, replays: int = 20) -> dict:
    thresholds = thresholds or Thresholds()
    if engine.fingerprint != reference.fingerprint:
        raise UsageError("the engine was built from another model (fingerprints differ); rebuild it from this "
                         "model with `revanon-rt build --model ... --overwrite`")
    if engine.batch > 1:
        reference = AtEngineBatch(reference, engine.batch)
    size = reference.image_size
    rgb, drawn_mask = load_verify_image(image, size)
    latent_hw = reference.latent_shape[1:]
    rows: dict[str, dict] = {}

    if reference.can_parse and engine.can_parse:
        f_ref, f_eng = reference.parse(to_unit(rgb[None]))[0], engine.parse(to_unit(rgb[None]))[0]
        m_ref, m_eng = latent_mask(f_ref, latent_hw), latent_mask(f_eng, latent_hw)
        rows["parse mask"] = {"differing_cells": int(np.count_nonzero(f_ref != f_eng)), "cells": int(f_ref.size),
                              "differing_latent_cells": int(np.count_nonzero(m_ref != m_eng))}
        mask = m_ref
        if not 0 < mask.mean() < 1:  # an untrained parser marks nothing or everything: use the drawn face
            mask = latent_mask(_face_map(drawn_mask), latent_hw)
    else:
        mask = latent_mask(_face_map(drawn_mask), latent_hw)
    log(f"verify: {size}px image, {steps} steps, mask covers {mask.mean():.0%} of the latent grid")

    probe = tuple(sorted({0, steps // 2, steps - 1}))
    ref = _anonymize_tracked(reference, rgb, mask, steps, probe)
    eng = _anonymize_tracked(engine, rgb, mask, steps, probe)
    rows["encode"] = differences(ref["z0"], eng["z0"])
    sched = reference.schedule(steps)
    for name, i in zip(("eps first step", "eps middle step", "eps last step"), (probe[0], probe[len(probe) // 2], probe[-1])):
        z = ref["probes"][i]
        rows[name] = {**differences(reference.eps(z, sched.timesteps[i]), engine.eps(z, sched.timesteps[i])),
                      "timestep": sched.timesteps[i]}
    rows["final latent"] = differences(ref["z_final"], eng["z_final"])
    rows["decoded image"] = differences(ref["decoded"], eng["decoded"])
    rows["anonymized 8-bit"] = _eight_bit_row(ref["rgb"], eng["rgb"])

    engine_anonymized = eng["rgb"]
    if engine.supports_fused:
        log(f"verify: fused loop against the plain functions, {replays} replays")
        fused_rows, engine_anonymized = _fused_rows(engine, rgb, mask, steps, replays)
        rows.update(fused_rows)
        # what `run` writes is the fused loop's image: compared with PyTorch's directly, not only through the plain path
        rows["fused anonymized 8-bit"] = _eight_bit_row(ref["rgb"], engine_anonymized)
    log("verify: recovering within and across backends")
    recovery = {
        "pytorch -> pytorch": _recover(reference, ref["rgb"], mask, steps),
        "engine -> engine": _recover(engine, engine_anonymized, mask, steps),
        "engine -> pytorch": _recover(reference, engine_anonymized, mask, steps),
        "pytorch -> engine": _recover(engine, ref["rgb"], mask, steps),
    }
    for name, rec in recovery.items():
        rows[f"recovery {name}"] = {"psnr_db": psnr(rec, rgb), "identical_to_original": float(np.mean(rec == rgb))}

    # the bar is PyTorch's own round trip less a fixed allowance: an image made on either side recovers on the
    # other as well as the reference's images recover on the reference (an allowance that grew with the
    # backends' disagreement, or a bar set by the engine's own round trip, would pass an engine however far off)
    own = rows["recovery pytorch -> pytorch"]["psnr_db"]
    bar = own - thresholds.recovery_tolerance_db
    cross = [rows["recovery engine -> pytorch"]["psnr_db"], rows["recovery pytorch -> engine"]["psnr_db"]]
    checks = {
        "final latent rel_l2": (rows["final latent"]["rel_l2"], f"<= {thresholds.max_latent_rel_err:g}",
                                rows["final latent"]["rel_l2"] <= thresholds.max_latent_rel_err),
        "identical 8-bit pixels": (rows["anonymized 8-bit"]["identical_fraction"],
                                   f">= {thresholds.min_identical_pixels:g}",
                                   rows["anonymized 8-bit"]["identical_fraction"] >= thresholds.min_identical_pixels),
        "cross-backend recovery": (min(cross), f">= {bar:.2f} dB (PyTorch's own round trip "
                                                f"- {thresholds.recovery_tolerance_db:g} dB)", min(cross) >= bar),
    }
    if "fused loop vs plain functions" in rows:
        fused = rows["fused loop vs plain functions"]["identical_8bit"]
        checks["fused loop equals plain functions"] = (fused, f">= {thresholds.min_identical_pixels:g}",
                                                       fused >= thresholds.min_identical_pixels)
        fused_vs_pytorch = rows["fused anonymized 8-bit"]["identical_fraction"]
        checks["fused loop identical 8-bit pixels"] = (fused_vs_pytorch, f">= {thresholds.min_identical_pixels:g}",
                                                       fused_vs_pytorch >= thresholds.min_identical_pixels)
        stable = rows["fused loop run to run"]["bitwise_identical"]
        checks["run-to-run bitwise identical"] = (stable, "True", stable)
    if "parse mask" in rows:
        differing = rows["parse mask"]["differing_cells"]
        checks["identical masks"] = (differing, f"<= {thresholds.max_mask_differences}",
                                     differing <= thresholds.max_mask_differences)
    report = {
        "engine": engine.name, "steps": steps, "image_size": size, "fingerprint": reference.fingerprint,
        "stages": rows,
        "checks": {name: {"value": value, "threshold": rule, "passed": bool(ok)} for name, (value, rule, ok) in checks.items()},
        "passed": all(ok for _, _, ok in checks.values()),
    }
    return report


def _face_map(mask: np.ndarray) -> np.ndarray:
    from PIL import Image

    return face_map_from_image(Image.fromarray(mask))
