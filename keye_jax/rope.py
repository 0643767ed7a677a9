"""Rotary position embeddings (pure functions).

Text: 3D multimodal RoPE (M-RoPE). Position ids (3, B, S) for the temporal, height and width axes;
frequency slot j < hd/2 takes its angle from axis t, h or w by `mrope_section` (chunked, not
interleaved). Equal rows reduce to ordinary 1D RoPE.
Vision: 2D RoPE; the first hd/4 frequency slots rotate by patch row, the next hd/4 by column.
Both are applied rotate-half style: dimension i pairs with i + hd/2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mrope_cos_sin(position_ids_3bs, head_dim: int, theta: float, section: tuple[int, int, int]):
  """Returns cos, sin of shape (B, S, head_dim) in fp32."""
  if sum(section) != head_dim // 2:
    raise ValueError(f"mrope_section {section} must sum to head_dim/2 = {head_dim // 2}")
  inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)   # (hd/2,)
  axis_of_slot = jnp.repeat(jnp.arange(3), jnp.array(section), total_repeat_length=head_dim // 2)
  pos_bsj = jnp.moveaxis(position_ids_3bs.astype(jnp.float32), 0, -1)[..., axis_of_slot]  # (B, S, hd/2)
  freqs = pos_bsj * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def vision_cos_sin(rows, cols, head_dim: int, theta: float):
  """rows, cols (..., P) integer patch coordinates -> cos, sin (..., P, head_dim) in fp32."""
  quarter = head_dim // 4
  inv_freq = theta ** (-jnp.arange(quarter, dtype=jnp.float32) * 2 / (head_dim // 2))   # (hd/4,)
  freqs = jnp.concatenate([rows[..., None].astype(jnp.float32) * inv_freq,
                           cols[..., None].astype(jnp.float32) * inv_freq], axis=-1)   # (..., hd/2)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_bshd, cos_bsd, sin_bsd):
  """Rotate-half RoPE in fp32; cos/sin broadcast over heads. Returns x's dtype."""
  x = x_bshd.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos_bsd[..., None, :], sin_bsd[..., None, :]
  return (x * cos + rotated * sin).astype(x_bshd.dtype)
