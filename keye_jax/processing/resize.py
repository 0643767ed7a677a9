"""Antialiased bilinear resize of uint8 images, equal to torch's `F.interpolate(uint8, mode="bilinear",
antialias=True)` on CPU (align_corners=False), bit for bit, in numpy.

torch (like Pillow, whose algorithm it ports) resizes width first, then height. Each pass is a convolution
with a triangle filter stretched by the scale factor; the float64 weights of an output sample are
normalised, turned into int16 at the largest precision that keeps the biggest weight under 2^14, and every
output is `clip((sum(w_int * pixel) + 2^(p-1)) >> p, 0, 255)` stored as uint8 between the passes.

Here each pass is a handful of small matrix products: outputs are grouped in blocks, and each block multiplies
only the input columns its filters touch. All products and sums are integers, exact in float32 while they
stay under 2^24 and in float64 otherwise, so the BLAS result equals torch's integer one (in any order).
When both axes change, each pass contracts the contiguous last axis and writes its result transposed,
`weights (block, taps) @ x[:, taps].T`: every product then has a long inner dimension (BLAS near its peak,
no strided writes), and the two transpositions leave the result channels-last, (h, w, C), with no copy.
The products are too small to gain from BLAS threads, and threads spinning on a busy machine cost 100x, so
they run with one BLAS thread (parallelism belongs at the frame level).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading

import numpy as np
from threadpoolctl import ThreadpoolController

_BLOCK = 16                # outputs per product, (rows, taps) @ (taps, block) form
_BLOCK_T = 8               # outputs per product, (block, taps) @ (taps, rows) form


@functools.lru_cache(maxsize=1)
def _blas() -> ThreadpoolController:
  return ThreadpoolController()


_limit_lock = threading.Lock()
_limit_users = 0
_limiter = None


@contextlib.contextmanager
def _one_blas_thread():
  """One BLAS thread while any thread is inside (the limit is process-wide: a plain `limit()` per thread
  would let the first thread out restore the old count under the others, and the last one keep 1)."""
  global _limit_users, _limiter
  with _limit_lock:
    if _limit_users == 0:
      _limiter = _blas().limit(limits=1, user_api="blas")
    _limit_users += 1
  try:
    yield
  finally:
    with _limit_lock:
      _limit_users -= 1
      if _limit_users == 0:
        _limiter.restore_original_limits()
        _limiter = None


@functools.lru_cache(maxsize=64)
def aa_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
  """torch's int16 antialias weights for one axis: (first (n_out,), count (n_out,), w (n_out, k), precision)."""
  scale = n_in / n_out
  support = scale if scale >= 1.0 else 1.0      # bilinear: interp_size 2 -> support 1, stretched when shrinking
  kmax = int(math.ceil(support)) * 2 + 1
  invscale = 1.0 / scale if scale >= 1.0 else 1.0
  center = scale * (np.arange(n_out) + 0.5)
  first = np.maximum((center - support + 0.5).astype(np.int64), 0)
  count = np.clip(np.minimum((center + support + 0.5).astype(np.int64), n_in) - first, 0, kmax)
  j = np.arange(kmax)
  dist = np.abs(((j[None] + first[:, None]) - center[:, None] + 0.5) * invscale)
  w = np.where((dist < 1.0) & (j[None] < count[:, None]), 1.0 - dist, 0.0)
  total = np.zeros(n_out)
  for k in range(kmax):                           # torch sums left to right
    total = total + w[:, k]
  w = w / np.where(total == 0.0, 1.0, total)[:, None]
  wt_max = float(w.max())
  precision = 0
  while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
    precision += 1
  w_int = (0.5 + w * (1 << precision)).astype(np.int64)
  return first, count, w_int, precision


@functools.lru_cache(maxsize=64)
def _band_plan(n_in: int, n_out: int, block: int = _BLOCK):
  """Blocks (out_start, out_end, in_start, in_end, weights (out, in), their transpose), the dtype, and
  whether an output can exceed 255 (else the clip is skipped).

  The int16 weights are stored times 2^-p: the products and sums stay exact (a power-of-two scale) and
  come out as acc / 2^p, so (acc + 2^(p-1)) >> p is floor(result + 0.5) with no separate shift.
  """
  first, count, w_int, precision = aa_weights(n_in, n_out)
  row_max = int(w_int.sum(axis=1).max())
  largest = 255 * row_max + (1 << (precision - 1))       # every partial sum is below this
  dtype = np.float32 if largest <= (1 << 24) else np.float64
  saturates = (largest >> precision) > 255
  scale = 2.0 ** -precision
  blocks = []
  for s in range(0, n_out, block):
    e = min(s + block, n_out)
    lo = int(first[s:e].min())
    hi = int((first[s:e] + count[s:e]).max())
    m = np.zeros((e - s, hi - lo), dtype)
    for o in range(s, e):
      m[o - s, first[o] - lo:first[o] - lo + count[o]] = w_int[o, :count[o]] * scale
    blocks.append((s, e, lo, hi, m, np.ascontiguousarray(m.T)))
  return blocks, dtype, saturates


def _round(acc: np.ndarray, saturates: bool, floor: bool) -> np.ndarray:
  """acc + 0.5 (the rounding half of the shift), clipped to 255 when it can exceed it, floored when `floor`
  (otherwise the caller's cast to uint8 truncates, which is the floor of these non-negative values)."""
  acc += 0.5
  if floor:
    np.floor(acc, out=acc)
  if saturates:
    np.minimum(acc, 255, out=acc)
  return acc


def _resize_width(x: np.ndarray, n_out: int, floor: bool) -> np.ndarray:
  """(N, W) -> (N, n_out) floats (integer-valued when `floor`). Weights are non-negative, so no clip at 0."""
  blocks, dtype, saturates = _band_plan(x.shape[1], n_out)
  x = x.astype(dtype, copy=False)
  out = np.empty((x.shape[0], n_out), dtype)
  for s, e, lo, hi, _, m_t in blocks:
    out[:, s:e] = x[:, lo:hi] @ m_t
  return _round(out, saturates, floor)


def _resize_height(x: np.ndarray, n_out: int, floor: bool) -> np.ndarray:
  """(B, H, W) -> (B, n_out, W) floats (integer-valued when `floor`)."""
  blocks, dtype, saturates = _band_plan(x.shape[1], n_out)
  x = x.astype(dtype, copy=False)
  out = np.empty((x.shape[0], n_out, x.shape[2]), dtype)
  for s, e, lo, hi, m, _ in blocks:
    out[:, s:e] = m @ x[:, lo:hi]
  return _round(out, saturates, floor)


def _resize_last_transposed(x: np.ndarray, n_out: int, floor: bool) -> np.ndarray:
  """(R, n) -> (n_out, R) floats: the last axis resized, the result written transposed."""
  blocks, dtype, saturates = _band_plan(x.shape[1], n_out, _BLOCK_T)
  x = x.astype(dtype, copy=False)
  out = np.empty((n_out, x.shape[0]), dtype)
  for s, e, lo, hi, m, _ in blocks:
    np.matmul(m, x[:, lo:hi].T, out=out[s:e])
  return _round(out, saturates, floor)


def resize_channels_last(planes: np.ndarray, height: int, width: int) -> np.ndarray:
  """(C, H, W) uint8 planes -> (height, width, C) uint8: torch's antialiased bilinear resize, channels last."""
  c, h, w = planes.shape
  if h == height or w == width:
    return np.moveaxis(resize_planes(planes, height, width), 0, -1)
  with _one_blas_thread():
    x = _resize_last_transposed(planes.reshape(c * h, w), width, floor=True)     # (width, C*H)
    x = _resize_last_transposed(x.reshape(width * c, h), height, floor=False)    # (height, width*C)
  return x.astype(np.uint8).reshape(height, width, c)


def resize_planes(planes: np.ndarray, height: int, width: int) -> np.ndarray:
  """(..., H, W) uint8 planes -> (..., height, width) uint8, equal to torch's antialiased bilinear resize."""
  planes = np.asarray(planes)
  if planes.dtype != np.uint8:
    raise TypeError(f"resize_planes expects uint8 planes, got {planes.dtype}")
  *lead, h, w = planes.shape
  if (h, w) == (height, width):
    return planes.copy()
  x = planes.reshape(-1, h, w)
  if h != height and w != width:
    return np.ascontiguousarray(np.moveaxis(resize_channels_last(x, height, width), -1, 0)).reshape(
        *lead, height, width)
  with _one_blas_thread():
    if w != width:                      # floored only when the height pass follows
      x = _resize_width(x.reshape(-1, w), width, floor=h != height).reshape(-1, h, width)
    if h != height:
      x = _resize_height(x, height, floor=False)
  return x.astype(np.uint8).reshape(*lead, height, width)   # truncation: the floor of values >= 0
