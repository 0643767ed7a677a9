"""Which (query block, key block) pairs attention must visit, computed from segment ids and positions.

Packed sequences attend only within a segment, so most of the N x N block square is empty. Per block we
summarise the non-padding segment ids by their [min, max] interval and the positions by their extent:
a query block and a key block can share a segment only if their intervals intersect (exact for the
usual packing, where segment ids increase along the row; never misses a pair otherwise), and, when
causal, the key block can hold a visible key only if its earliest position is not after the query
block's latest. The kernels still mask element by element, so a conservative table is always correct.

Tables are compacted for scalar prefetch: for each query block, the visited key block indices come
first in increasing order and the remaining slots repeat the last visited index, so a pipelined
kernel stepping past the count re-uses the block already in VMEM (no DMA) and skips the compute.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_BIG = jnp.iinfo(jnp.int32).max


def _block_summary(segment_ids, positions, block: int):
  """(B, S) -> per block (B, S // block): segment min/max and position min/max over non-padding tokens."""
  b, s = segment_ids.shape
  seg = segment_ids.reshape(b, s // block, block)
  pos = positions.reshape(b, s // block, block)
  real = seg != 0
  return (jnp.where(real, seg, _BIG).min(-1), jnp.where(real, seg, 0).max(-1),
          jnp.where(real, pos, _BIG).min(-1), jnp.where(real, pos, -1).max(-1))


def visit_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions, *, causal: bool,
               block_q: int, block_kv: int):
  """Boolean (B, Sq // block_q, Skv // block_kv): True where the block pair may hold a visible pair."""
  q_seg_lo, q_seg_hi, _, q_pos_hi = _block_summary(q_segment_ids, q_positions, block_q)
  kv_seg_lo, kv_seg_hi, kv_pos_lo, _ = _block_summary(kv_segment_ids, kv_positions, block_kv)
  visit = (q_seg_lo[:, :, None] <= kv_seg_hi[:, None, :]) & (kv_seg_lo[:, None, :] <= q_seg_hi[:, :, None])
  if causal:
    visit = visit & (kv_pos_lo[:, None, :] <= q_pos_hi[:, :, None])
  return visit


def compact(visit):
  """visit (B, N, M) bool -> (index (B, N, M) int32, count (B, N) int32); see the module docstring."""
  m = visit.shape[-1]
  count = visit.sum(-1, dtype=jnp.int32)
  order = jnp.argsort(~visit, axis=-1, stable=True).astype(jnp.int32)  # visited first, in order
  last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
  index = jnp.where(jnp.arange(m)[None, None, :] < count[..., None], order, last)
  return index, count


def block_tables(q_segment_ids, kv_segment_ids, q_positions, kv_positions, *, causal: bool,
                 block_q: int, block_kv: int):
  """Forward/dq tables (per query block: key blocks) and dkv tables (per key block: query blocks).

  Returns dict with kv_index (B, nq, nk), kv_count (B, nq), q_index (B, nk, nq), q_count (B, nk).
  """
  visit = visit_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal=causal,
                     block_q=block_q, block_kv=block_kv)
  kv_index, kv_count = compact(visit)
  q_index, q_count = compact(visit.swapaxes(1, 2))
  return dict(kv_index=kv_index, kv_count=kv_count, q_index=q_index, q_count=q_count)


def default_positions(batch: int, length: int, offset: int = 0):
  """(B, S) int32 positions offset + 0..S-1; queries of a shorter Sq sit at the end of the keys."""
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32) + offset, (batch, length))


def visited_fraction(q_segment_ids, kv_segment_ids, *, causal: bool, block_q: int, block_kv: int):
  """Fraction of the dense block square a kernel using these tables visits (for benchmarks)."""
  b, sq = q_segment_ids.shape
  skv = kv_segment_ids.shape[1]
  visit = visit_mask(q_segment_ids, kv_segment_ids, default_positions(b, sq, skv - sq),
                     default_positions(b, skv), causal=causal, block_q=block_q, block_kv=block_kv)
  return jax.numpy.mean(visit.astype(jnp.float32))
