"""The few operations whose fastest form depends on the platform, and the one place that picks it.

  matmul(x (..., K), w (K, N), preferred_element_type=None) -> (..., N)
  rms_norm(x (..., D), scale (D,), eps) -> (..., D) float32
  apply_rope(x (B, S, H, hd), cos, sin (B, S, hd)) -> x's dtype
  attention(q, k, v, **kw)          kernels.attention's signature
  cache_attention(q, k, v, segment_ids, lengths, **kw)   kernels.decode.cache_attention's (decoding)
  target_logit(logits (..., V) fp32, targets (...) int32) -> (...), and
  subtract_at_target(d (..., V), targets, g (...)) -> d - g * one_hot(targets)   (the cross-entropy's)
  compiler_options                  for jax.jit of the training step

`PLAIN` is the maths as written, differentiated by JAX (TPU and GPU run it, and it is the reference the
fast paths are tested against). `for_platform("cpu")` is XLA CPU's set (keye_jax/cpu_ops.py: gradients
written so every matmul runs on YNNPACK, fewer passes over memory). `current()` is the set for the
platform being compiled for, `kernels.compile_platform()` (the mesh in context: an ahead-of-time compile
for a TPU topology on a CPU host gets the plain set); the layers, RoPE and the loss call it, and nothing
else looks at the platform.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

import kernels
from kernels import decode
from keye_jax import rope


def rms_norm_parts(x, scale, eps):
  """(scale * x / sqrt(mean(x^2) + eps) in fp32, the reciprocal root (..., 1)): the one RMSNorm formula."""
  x32 = x.astype(jnp.float32)
  r = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return x32 * r * scale.astype(jnp.float32), r


def _rms_norm(x, scale, eps):
  return rms_norm_parts(x, scale, eps)[0]


def _target_logit(logits, targets):
  # A masked sum stays local to each vocabulary slice when logits are split by vocabulary.
  return jnp.sum(jnp.where(_is_target(logits, targets), logits, 0.0), axis=-1)


def _subtract_at_target(d, targets, g):
  return d - jnp.where(_is_target(d, targets), g[..., None], 0.0)


def _is_target(logits, targets):
  return jnp.arange(logits.shape[-1], dtype=jnp.int32) == targets[..., None]


@dataclasses.dataclass(frozen=True)
class Ops:
  """One platform's forms of the operations above (hashable: the loss passes it to a custom_vjp)."""

  platform: str
  matmul: Callable
  rms_norm: Callable
  apply_rope: Callable
  attention: Callable
  cache_attention: Callable
  target_logit: Callable
  subtract_at_target: Callable
  compiler_options: dict | None = dataclasses.field(default=None, compare=False)


PLAIN = Ops("plain", matmul=jnp.dot, rms_norm=_rms_norm, apply_rope=rope.apply_rope, attention=kernels.attention,
            cache_attention=decode.cache_attention, target_logit=_target_logit, subtract_at_target=_subtract_at_target)


def for_platform(platform: str) -> Ops:
  """XLA CPU's fast paths on "cpu", the plain maths elsewhere."""
  if platform == "cpu":
    from keye_jax import cpu_ops
    return cpu_ops.CPU
  return PLAIN


def current() -> Ops:
  """The set for the platform being compiled for (call it while tracing)."""
  return for_platform(kernels.compile_platform())
