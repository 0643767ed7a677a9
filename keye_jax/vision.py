"""The native-resolution SigLIP vision tower of Keye-VL 1.5.

One packed patch sequence per batch row holds every image and video frame of that row (a *block*
each; see keye_jax/processing/vision_layout.py):
  pixel_values       (B, P, C*p*p)  each patch flattened in (channel, y, x) order
  patch_segment_ids  (B, P)         block number 1..n, 0 for padding
  patch_pos          (B, P, 4)      (row, col, h, w) of each patch inside its block

x = patch_embed(pixels) + bilinear(position table resized to the block's (h, w))[row, col]
x += out_proj(attn(LN1(x))); x += fc2(gelu_tanh(fc1(LN2(x))))      (every layer, 2D RoPE on q and k)
features = post_LN(x)                                               (B, P, Dv)
Attention is block-diagonal by segment id, so padding and other blocks never mix into a block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from keye_jax import ops, rope
from keye_jax.config import KeyeConfig, VisionConfig
from keye_jax.layers import Dense, LayerNorm
from keye_jax.sharding import constrain
from keye_jax.stack import Stack

_init = jax.nn.initializers.normal(stddev=0.02)


# --------------------------------------------------------------------------------------------------
# Resizing the learned position table (pure maths).


def bilinear_taps(index, size, side: int):
  """Source taps of a bilinear, align_corners=False, non-antialiased resize of `side` samples to `size`.

  index, size (...) target positions and target lengths -> taps (..., 2) int32 in [0, side), weights
  (..., 2) fp32 summing to 1. Same numbers as F.interpolate(bilinear, align_corners=False) and
  jax.image.resize(linear, antialias=False): a half-pixel source coordinate, clamped at the borders.
  """
  size = jnp.maximum(size, 1).astype(jnp.float32)  # padding patches have h = w = 0
  src = (index.astype(jnp.float32) + 0.5) * (side / size) - 0.5
  lo = jnp.floor(src)
  frac = src - lo
  lo = lo.astype(jnp.int32)
  taps = jnp.clip(jnp.stack([lo, lo + 1], axis=-1), 0, side - 1)  # a tap past the border repeats the edge
  return taps, jnp.stack([1.0 - frac, frac], axis=-1)


def interpolated_positions(table_nd, patch_pos_bp4, side: int):
  """Row (row, col) of the (side x side) table resized to (h, w), for every patch: (B, P, D) fp32.

  Per patch, four gathered table rows weighted by the separable bilinear weights; no resized table is
  ever built, so blocks of any grid share one jitted shape.
  """
  rows, cols, h, w = (patch_pos_bp4[..., i] for i in range(4))
  r_taps, r_wts = bilinear_taps(rows, h, side)
  c_taps, c_wts = bilinear_taps(cols, w, side)
  table = table_nd.astype(jnp.float32)
  out = 0.0
  for i in range(2):
    for j in range(2):
      rows_bpd = jnp.take(table, r_taps[..., i] * side + c_taps[..., j], axis=0)
      out = out + (r_wts[..., i] * c_wts[..., j])[..., None] * rows_bpd
  return out


# --------------------------------------------------------------------------------------------------
# Modules.


class PositionTable(nnx.Module):
  """The learned (G*G, Dv) absolute position table, resized per block on the fly."""

  def __init__(self, side: int, dim: int, *, rngs: nnx.Rngs, dtype, param_dtype, init_std: float = 0.0):
    # A fresh table is N(0, init_std), by default SigLIP's 1/sqrt(dim) (transformers'
    # SiglipPreTrainedModel._init_weights); pretrained checkpoints overwrite it. The CPU demo sets 0.7
    # (configs/model/tiny.yaml), see there.
    std = init_std or dim ** -0.5
    self.embedding = nnx.Param(std * jax.random.normal(rngs.params(), (side * side, dim), param_dtype),
                               logical_axes=("positions", "embed"))
    self.side, self.dtype = side, dtype

  def __call__(self, patch_pos_bp4):
    return interpolated_positions(self.embedding[...], patch_pos_bp4, self.side).astype(self.dtype)


class VisionAttention(nnx.Module):
  """Multi-head self-attention with biases, 2D RoPE on q and k, block-diagonal by segment."""

  def __init__(self, cfg: VisionConfig, *, attention_impl: str, rngs: nnx.Rngs, dtype, param_dtype):
    d = cfg.hidden_size
    kw = dict(bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.q_proj = Dense(d, d, ("embed", "heads"), **kw)
    self.k_proj = Dense(d, d, ("embed", "heads"), **kw)
    self.v_proj = Dense(d, d, ("embed", "heads"), **kw)
    self.out_proj = Dense(d, d, ("heads", "embed"), **kw)
    self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
    self.attention_impl = attention_impl

  def __call__(self, x_bpd, cos, sin, segment_ids_bp):
    """cos, sin (B, P, hd) from the patches' (row, col); returns (B, P, Dv)."""
    b, p, _ = x_bpd.shape
    heads = lambda y: y.reshape(b, p, self.num_heads, self.head_dim)
    names = ("batch", "length", "act_heads", None)
    o = ops.current()
    q = constrain(o.apply_rope(heads(self.q_proj(x_bpd)), cos, sin), names)
    k = constrain(o.apply_rope(heads(self.k_proj(x_bpd)), cos, sin), names)
    v = heads(self.v_proj(x_bpd))
    out = o.attention(q, k, v, q_segment_ids=segment_ids_bp, kv_segment_ids=segment_ids_bp, causal=False,
                      impl=self.attention_impl)
    return self.out_proj(out.reshape(b, p, self.num_heads * self.head_dim))


class VisionMLP(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.fc1 = Dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
    self.fc2 = Dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)

  def __call__(self, x):
    h = jax.nn.gelu(self.fc1(x), approximate=True)  # gelu_pytorch_tanh
    return self.fc2(constrain(h, ("batch", "length", "act_mlp")))


class EncoderLayer(nnx.Module):
  """Pre-LN SigLIP encoder layer."""

  def __init__(self, cfg: VisionConfig, *, attention_impl: str, rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
    self.attn = VisionAttention(cfg, attention_impl=attention_impl, rngs=rngs, **kw)
    self.norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
    self.mlp = VisionMLP(cfg, rngs=rngs, **kw)

  def __call__(self, x_bpd, per_layer, *, cos, sin, segment_ids):
    """`per_layer` is Stack's per-layer slot (unused here). Returns (x, None)."""
    del per_layer
    x_bpd = x_bpd + self.attn(self.norm1(x_bpd), cos, sin, segment_ids)
    x_bpd = x_bpd + self.mlp(self.norm2(x_bpd))
    return constrain(x_bpd, ("batch", "length", "act_embed")), None


class VisionTower(nnx.Module):
  """Patch embedding + resized position table, encoder layers with 2D RoPE, post LayerNorm."""

  def __init__(self, cfg: KeyeConfig, *, rngs: nnx.Rngs):
    v = cfg.vision
    if v.head_dim % 4:
      raise ValueError(f"vision head_dim {v.head_dim} must be a multiple of 4 for 2D RoPE")
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.cfg = v
    self.patch_embed = Dense(v.num_channels * v.patch_size ** 2, v.hidden_size, ("patch", "embed"), bias=True,
                             rngs=rngs, **kw)
    self.pos_embed = PositionTable(v.grid_size, v.hidden_size, rngs=rngs, init_std=v.position_init_std, **kw)
    self.layers = Stack(
        lambda r: EncoderLayer(v, attention_impl=cfg.attention_impl, rngs=r, **kw),
        v.num_layers, scan=cfg.scan_layers, remat=cfg.remat, rngs=rngs)
    self.post_norm = LayerNorm(v.hidden_size, v.layer_norm_eps, **kw)

  def embed(self, pixel_values_bpk, patch_segment_ids_bp, patch_pos_bp4):
    """Patch embeddings plus positions, (B, P, Dv); padding patches are zeroed so that whatever the
    host put in their pixels stays finite and identical."""
    x = self.patch_embed(pixel_values_bpk) + self.pos_embed(patch_pos_bp4)
    return jnp.where((patch_segment_ids_bp > 0)[..., None], x, jnp.zeros((), x.dtype))

  def __call__(self, pixel_values_bpk, patch_segment_ids_bp, patch_pos_bp4):
    """Post-LN features (B, P, Dv); rows of padding patches carry no meaning."""
    v = self.cfg
    cos, sin = rope.vision_cos_sin(patch_pos_bp4[..., 0], patch_pos_bp4[..., 1], v.head_dim, v.rope_theta)
    x = self.embed(pixel_values_bpk, patch_segment_ids_bp, patch_pos_bp4)
    x = constrain(x, ("batch", "length", "act_embed"))
    x, _ = self.layers(x, None, cos=cos, sin=sin, segment_ids=patch_segment_ids_bp)
    return self.post_norm(x)
