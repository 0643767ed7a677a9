"""The CPU paths' written-out gradients equal JAX's autodiff of the plain formulas: the matmul
(`layers.rows_matmul`, which also keeps every matmul of its gradient on YNNPACK, XLA CPU's fast matmul
library) and the RMSNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keye_jax.layers import _rms_norm, _rms_norm_cpu, rows_matmul


@pytest.mark.parametrize("x_shape", [(2, 5, 16), (7, 16), (16,)])
def test_gradient_matches_autodiff(x_shape):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=(16, 12)), jnp.float32)
  dy = jnp.asarray(rng.normal(size=x_shape[:-1] + (12,)), jnp.float32)
  ours = jax.vjp(rows_matmul, x, w)
  plain = jax.vjp(jnp.dot, x, w)
  np.testing.assert_allclose(ours[0], plain[0], rtol=1e-6, atol=1e-6)
  for a, b in zip(ours[1](dy), plain[1](dy)):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_mixed_precision_output_keeps_input_dtypes():
  """bf16 operands with fp32 output (the loss's logits): gradients come back in bf16, like autodiff's."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(3, 4, 32)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(32, 8)), jnp.bfloat16)
  y, vjp = jax.vjp(lambda x, w: rows_matmul(x, w, preferred_element_type=jnp.float32), x, w)
  assert y.dtype == jnp.float32
  dx, dw = vjp(jnp.ones_like(y))
  ref = jax.vjp(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32), x, w)[1](jnp.ones_like(y))
  assert dx.dtype == dw.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(ref[0], np.float32), rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(np.asarray(dw, np.float32), np.asarray(ref[1], np.float32), rtol=2e-2, atol=2e-2)


def test_every_gradient_matmul_runs_on_ynnpack():
  """XLA CPU's generic gradient contracts x over its rows (x^T dy), which YNNPACK does not take; a plain
  `dot` left in the compiled module is one that fell back to the slower Eigen path."""
  x = jnp.ones((256, 64), jnp.float32)
  w = jnp.ones((64, 128), jnp.float32)
  grad = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(rows_matmul(x, w))), argnums=(0, 1)))
  hlo = grad.lower(x, w).compile().as_text()
  entry = hlo[hlo.index("\nENTRY"):]
  assert " dot(" not in entry and "__ynn_fusion" in hlo
  plain = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(x @ w)), argnums=(0, 1))).lower(x, w).compile().as_text()
  assert " dot(" in plain[plain.index("\nENTRY"):]  # the check above can see the fallback


@pytest.mark.parametrize("shape,dtype,tol", [((4, 6, 32), jnp.float32, 1e-5), ((2, 3, 4, 16), jnp.float32, 1e-5),
                                             ((5, 32), jnp.bfloat16, 2e-2)])
def test_rms_norm_gradient_matches_autodiff(shape, dtype, tol):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=shape) * 3.0, dtype)
  scale = jnp.asarray(rng.normal(size=shape[-1:]), dtype)
  dy = jnp.asarray(rng.normal(size=shape), jnp.float32)
  ours = jax.vjp(lambda x, s: _rms_norm_cpu(x, s, 1e-6), x, scale)
  plain = jax.vjp(lambda x, s: _rms_norm(x, s, 1e-6)[0], x, scale)  # autodiff of the formula
  np.testing.assert_allclose(ours[0], plain[0], rtol=1e-6, atol=1e-6)
  for a, b in zip(ours[1](dy), plain[1](dy)):
    assert a.shape == b.shape and a.dtype == b.dtype == dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)
