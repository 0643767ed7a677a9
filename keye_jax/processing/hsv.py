"""RGB -> HSV on uint8 planes, equal to OpenCV's `cvtColor(..., COLOR_RGB2HSV)` (8-bit convention).

OpenCV computes, in integers with 12-bit fixed-point reciprocal tables:
  V = max(r, g, b); diff = V - min(r, g, b)
  S = round(diff * 255 / V)          via sdiv[V] = round(255 * 2^12 / V)
  H = round(num * 180 / (6 * diff))  via hdiv[diff] = round(180 * 2^12 / (6 diff)), +180 if negative
with num = g - b if V == r, else b - r + 2 diff if V == g, else r - g + 4 diff (ties go to red, then green).
Both table products are precomputed here as small lookup tables over (num, diff) and (V, diff).
"""

from __future__ import annotations

import numpy as np

_SHIFT = 12
_HALF = 1 << (_SHIFT - 1)


def _tables() -> tuple[np.ndarray, np.ndarray]:
  i = np.arange(256, dtype=np.float64)
  safe = np.maximum(i, 1)
  sdiv = np.where(i == 0, 0, np.rint((255 << _SHIFT) / safe)).astype(np.int64)
  hdiv = np.where(i == 0, 0, np.rint((180 << _SHIFT) / (6.0 * safe))).astype(np.int64)
  v, d = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
  s_lut = ((d * sdiv[v] + _HALF) >> _SHIFT).astype(np.uint8).ravel()              # index v * 256 + diff
  num, d = np.meshgrid(np.arange(-255, 1276), np.arange(256), indexing="ij")
  h = (num * hdiv[d] + _HALF) >> _SHIFT
  h_lut = np.where(h < 0, h + 180, h).astype(np.uint8).ravel()                      # (num + 255) * 256 + diff
  return s_lut, h_lut


_S_LUT, _H_LUT = _tables()


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
  """(..., 3, H, W) uint8 RGB planes -> (..., 3, H, W) uint8 HSV planes (H in [0, 180))."""
  r, g, b = rgb[..., 0, :, :], rgb[..., 1, :, :], rgb[..., 2, :, :]
  v = np.maximum(np.maximum(r, g), b)
  diff = v - np.minimum(np.minimum(r, g), b)
  r16, g16, b16, d16 = (a.astype(np.int16) for a in (r, g, b, diff))
  is_r = -(v == r).astype(np.int16)            # all-ones masks, as in OpenCV's branch-free code
  is_g = -(v == g).astype(np.int16)
  num = r16 - g16 + 4 * d16
  num &= ~is_g
  num += (b16 - r16 + 2 * d16) & is_g
  num &= ~is_r
  num += (g16 - b16) & is_r
  num += 255
  out = np.empty(rgb.shape, np.uint8)
  idx = num.astype(np.int32)
  idx <<= 8
  idx |= diff
  np.take(_H_LUT, idx, out=out[..., 0, :, :])
  idx = v.astype(np.int32)
  idx <<= 8
  idx |= diff
  np.take(_S_LUT, idx, out=out[..., 1, :, :])
  out[..., 2, :, :] = v
  return out
