"""The CPU's RoPE with a written-out gradient (the inverse rotation, keye_jax/cpu_ops.py) equals JAX's
autodiff of the plain formula, for the text M-RoPE tables (rows differing per axis) and the vision 2D
tables."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keye_jax import cpu_ops, rope


def _tables(kind, b, s, hd):
  rng = np.random.default_rng(0)
  if kind == "mrope":
    pos = jnp.asarray(rng.integers(0, 500, (3, b, s)), jnp.int32)
    return rope.mrope_cos_sin(pos, hd, 1e6, (hd // 8, hd * 3 // 16, hd * 3 // 16))
  rows, cols = (jnp.asarray(rng.integers(0, 40, (b, s)), jnp.int32) for _ in range(2))
  return rope.vision_cos_sin(rows, cols, hd, 1e4)


@pytest.mark.parametrize("kind", ["mrope", "vision"])
def test_gradient_matches_autodiff(kind):
  b, s, h, hd = 2, 24, 3, 64
  cos, sin = _tables(kind, b, s, hd)
  rng = np.random.default_rng(1)
  x, w = (jnp.asarray(rng.normal(size=(b, s, h, hd)), jnp.float32) for _ in range(2))
  ours = jax.grad(lambda x: jnp.sum(cpu_ops.apply_rope(x, cos, sin) * w))(x)
  autodiff = jax.grad(lambda x: jnp.sum(rope.apply_rope(x, cos, sin) * w))(x)
  np.testing.assert_allclose(ours, autodiff, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(cpu_ops.apply_rope(x, cos, sin), rope.apply_rope(x, cos, sin))
