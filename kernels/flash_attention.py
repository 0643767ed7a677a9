"""Segment-aware (varlen) flash attention for TPU in Pallas: forward, backward, custom VJP.

Kernel layout: q (B, Hq, Sq, D); k, v (B, Hkv, Skv, D); segment ids and positions (B, S) int32
(segment 0 = padding; causal means key position <= query position, so any token order works, e.g. the
zig-zag layout of ring attention). Grouped-query attention: query head h reads kv head h // G through
the index map, so repeated K/V never exist in HBM.

Every kernel walks a grid whose innermost axis steps through a compacted table from
`kernels.block_tables` (scalar-prefetched into SMEM): only key blocks that can share a segment with
the query block (and are not entirely in its future) are fetched and computed; steps past the count
keep the previous block index (no DMA) and skip compute under `pl.when`. The backward dkv kernel uses
the transposed table (per key block: the query blocks that see it).

Softmax statistics are fp32 whatever the input dtype; probabilities are cast to the value dtype for
the second matmul (the usual MXU trade-off). Per-row statistics travel lane-broadcast as (rows, 128)
tiles, the layout TPU vector registers want.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.block_tables import block_tables
from kernels.reference import MASK_VALUE

LANES = 128
SUBLANES = 8
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b
_TN = (((0,), (0,)), ((), ()))  # a.T @ b



def _dot(a, b, dims):
  """fp32-accumulated matmul. The precision follows the operands (full for fp32, native for bf16)
  rather than jax_default_matmul_precision, which Mosaic rejects for bf16 operands."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)

def _lane_rows(x):
  """(B, S) -> (B, S, 128): one value per row, broadcast along lanes."""
  return jnp.broadcast_to(x[..., None], (*x.shape, LANES))


def _sublane_cols(x):
  """(..., S) -> (..., 8, S): one value per column, broadcast along sublanes."""
  return jnp.broadcast_to(x[..., None, :], (*x.shape[:-1], SUBLANES, x.shape[-1]))


def _visible(q_seg_ref, kv_seg_ref, q_pos_ref, kv_pos_ref, causal: bool):
  """(bq, bkv) bool from (bq, 128) query tiles and (8, bkv) key tiles."""
  q_seg = q_seg_ref[...][:, :1]
  kv_seg = kv_seg_ref[...][:1, :]
  mask = (q_seg == kv_seg) & (kv_seg != 0)
  if causal:
    mask = mask & (kv_pos_ref[...][:1, :] <= q_pos_ref[...][:, :1])
  return mask


def _column(row_ref):
  """(8, bq) row tile of per-query statistics -> (bq, 1) column."""
  return row_ref[...].T[:, :1]


def _fwd_kernel(kv_index_ref, kv_count_ref, q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, q_pos_ref,
                kv_pos_ref, o_ref, lse_ref, m_scratch, l_scratch, acc_scratch, *, scale, causal,
                num_q_blocks):
  del kv_index_ref  # used by the index maps only
  b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(t == 0)
  def _init():
    m_scratch[...] = jnp.full_like(m_scratch, MASK_VALUE)
    l_scratch[...] = jnp.zeros_like(l_scratch)
    acc_scratch[...] = jnp.zeros_like(acc_scratch)

  @pl.when(t < kv_count_ref[b * num_q_blocks + i])
  def _visit():
    v = v_ref[...]
    s = _dot(q_ref[...], k_ref[...], _NT) * scale
    mask = _visible(q_seg_ref, kv_seg_ref, q_pos_ref, kv_pos_ref, causal)
    s = jnp.where(mask, s, MASK_VALUE)
    m_prev = m_scratch[...]                                            # (bq, 128)
    m_next = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m_next[:, :1]), 0.0)               # (bq, bkv)
    alpha = jnp.exp(m_prev - m_next)
    l_scratch[...] = alpha * l_scratch[...] + p.sum(axis=-1, keepdims=True)
    m_scratch[...] = m_next
    pv = _dot(p.astype(v.dtype), v, _NN)
    acc_scratch[...] = alpha[:, :1] * acc_scratch[...] + pv

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    l = l_scratch[...]
    seen = l > 0  # rows with no visible key (padding) give 0 and lse = MASK_VALUE
    safe_l = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc_scratch[...] * jnp.where(seen, 1.0 / safe_l, 0.0)[:, :1]).astype(o_ref.dtype)
    lse = jnp.where(seen, m_scratch[...] + jnp.log(safe_l), MASK_VALUE)   # (bq, 128), equal lanes
    lse_ref[...] = lse.T[:SUBLANES, :]                                   # (8, bq) row tile


def _dq_kernel(kv_index_ref, kv_count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref,
               kv_seg_ref, q_pos_ref, kv_pos_ref, dq_ref, dq_scratch, *, scale, causal, num_q_blocks):
  del kv_index_ref
  b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(t == 0)
  def _init():
    dq_scratch[...] = jnp.zeros_like(dq_scratch)

  @pl.when(t < kv_count_ref[b * num_q_blocks + i])
  def _visit():
    k = k_ref[...]
    s = _dot(q_ref[...], k, _NT) * scale
    mask = _visible(q_seg_ref, kv_seg_ref, q_pos_ref, kv_pos_ref, causal)
    p = jnp.where(mask, jnp.exp(s - _column(lse_ref)), 0.0)
    dp = _dot(do_ref[...], v_ref[...], _NT)
    ds = p * (dp - _column(delta_ref))
    dq_scratch[...] += _dot(ds.astype(k.dtype), k, _NN)

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_scratch[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_index_ref, q_count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref,
                kv_seg_ref, q_pos_ref, kv_pos_ref, dk_ref, dv_ref, dk_scratch, dv_scratch, *, scale,
                causal, num_kv_blocks):
  del q_index_ref
  b, j, g, t = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

  @pl.when((g == 0) & (t == 0))
  def _init():
    dk_scratch[...] = jnp.zeros_like(dk_scratch)
    dv_scratch[...] = jnp.zeros_like(dv_scratch)

  @pl.when(t < q_count_ref[b * num_kv_blocks + j])
  def _visit():
    q, do = q_ref[...], do_ref[...]
    s = _dot(q, k_ref[...], _NT) * scale  # (bq, bkv)
    mask = _visible(q_seg_ref, kv_seg_ref, q_pos_ref, kv_pos_ref, causal)
    p = jnp.where(mask, jnp.exp(s - _column(lse_ref)), 0.0)
    dv_scratch[...] += _dot(p.astype(do.dtype), do, _TN)
    dp = _dot(do, v_ref[...], _NT)
    ds = p * (dp - _column(delta_ref))
    dk_scratch[...] += _dot(ds.astype(q.dtype), q, _TN)

  @pl.when((g == pl.num_programs(3) - 1) & (t == pl.num_programs(4) - 1))
  def _finish():
    dk_ref[...] = (dk_scratch[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scratch[...].astype(dv_ref.dtype)


def _like(x, shape, dtype):
  """Output shape struct that varies over the same manual mesh axes as `x` (needed inside shard_map)."""
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(x).mat)


def _act_tile(seq_major: bool, rows: int, d: int, head_row):
  """BlockSpec of one (rows, D) tile of head h, row block r, where head_row(*grid, *prefetch) = (b, h, r).

  Heads-major arrays are (B, H, S, D); seq-major arrays are the model layout (B, S, H, D) viewed as
  (B, S, H * D) (a free reshape) and need D a multiple of 128 lanes so a head is one lane-aligned tile.
  """
  if seq_major:
    def index(*args):
      b_, h, r = head_row(*args)
      return b_, r, h
    return pl.BlockSpec((None, rows, d), index)

  def index(*args):
    b_, h, r = head_row(*args)
    return b_, h, r, 0
  return pl.BlockSpec((None, None, rows, d), index)


def _dims(q, k, seq_major: bool):
  """(b, hq, hkv, sq, skv, d) from either layout."""
  if seq_major:
    return q.shape[0], q.shape[2], k.shape[2], q.shape[1], k.shape[1], q.shape[3]
  return q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3]


def _flat(x, seq_major: bool):
  return x.reshape(*x.shape[:2], -1) if seq_major else x


def _check_blocks(sq, skv, block_q, block_kv):
  if sq % block_q or skv % block_kv:
    raise ValueError(f"sequence lengths ({sq}, {skv}) must be multiples of the blocks ({block_q}, {block_kv})")



def _query_walk(seq_major, block_q, block_kv, d, g, nq, nk):
  """Block specs for the walk shared by the forward and dq kernels, grid (b, h, q block i, step t):
  each query block visits the key blocks listed for it in the scalar-prefetched table. Returns the q
  tile, the kv tile, and the index maps of per-row (q) and per-column (kv) side inputs."""

  def kv_block(b_, i, t, kv_index):
    return kv_index[(b_ * nq + i) * nk + t]

  q_tile = _act_tile(seq_major, block_q, d, lambda b_, h, i, t, kv_index, kv_count: (b_, h, i))
  kv_tile = _act_tile(seq_major, block_kv, d,
                      lambda b_, h, i, t, kv_index, kv_count: (b_, h // g, kv_block(b_, i, t, kv_index)))
  q_row_map = lambda b_, h, i, t, kv_index, kv_count: (b_, i, 0)
  kv_col_map = lambda b_, h, i, t, kv_index, kv_count: (b_, 0, kv_block(b_, i, t, kv_index))
  return q_tile, kv_tile, q_row_map, kv_col_map

def flash_fwd(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, *, causal: bool,
              scale: float, block_q: int, block_kv: int, interpret: bool = False, seq_major: bool = False):
  """(out like q, lse (B, Hq, Sq) float32). Heads-major (B, H, S, D) arrays, or with `seq_major` the
  model layout (B, S, H, D) read in place (needs D % 128 == 0 on TPU)."""
  b, hq, hkv, sq, skv, d = _dims(q, k, seq_major)
  _check_blocks(sq, skv, block_q, block_kv)
  g, nq, nk = hq // hkv, sq // block_q, skv // block_kv
  tables = block_tables(q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal=causal,
                        block_q=block_q, block_kv=block_kv)

  q_tile, kv_tile, q_row_map, kv_col_map = _query_walk(seq_major, block_q, block_kv, d, g, nq, nk)
  in_specs = [
      q_tile, kv_tile, kv_tile,
      pl.BlockSpec((None, block_q, LANES), q_row_map),
      pl.BlockSpec((None, SUBLANES, block_kv), kv_col_map),
      pl.BlockSpec((None, block_q, LANES), q_row_map),
      pl.BlockSpec((None, SUBLANES, block_kv), kv_col_map),
  ]
  lse_map = lambda b_, h, i, t, kv_index, kv_count: (b_, h, 0, i)
  out_specs = [q_tile,
               pl.BlockSpec((None, None, SUBLANES, block_q), lse_map)]
  kernel = functools.partial(_fwd_kernel, scale=scale, causal=causal, num_q_blocks=nq)
  out, lse = pl.pallas_call(
      kernel,
      out_shape=[_like(q, _flat(q, seq_major).shape, q.dtype), _like(q, (b, hq, SUBLANES, sq), jnp.float32)],
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, hq, nq, nk), in_specs=in_specs, out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((block_q, LANES), jnp.float32),
                          pltpu.VMEM((block_q, LANES), jnp.float32),
                          pltpu.VMEM((block_q, d), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="segment_flash_fwd",
  )(tables["kv_index"].reshape(-1), tables["kv_count"].reshape(-1), *(_flat(x, seq_major) for x in (q, k, v)),
    _lane_rows(q_segment_ids), _sublane_cols(kv_segment_ids), _lane_rows(q_positions),
    _sublane_cols(kv_positions))
  return out.reshape(q.shape), lse[:, :, 0, :]


def flash_bwd(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, lse, do, delta, *,
              causal: bool, scale: float, block_q: int, block_kv: int, interpret: bool = False,
              seq_major: bool = False):
  """(dq, dk, dv) in the input dtypes and layout, given row lse and delta = rowsum(do * out), both
  (B, Hq, Sq)."""
  b, hq, hkv, sq, skv, d = _dims(q, k, seq_major)
  _check_blocks(sq, skv, block_q, block_kv)
  g, nq, nk = hq // hkv, sq // block_q, skv // block_kv
  tables = block_tables(q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal=causal,
                        block_q=block_q, block_kv=block_kv)
  acts = tuple(_flat(x, seq_major) for x in (q, k, v, do))
  row_stats = (_sublane_cols(lse), _sublane_cols(delta.astype(jnp.float32)))  # (B, Hq, 8, Sq)
  seg_pos = (_lane_rows(q_segment_ids), _sublane_cols(kv_segment_ids), _lane_rows(q_positions),
             _sublane_cols(kv_positions))

  # dq: the forward's walk (per query block, its key blocks).
  q_tile, kv_tile, q_row_map, kv_col_map = _query_walk(seq_major, block_q, block_kv, d, g, nq, nk)
  stat_tile = pl.BlockSpec((None, None, SUBLANES, block_q), lambda b_, h, i, t, *_: (b_, h, 0, i))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, causal=causal, num_q_blocks=nq),
      out_shape=_like(q, _flat(q, seq_major).shape, q.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, hq, nq, nk),
          in_specs=[q_tile, kv_tile, kv_tile, q_tile, stat_tile, stat_tile,
                    pl.BlockSpec((None, block_q, LANES), q_row_map),
                    pl.BlockSpec((None, SUBLANES, block_kv), kv_col_map),
                    pl.BlockSpec((None, block_q, LANES), q_row_map),
                    pl.BlockSpec((None, SUBLANES, block_kv), kv_col_map)],
          out_specs=q_tile,
          scratch_shapes=[pltpu.VMEM((block_q, d), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="segment_flash_dq",
  )(tables["kv_index"].reshape(-1), tables["kv_count"].reshape(-1), *acts, *row_stats, *seg_pos)

  # dk, dv: per key block, the query blocks that see it, for each of the G query heads of the group.
  def q_block(b_, j, t, q_index):
    return q_index[(b_ * nk + j) * nq + t]

  gq_tile = _act_tile(seq_major, block_q, d,
                      lambda b_, h, j, gi, t, q_index, q_count: (b_, h * g + gi, q_block(b_, j, t, q_index)))
  own_kv_tile = _act_tile(seq_major, block_kv, d, lambda b_, h, j, gi, t, q_index, q_count: (b_, h, j))
  gq_row_map = lambda b_, h, j, gi, t, q_index, q_count: (b_, q_block(b_, j, t, q_index), 0)
  own_col_map = lambda b_, h, j, gi, t, q_index, q_count: (b_, 0, j)
  gstat_tile = pl.BlockSpec((None, None, SUBLANES, block_q),
                            lambda b_, h, j, gi, t, q_index, q_count: (b_, h * g + gi, 0, q_block(b_, j, t, q_index)))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, causal=causal, num_kv_blocks=nk),
      out_shape=[_like(q, acts[1].shape, k.dtype), _like(q, acts[2].shape, v.dtype)],
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, hkv, nk, g, nq),
          in_specs=[gq_tile, own_kv_tile, own_kv_tile, gq_tile, gstat_tile, gstat_tile,
                    pl.BlockSpec((None, block_q, LANES), gq_row_map),
                    pl.BlockSpec((None, SUBLANES, block_kv), own_col_map),
                    pl.BlockSpec((None, block_q, LANES), gq_row_map),
                    pl.BlockSpec((None, SUBLANES, block_kv), own_col_map)],
          out_specs=[own_kv_tile, own_kv_tile],
          scratch_shapes=[pltpu.VMEM((block_kv, d), jnp.float32), pltpu.VMEM((block_kv, d), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
      name="segment_flash_dkv",
  )(tables["q_index"].reshape(-1), tables["q_count"].reshape(-1), *acts, *row_stats, *seg_pos)
  return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, options):
  out, _ = flash_fwd(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, **dict(options))
  return out


def _flash_vjp_fwd(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, options):
  out, lse = flash_fwd(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, **dict(options))
  return out, (q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, out, lse)


def _flash_vjp_bwd(options, residuals, do):
  q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, out, lse = residuals
  delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  if dict(options)["seq_major"]:
    delta = delta.swapaxes(1, 2)  # (B, S, H) -> (B, H, S)
  dq, dk, dv = flash_bwd(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, lse, do,
                         delta, **dict(options))
  return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_vjp_fwd, _flash_vjp_bwd)


def flash_attention(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, *, causal: bool,
                    scale: float, block_q: int = 512, block_kv: int = 512, interpret: bool = False,
                    seq_major: bool = False):
  """Differentiable segment-aware flash attention; heads-major (B, H, S, D) arrays, or the model
  layout (B, S, H, D) with `seq_major` (D a multiple of 128 on TPU)."""
  options = (("causal", causal), ("scale", scale), ("block_q", block_q), ("block_kv", block_kv),
             ("interpret", interpret), ("seq_major", seq_major))
  return _flash(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, options)
