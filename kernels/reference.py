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


# Kernel-layout building blocks with explicit positions and log-sum-exp, used by ring attention on CPU
# and as the plain-JAX twin of the Pallas kernels. Shapes: q (B, Hq, Sq, D); k, v (B, Hkv, Skv, D);
# segment ids and positions (B, S) int32; lse and delta (B, Hq, Sq) float32.

# Finite stand-in for -inf: rows with no visible key get lse = MASK_VALUE, so log-sum-exp combination
# and exp(s - lse) never meet inf - inf.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def segment_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal: bool):
  """(B, 1, 1, Sq, Skv) bool: same non-zero segment and, when causal, key position <= query position."""
  mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)
  if causal:
    mask = mask & (kv_positions[:, None, :] <= q_positions[:, :, None])
  return mask[:, None, None]


def _grouped_logits(q, k, scale):
  b, hq, sq, d = q.shape
  hkv = k.shape[1]
  qg = q.reshape(b, hkv, hq // hkv, sq, d)
  return jnp.einsum("bhgqd,bhkd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale


def attention_fwd_lse(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, *,
                      causal: bool, scale: float):
  """Returns (out (B, Hq, Sq, D) in q.dtype, lse (B, Hq, Sq) float32); empty rows give 0 and MASK_VALUE."""
  b, hq, sq, d = q.shape
  mask = segment_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal)
  s = jnp.where(mask, _grouped_logits(q, k, scale), MASK_VALUE)
  m = s.max(-1, keepdims=True)
  p = jnp.where(mask, jnp.exp(s - m), 0.0)
  l = p.sum(-1, keepdims=True)
  out = jnp.einsum("bhgqk,bhkd->bhgqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  out = out * jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)
  lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), MASK_VALUE)[..., 0]
  return out.reshape(b, hq, sq, d).astype(q.dtype), lse.reshape(b, hq, sq)


def attention_bwd(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, lse, do, delta, *,
                  causal: bool, scale: float):
  """Gradients (dq, dk, dv) given the row lse and delta = rowsum(do * out) (both may be global, as in
  ring attention, where these keys are only part of what each query sees)."""
  b, hq, sq, d = q.shape
  hkv = k.shape[1]
  g = hq // hkv
  mask = segment_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal)
  lse_g = lse.reshape(b, hkv, g, sq)[..., None]
  p = jnp.where(mask, jnp.exp(_grouped_logits(q, k, scale) - lse_g), 0.0)
  dog = do.reshape(b, hkv, g, sq, d)
  dv = jnp.einsum("bhgqk,bhgqd->bhkd", p.astype(do.dtype), dog, preferred_element_type=jnp.float32)
  dp = jnp.einsum("bhgqd,bhkd->bhgqk", dog, v, preferred_element_type=jnp.float32)
  ds = p * (dp - delta.reshape(b, hkv, g, sq)[..., None])
  dq = jnp.einsum("bhgqk,bhkd->bhgqd", ds.astype(k.dtype), k, preferred_element_type=jnp.float32) * scale
  dk = jnp.einsum("bhgqk,bhgqd->bhkd", ds.astype(q.dtype), q.reshape(b, hkv, g, sq, d),
                  preferred_element_type=jnp.float32) * scale
  return dq.reshape(b, hq, sq, d), dk, dv
