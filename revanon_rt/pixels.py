"""Pixel conversions of spec §2. All arithmetic is float32, so every backend agrees bit for bit."""

from __future__ import annotations

import numpy as np

_HALF_RANGE = np.float32(127.5)
_ONE = np.float32(1.0)


def to_model(rgb: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [-1, 1]: x = float32(u8) / 127.5 - 1."""
    x = rgb.astype(np.float32) / _HALF_RANGE - _ONE
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def to_u8(x: np.ndarray) -> np.ndarray:
    """float32 (..., 3, H, W) -> uint8 (..., H, W, 3): round((clamp(x, -1, 1) + 1) * 127.5), half to even."""
    x = np.asarray(x, dtype=np.float32)
    u = np.rint((np.clip(x, -_ONE, _ONE) + _ONE) * _HALF_RANGE)
    return np.ascontiguousarray(np.moveaxis(u.astype(np.uint8), -3, -1))


def nonfinite_rows(x: np.ndarray) -> np.ndarray:
    """Per image, whether the model output holds NaN or Inf: to_u8 would store them as 0 or 255, an image
    that looks like a result and recovers to nothing."""
    return ~np.isfinite(np.asarray(x).reshape(len(x), -1)).all(axis=1)


def pixel_region(mask: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """The pixels a latent mask covers: each latent cell (h x w, h dividing H) spread over its block, as bool."""
    cell = np.ones((image_hw[0] // mask.shape[-2], image_hw[1] // mask.shape[-1]), np.uint8)
    return np.kron(mask, cell) > 0


def clamped_share(x: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per image, the share of values inside the mask that `to_u8` clamps by more than one 8-bit step.

    x: N x 3 x H x W model output; masks: N x h x w latent masks, h dividing H. Recovery inverts the
    stored pixels, and values lost to clamping are the ones it cannot get back (rounding costs little)."""
    shares = []
    for xi, mi in zip(x, masks):
        inside = np.broadcast_to(pixel_region(mi, xi.shape[-2:]), xi.shape)
        values = np.abs(xi[inside])
        shares.append(float(np.mean(values > _ONE + _ONE / _HALF_RANGE)) if values.size else 0.0)
    return np.array(shares)


def to_unit(rgb: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [0, 1], the face parser's input (spec §4)."""
    x = rgb.astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two 8-bit images in dB; identical images report 100 dB rather than infinity."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else float(10 * np.log10(255.0**2 / mse))
