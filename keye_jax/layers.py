"""Small parameter-holding building blocks with logical axis names on every parameter.

Each `nnx.Param` carries `logical_axes` (one name per dimension); `keye_jax.sharding` maps the names
to mesh axes. Parameters live in `param_dtype`; matmuls run in the compute `dtype`. The matmul and the
RMSNorm are the platform's (keye_jax/ops.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from keye_jax import ops
from keye_jax.sharding import embedding_lookup

_init = jax.nn.initializers.normal(stddev=0.02)


class Dense(nnx.Module):
  """y = x @ kernel (+ bias). kernel (in, out), stored like HF's weight transposed."""

  def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], *, bias: bool, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    self.kernel = nnx.Param(_init(rngs.params(), (d_in, d_out), param_dtype), logical_axes=axes)
    self.bias = nnx.Param(jnp.zeros((d_out,), param_dtype), logical_axes=axes[1:]) if bias else None
    self.dtype = dtype

  def __call__(self, x):
    y = ops.current().matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Embed(nnx.Module):
  """Token embedding table (vocab, dim)."""

  def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    self.embedding = nnx.Param(_init(rngs.params(), (vocab, dim), param_dtype), logical_axes=("vocab", "embed"))
    self.dtype = dtype

  def __call__(self, ids):
    return embedding_lookup(self.embedding[...], ids, self.dtype)


class RMSNorm(nnx.Module):
  """w * x / sqrt(mean(x^2) + eps), statistics in fp32 (as Qwen3)."""

  def __init__(self, dim: int, eps: float, *, dtype=jnp.float32, param_dtype=jnp.float32):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x):
    return ops.current().rms_norm(x, self.scale[...], self.eps).astype(self.dtype)


class LayerNorm(nnx.Module):
  """Affine LayerNorm with statistics in fp32 (SigLIP and the projector)."""

  def __init__(self, dim: int, eps: float, *, dtype=jnp.float32, param_dtype=jnp.float32):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=("norm",))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)
