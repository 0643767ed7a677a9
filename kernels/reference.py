"""Attention in plain XLA: the reference every kernel is tested against (XLA CPU runs its own form,
keye_jax/cpu_ops.py).

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


def grouped_attention(qh, kh, vh, mask, scale):
  """softmax(scale * qh kh^T) vh with fp32 statistics: qh (B, H, G*Tq, D), kh, vh (B, H, Skv, D), mask
  broadcasting against (B, H, G, Tq, Skv). Rows with no visible key (padding queries) give zeros. Plain
  maths, differentiated by JAX (XLA CPU's written-out gradient is keye_jax/cpu_ops.py's)."""
  b, h, m, _ = qh.shape
  tq, skv = mask.shape[-2:]
  s = jnp.einsum("bhmd,bhkd->bhmk", qh, kh, preferred_element_type=jnp.float32)
  s = s.reshape(b, h, m // tq, tq, skv) * scale
  row_max = jnp.max(jnp.where(mask, s, -jnp.inf), axis=-1, keepdims=True)
  e = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(row_max), row_max, 0.0)), 0.0)
  l = e.sum(-1, keepdims=True)
  p = (e * jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)).reshape(b, h, m, skv)
  return jnp.einsum("bhmk,bhkd->bhmd", p.astype(vh.dtype), vh, preferred_element_type=jnp.float32)


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

  # Heads-major, each kv head's G query heads stacked along the rows: q (B, Hkv, G*Tq, D) against
  # k, v (B, Hkv, Skv, D), so repeated K/V are never materialised and every matmul is a plain batched one.
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

  def block(q_blk, q_seg_blk, q_offset):
    """Queries q_offset .. q_offset + Tq against every key."""
    tq = q_blk.shape[1]
    qh = q_blk.reshape(b, tq, hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * tq, d)
    mask = jnp.ones((1, tq, skv), dtype=bool)
    if q_seg_blk is not None:
      mask = (q_seg_blk[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)
    if causal:
      q_pos = q_offset + jnp.arange(tq)[:, None] + (skv - sq)
      mask = mask & (q_pos >= jnp.arange(skv)[None, :])[None]
    out = grouped_attention(qh, kh, vh, mask[:, None, None], scale)
    return out.reshape(b, hkv, g, tq, d).transpose(0, 3, 1, 2, 4).reshape(b, tq, hq, d).astype(q.dtype)

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
