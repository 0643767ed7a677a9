"""The vision-to-text projector of Keye-VL 1.5 (`mlp_AR`).

Each LLM vision token is one 2x2 square of patches:
  gather the m*m patches named by merge_index, concatenate   (B, T, m*m*Dv)
  LayerNorm (after the merge; Keye 1.0 normalised before it), linear_1, exact GELU, linear_2  -> (B, T, Dt)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from keye_jax.config import KeyeConfig
from keye_jax.layers import Dense, LayerNorm
from keye_jax.sharding import constrain


def merge_patches(feats_bpd, merge_index_btm):
  """(B, P, D) features, (B, T, m*m) patch indices -> (B, T, m*m*D), concatenated in index order."""
  b, t, mm = merge_index_btm.shape
  picked = jnp.take_along_axis(feats_bpd, merge_index_btm.reshape(b, t * mm, 1), axis=1)  # (B, T*m*m, D)
  return picked.reshape(b, t, mm * feats_bpd.shape[-1])


class Projector(nnx.Module):

  def __init__(self, cfg: KeyeConfig, *, rngs: nnx.Rngs):
    v = cfg.vision
    d_in = v.hidden_size * v.spatial_merge_size ** 2
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    self.norm = LayerNorm(d_in, cfg.projector_ln_eps, **kw)
    self.linear_1 = Dense(d_in, d_in, ("embed", "mlp"), bias=True, rngs=rngs, **kw)
    self.linear_2 = Dense(d_in, cfg.text.hidden_size, ("mlp", "embed"), bias=True, rngs=rngs, **kw)

  def __call__(self, feats_bpd, merge_index_btm):
    """Vision features (B, P, Dv) and merge_index (B, T, m*m) -> LLM vision tokens (B, T, Dt).
    Tokens whose indices are padding (pointing at patch 0) are computed but never used."""
    x = self.norm(merge_patches(feats_bpd, merge_index_btm))
    h = jax.nn.gelu(self.linear_1(x), approximate=False)
    return self.linear_2(constrain(h, ("batch", "length", "act_mlp")))
