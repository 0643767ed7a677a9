"""Ragged decode attention for TPU in Pallas: a few queries per row against that row's filled cache slots.

`ragged_decode_attention(q, k_cache, v_cache, segment_ids, lengths, *, scale, block_kv, interpret)`:
  q (B, Hkv, R, D); k_cache/v_cache (B, Hkv, T, D) bf16 or fp32; segment_ids (B, T) int32 (0 = empty);
  lengths (B,) int32. Returns (out (B, Hkv, R, D) float32, lse (B, Hkv, R) float32), the contract of
  `kernels.decode.cache_attention` (a row with no valid slot gives out 0 and lse NO_KEYS).

Grid (B, Hkv, T // block_kv); `lengths` is scalar-prefetched into SMEM. The key/value/segment index maps
clamp the block index to the row's last needed block, so steps past `lengths[b]` repeat the previous
block index (Pallas skips that copy) and `pl.when` skips their compute: a row costs what it holds, not T.
Online softmax with fp32 running max, sum and accumulator in VMEM scratch; per-row statistics travel
lane-broadcast as (R, 128) tiles. Probabilities are cast to the value dtype for the second matmul.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.decode import NO_KEYS, xla_cache_attention

LANES = 128
BLOCKS = (512, 256, 128)   # default key block: the largest of these that divides T
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _dot(a, b, dims):
  """fp32-accumulated matmul; full precision for fp32 operands, native for bf16 (Mosaic rejects more)."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def kv_block_index(i, length, block_kv: int, num_blocks: int):
  """The key block fetched at grid step i: i, clamped to the row's last block holding a slot before
  `length` (block 0 for an empty row). Equal indices on consecutive steps mean no new copy."""
  return jnp.minimum(i, jnp.clip((length + block_kv - 1) // block_kv - 1, 0, num_blocks - 1))


def _kernel(lengths_ref, q_ref, k_ref, v_ref, seg_ref, out_ref, lse_ref, m_scratch, l_scratch, acc_scratch,
            *, scale, block_kv):
  b, t = pl.program_id(0), pl.program_id(2)
  length = lengths_ref[b]

  @pl.when(t == 0)
  def _init():
    m_scratch[...] = jnp.full_like(m_scratch, NO_KEYS)
    l_scratch[...] = jnp.zeros_like(l_scratch)
    acc_scratch[...] = jnp.zeros_like(acc_scratch)

  @pl.when(t * block_kv < length)
  def _visit():
    start = t * block_kv
    q = q_ref[...]
    s = _dot(q, k_ref[...].astype(q.dtype), _NT) * scale                       # (R, bkv)
    pos = start + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
    ok = (seg_ref[...] != 0) & (pos < length)                                   # (1, bkv)
    s = jnp.where(ok, s, NO_KEYS)
    m_prev = m_scratch[...]                                                     # (R, 128)
    m_next = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
    p = jnp.where(ok, jnp.exp(s - m_next[:, :1]), 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_scratch[...] = alpha * l_scratch[...] + p.sum(axis=-1, keepdims=True)
    m_scratch[...] = m_next
    # Slots at/after `length` in this last, partial block hold whatever the cache has (0 * inf = nan).
    v = v_ref[...]
    v = jnp.where(start + lax.broadcasted_iota(jnp.int32, (block_kv, 1), 0) < length, v, jnp.zeros_like(v))
    acc_scratch[...] = alpha[:, :1] * acc_scratch[...] + _dot(p.astype(v.dtype), v, _NN)

  @pl.when(t == pl.num_programs(2) - 1)
  def _finish():
    l = l_scratch[...]
    seen = l > 0
    safe_l = jnp.where(seen, l, 1.0)
    out_ref[...] = acc_scratch[...] * jnp.where(seen, 1.0 / safe_l, 0.0)[:, :1]
    lse_ref[...] = jnp.where(seen, m_scratch[...] + jnp.log(safe_l), NO_KEYS)


def _like(x, shape, dtype):
  """Output shape struct varying over the same manual mesh axes as `x` (needed inside shard_map)."""
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(x).mat)


def default_block(t: int) -> int | None:
  """The largest of BLOCKS dividing T, or None."""
  return next((b for b in BLOCKS if t % b == 0), None)


def ragged_decode_attention(q, k_cache, v_cache, segment_ids, lengths, *, scale: float,
                            block_kv: int | None = None, interpret: bool = False):
  """See the module docstring. `block_kv` defaults to `default_block(T)`."""
  b, hkv, r, d = q.shape
  t = k_cache.shape[2]
  block_kv = block_kv or default_block(t)
  if block_kv is None or t % block_kv:
    # T not a multiple of 128 lanes: no TPU tiling fits, so the plain-XLA reference runs (the decoder's
    # cache lengths are bucketed, so this is the rare case).
    return xla_cache_attention(q, k_cache, v_cache, segment_ids, lengths, scale=scale)
  nk = t // block_kv
  lengths = jnp.broadcast_to(jnp.asarray(lengths, jnp.int32), (b,))

  def kv_map(b_, h, i, lengths_ref):
    return b_, h, kv_block_index(i, lengths_ref[b_], block_kv, nk), 0

  def seg_map(b_, h, i, lengths_ref):
    return b_, 0, kv_block_index(i, lengths_ref[b_], block_kv, nk)

  row_map = lambda b_, h, i, lengths_ref: (b_, h, 0, 0)
  kv_tile = pl.BlockSpec((None, None, block_kv, d), kv_map)
  out, lse = pl.pallas_call(
      functools.partial(_kernel, scale=scale, block_kv=block_kv),
      out_shape=[_like(q, (b, hkv, r, d), jnp.float32), _like(q, (b, hkv, r, LANES), jnp.float32)],
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(b, hkv, nk),
          in_specs=[pl.BlockSpec((None, None, r, d), row_map), kv_tile, kv_tile,
                    pl.BlockSpec((None, 1, block_kv), seg_map)],
          out_specs=[pl.BlockSpec((None, None, r, d), row_map), pl.BlockSpec((None, None, r, LANES), row_map)],
          scratch_shapes=[pltpu.VMEM((r, LANES), jnp.float32), pltpu.VMEM((r, LANES), jnp.float32),
                          pltpu.VMEM((r, d), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="ragged_decode_attention",
  )(lengths, q, k_cache, v_cache, segment_ids.astype(jnp.int32).reshape(b, 1, t))
  return out, lse[..., 0]
