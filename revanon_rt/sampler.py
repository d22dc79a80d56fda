"""The revanon transform as plain functions (spec §3 and §6), written once for every backend.

A backend is any object with
    encode(x) -> z       x: N x 3 x H x W float32 in [-1, 1]
    decode(z) -> x
    eps(z, t) -> ε       t: one integer timestep for the whole batch
    parse(image01) -> F  N x 512 x 512 uint8 face map (spec §4)
working on numpy float32 arrays. All update arithmetic below is float32, so the same
inputs give the same bits whichever backend computes ε.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from .schedule import Schedule

StepCallback = Callable[[str, int, int], None]  # phase, step index, step count


class Backend(Protocol):
    def encode(self, x: np.ndarray) -> np.ndarray: ...
    def decode(self, z: np.ndarray) -> np.ndarray: ...
    def eps(self, z: np.ndarray, t: int) -> np.ndarray: ...
    def parse(self, image01: np.ndarray) -> np.ndarray: ...


class ModelBackend(Backend, Protocol):
    """What the pipeline, verify and eval need beyond the four calls: TorchReference and
    engines.backend.EngineBackend both provide it."""

    name: str
    fingerprint: str
    image_size: int
    latent_shape: tuple[int, int, int]
    can_parse: bool
    supports_fused: bool  # True: fused_transform(x, mask, pattern, schedule) runs the whole of T
    precision: str
    batch: int  # how many faces a run groups into one call
    identity: dict  # what decides the numbers (backend, engine files, device), for caches

    def schedule(self, steps: int) -> Schedule: ...


def ddim_coefficients(a_from, a_to) -> tuple[float, float, float, float]:
    """sqrt(a_from), sqrt(1 − a_from), sqrt(a_to), sqrt(1 − a_to), computed in float32.

    Returned as Python floats holding exact float32 values, so that the same step function runs
    unchanged on numpy arrays and on torch tensors (a compiled backend may pass 0-d tensors)."""
    a_from, a_to = np.float32(a_from), np.float32(a_to)
    one = np.float32(1)
    return (float(np.sqrt(a_from)), float(np.sqrt(one - a_from)), float(np.sqrt(a_to)), float(np.sqrt(one - a_to)))


def ddim_update(x, eps, s_from, r_from, s_to, r_to):
    """x0 = (x − sqrt(1 − a_from)·ε) / sqrt(a_from); out = sqrt(a_to)·x0 + sqrt(1 − a_to)·ε."""
    x0 = (x - r_from * eps) / s_from
    return s_to * x0 + r_to * eps


def ddim_step(x, eps, a_from, a_to):
    """One η = 0 DDIM step from level a_from to level a_to (diffusers' DDIMScheduler.step)."""
    return ddim_update(x, eps, *ddim_coefficients(a_from, a_to))


def reinject(z, mask, kept):
    """M·z + (1 − M)·kept: the original latent is put back outside the mask."""
    return mask * z + (1 - mask) * kept


def invert(eps_fn, z0: np.ndarray, schedule: Schedule, callback: StepCallback | None = None) -> list[np.ndarray]:
    """DDIM inversion through t_S, ..., t_1. Returns keep: keep[i] is the latent after i steps."""
    keep = [z0]
    z = z0
    levels, ts, S = schedule.levels, schedule.timesteps, schedule.steps
    for n, i in enumerate(range(S - 1, -1, -1)):
        z = ddim_step(z, eps_fn(z, ts[i]), levels[i + 1], levels[i])
        keep.append(z)
        if callback:
            callback("invert", n, S)
    return keep


def keyed_flip(z_T, mask, pattern):
    """z_T' = M·(r ⊙ z_T) + (1 − M)·z_T."""
    return reinject(pattern * z_T, mask, z_T)


def denoise(eps_fn, z: np.ndarray, schedule: Schedule, mask: np.ndarray, keep: list[np.ndarray],
            callback: StepCallback | None = None) -> np.ndarray:
    """DDIM denoising through t_1, ..., t_S, putting keep[S−1−i] back outside the mask after step i.
    Consumes keep from the end, so every kept latent is freed as soon as it has been used."""
    levels, ts, S = schedule.levels, schedule.timesteps, schedule.steps
    assert len(keep) == S, "keep must hold keep[0..S-1]"
    for i in range(S):
        z = reinject(ddim_step(z, eps_fn(z, ts[i]), levels[i], levels[i + 1]), mask, keep.pop())
        if callback:
            callback("denoise", i, S)
    return z


def inverted(backend: Backend, x: np.ndarray, schedule: Schedule, callback: StepCallback | None = None) -> list[np.ndarray]:
    """The first half of T: encode x and invert it. Returns keep, whose last entry is z_T."""
    return invert(backend.eps, backend.encode(x), schedule, callback)


def flipped_and_denoised(backend: Backend, keep: list[np.ndarray], mask: np.ndarray, pattern: np.ndarray,
                         schedule: Schedule, callback: StepCallback | None = None) -> np.ndarray:
    """The second half of T: flip z_T = keep[-1] inside the mask, denoise, decode. Consumes keep;
    pass a copy (list(keep)) to run several keys from one inversion."""
    mask = mask.astype(np.float32)
    z = keyed_flip(keep.pop(), mask, pattern)
    return backend.decode(denoise(backend.eps, z, schedule, mask, keep, callback))


def transform(backend: Backend, x: np.ndarray, mask: np.ndarray, pattern: np.ndarray, schedule: Schedule,
              callback: StepCallback | None = None) -> np.ndarray:
    """T(x; K, nonce, M) of spec §6: encode, invert, flip inside the mask, denoise, decode.

    x: N x 3 x H x W; mask: N x 1 x h x w in {0, 1}; pattern: N x C x h x w in {±1}.
    Anonymization and de-anonymization are both this map.
    """
    return flipped_and_denoised(backend, inverted(backend, x, schedule, callback), mask, pattern, schedule, callback)
