"""Attention in plain XLA: the reference every kernel is tested against, and the CPU path.

Shapes: q (B, Sq, Hq, D); k, v (B, Skv, Hkv, D) with Hq a multiple of Hkv (grouped-query attention:
kv head j serves query heads j*G .. j*G+G-1). Segment ids (B, S) int32, 0 = padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(q_segment_ids, kv_segment_ids, causal: bool, sq: int, skv: int):
  """Boolean (B or 1, Sq, Skv) mask: same non-zero segment and, when causal, key not after query."""
  mask = jnp.ones((1, sq, skv), dtype=bool)
  if q_segment_ids is not None:
    mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)
  if causal:
    # Queries are the last Sq positions of the key sequence (Sq == Skv for training and prefill).
    q_pos = jnp.arange(sq)[:, None] + (skv - sq)
    mask = mask & (q_pos >= jnp.arange(skv)[None, :])[None]
  return mask


def xla_attention(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, causal: bool, scale=None,
                  block_q: int = 512):
  """Softmax attention in fp32 statistics. Long query sequences are processed in blocks of
  `block_q` so memory is O(block_q * Skv) per head instead of O(Sq * Skv)."""
  b, sq, hq, d = q.shape
  skv, hkv = k.shape[1], k.shape[2]
  if hq % hkv:
    raise ValueError(f"query heads {hq} are not a multiple of kv heads {hkv}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
  g = hq // hkv
  scale = d ** -0.5 if scale is None else scale

  def block(q_blk, q_seg_blk, q_offset):
    # q_blk (B, Tq, Hq, D) -> (B, Tq, Hkv, G, D) so repeated K/V are never materialised.
    tq = q_blk.shape[1]
    qg = q_blk.reshape(b, tq, hkv, g, d)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    mask = jnp.ones((1, tq, skv), dtype=bool)
    if q_seg_blk is not None:
      mask = (q_seg_blk[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)
    if causal:
      q_pos = q_offset + jnp.arange(tq)[:, None] + (skv - sq)
      mask = mask & (q_pos >= jnp.arange(skv)[None, :])[None]
    logits = jnp.where(mask[:, None, None], logits, -1e30)
    probs = jax.nn.softmax(logits, axis=-1)
    # Rows with no visible key (padding queries) give zeros, not a uniform average.
    probs = jnp.where(mask[:, None, None].any(-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, tq, hq, d).astype(q.dtype)

  if sq <= block_q or sq % block_q:
    return block(q, q_segment_ids, 0)
  n = sq // block_q
  q_blocks = q.reshape(b, n, block_q, hq, d).swapaxes(0, 1)
  seg_blocks = None if q_segment_ids is None else q_segment_ids.reshape(b, n, block_q).swapaxes(0, 1)
  offsets = jnp.arange(n) * block_q
  body = jax.checkpoint(lambda args: block(*args))  # keep backward memory blockwise too
  out = jax.lax.map(body, (q_blocks, seg_blocks, offsets))
  return out.swapaxes(0, 1).reshape(b, sq, hq, d)
