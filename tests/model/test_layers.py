"""The CPU paths' written-out gradients equal JAX's autodiff of the plain formulas: the matmul
(`cpu_ops.rows_matmul`, which also keeps every matmul of its gradient on YNNPACK, XLA CPU's fast matmul
library) and the RMSNorm; and the platform's set is chosen in one place (keye_jax/ops.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keye_jax import ops
from keye_jax.cpu_ops import rms_norm as _rms_norm_cpu, rows_matmul
from keye_jax.ops import rms_norm_parts as _rms_norm


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


def test_platform_set_is_chosen_by_the_compile_platform(monkeypatch):
  """XLA CPU's set on the CPU, the plain maths for anything else (an AOT compile for a TPU topology from
  a CPU host, where kernels.compile_platform() reads the TPU mesh in context)."""
  import kernels
  from keye_jax import cpu_ops
  assert ops.for_platform("cpu") is cpu_ops.CPU and ops.for_platform("tpu") is ops.PLAIN
  assert ops.current() is cpu_ops.CPU  # the tests run on the CPU
  monkeypatch.setattr(kernels, "compile_platform", lambda: "tpu")
  assert ops.current() is ops.PLAIN


@pytest.mark.parametrize("causal,sq", [(True, 256), pytest.param(True, 40, marks=pytest.mark.slow), (False, 48)])
def test_cpu_attention_matches_reference_autodiff(causal, sq):
  """The CPU attention (written-out VJP; causal 256..block_q queries split in halves) gives the plain
  reference's outputs and autodiff gradients, with packed segments, padding and grouped-query heads."""
  from kernels.reference import xla_attention
  from keye_jax import cpu_ops
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.normal(size=(2, sq, 4, 16)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, sq, 2, 16)), jnp.float32) for _ in range(2))
  seg = np.ones((2, sq), np.int32)
  seg[0, sq // 3:] = 2
  seg[1, -7:] = 0  # padding
  seg = jnp.asarray(seg)
  dout = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  kw = dict(q_segment_ids=seg, kv_segment_ids=seg, causal=causal)
  ours = jax.vjp(lambda q, k, v: cpu_ops.xla_attention(q, k, v, **kw), q, k, v)
  plain = jax.vjp(lambda q, k, v: xla_attention(q, k, v, **kw), q, k, v)
  np.testing.assert_allclose(ours[0], plain[0], rtol=1e-5, atol=1e-5)
  for a, b in zip(ours[1](dout), plain[1](dout)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(cpu_ops.attention(q, k, v, impl="xla", **kw), ours[0])


@pytest.mark.parametrize("r", [pytest.param(2, marks=pytest.mark.slow), 8])
def test_cpu_cache_attention_matches_reference(r):
  """XLA CPU's multiply-reduce decode attention equals the plain einsum form (kernels.decode), with
  left-padding holes, per-row lengths and an empty row; the merge with the new token's own key equals
  one softmax over cache + new key."""
  from keye_jax import cpu_ops
  from kernels import decode
  rng = np.random.default_rng(0)
  b, h, t, d = 4, 2, 48, 16
  q = jnp.asarray(rng.standard_normal((b, h, r, d)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((b, h, t, d)), jnp.float32) for _ in range(2))
  seg = np.ones((b, t), np.int32)
  seg[1, :7] = 0                                                   # left padding
  lengths = jnp.asarray([48, 30, 0, 5], jnp.int32)                 # row 2 holds nothing yet
  seg = jnp.asarray(seg)
  want = decode.xla_cache_attention(q, k, v, seg, lengths, scale=0.25)
  got = cpu_ops.cache_attention(q, k, v, seg, lengths, scale=0.25)
  for a, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=1e-5, atol=1e-5)
  assert float(got[1][2].max()) == np.float32(decode.NO_KEYS) and not np.asarray(got[0][2]).any()
  # Merged with one new key per row: one softmax over the valid cache slots and the new key.
  k_new, v_new = (jnp.asarray(rng.standard_normal((b, h, 1, d)), jnp.float32) for _ in range(2))
  s_new = jnp.einsum("bhrd,bhsd->bhrs", q, k_new) * 0.25
  out = decode.merge_new_tokens(*got, s_new, v_new)
  valid = np.asarray(decode.valid_slots(seg, lengths, t))
  for row in range(b):
    keys = np.concatenate([np.asarray(k[row])[:, valid[row]], np.asarray(k_new[row])], axis=1)
    vals = np.concatenate([np.asarray(v[row])[:, valid[row]], np.asarray(v_new[row])], axis=1)
    p = jax.nn.softmax(jnp.einsum("hrd,htd->hrt", q[row], keys) * 0.25, axis=-1)
    np.testing.assert_allclose(np.asarray(out[row]), np.asarray(jnp.einsum("hrt,htd->hrd", p, vals)),
                               rtol=1e-5, atol=1e-5)
