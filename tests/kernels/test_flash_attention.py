"""Pallas segment flash attention in interpret mode against the XLA reference and jax.nn.dot_product_attention.

Tolerances (inputs ~ N(0, 1)): fp32 max |diff| <= 2e-5 on outputs and 1e-4 on gradients (CPU fp32 is
exact up to summation order); bf16 is compared with the fp32 reference of the same bf16 inputs at
max |diff| <= 3e-2 x max |reference| (probabilities are rounded to bf16 before the second matmul).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import splash
from kernels.block_tables import default_positions, visit_mask
from tests.kernels import segment_layouts

S, BLOCK = 256, 64  # 4 x 4 blocks per row: small enough for interpret mode, big enough to skip


def _inputs(b, s, hq, hkv, d, dtype, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(b, s, hq, d)), dtype)
  k = jnp.asarray(rng.normal(size=(b, s, hkv, d)), dtype)
  v = jnp.asarray(rng.normal(size=(b, s, hkv, d)), dtype)
  w = jnp.asarray(rng.normal(size=(b, s, hq, d)), jnp.float32)
  return q, k, v, w


def _jax_nn(q, k, v, seg, causal, scale):
  """jax.nn.dot_product_attention with our mask; padding rows are zeroed (it averages them)."""
  mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
  if causal:
    mask = mask & jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))[None]
  out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale, implementation="xla")
  return jnp.where((seg != 0)[:, :, None, None], out, 0)


def _loss_and_grads(fn, q, k, v, w):
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)
  return fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _pallas(seg, causal, scale=None):
  return lambda q, k, v: kernels.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=causal,
                                           impl="pallas", scale=scale, block_q=BLOCK, block_kv=BLOCK)


def _xla(seg, causal, scale=None):
  return lambda q, k, v: kernels.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=causal,
                                           impl="xla", scale=scale)


def _max_diff(a, b):
  return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


LAYOUT_PAIRS = [("many_short", "padding_at_end"), ("one_long", "single_tokens"),
                ("crossing_block_edges", "many_short")]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("layouts", LAYOUT_PAIRS, ids=["+".join(p) for p in LAYOUT_PAIRS])
def test_fp32_vision_head_dim_gqa_matches_references(layouts, causal):
  seg = jnp.asarray(np.stack([segment_layouts.LAYOUTS[name](S, BLOCK) for name in layouts]))
  q, k, v, w = _inputs(2, S, 4, 2, 72, jnp.float32)
  w = jnp.where((seg != 0)[:, :, None, None], w, 0)  # jax.nn differs on padding rows; no cotangent there
  out, grads = _loss_and_grads(_pallas(seg, causal, scale=0.11), q, k, v, w)
  ref_out, ref_grads = _loss_and_grads(_xla(seg, causal, scale=0.11), q, k, v, w)
  nn_out, nn_grads = _loss_and_grads(lambda q, k, v: _jax_nn(q, k, v, seg, causal, 0.11), q, k, v, w)
  assert _max_diff(out, ref_out) <= 2e-5
  assert _max_diff(out, nn_out) <= 2e-5
  assert float(jnp.abs(jnp.where((seg == 0)[:, :, None, None], out, 0)).max()) == 0.0  # padding -> 0
  for g, rg, ng in zip(grads, ref_grads, nn_grads):
    assert _max_diff(g, rg) <= 1e-4
    assert _max_diff(g, ng) <= 1e-4


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_bf16_text_head_dim_gqa4_matches_fp32_reference(causal):
  seg = jnp.asarray(np.stack([segment_layouts.many_short(S, seed=3),
                              segment_layouts.crossing_block_edges(S, BLOCK)]))
  q, k, v, w = _inputs(2, S, 4, 1, 128, jnp.bfloat16, seed=1)
  out, grads = _loss_and_grads(_pallas(seg, causal), q, k, v, w)
  f32 = lambda x: x.astype(jnp.float32)
  ref_out, ref_grads = _loss_and_grads(_xla(seg, causal), f32(q), f32(k), f32(v), w)
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  for got, ref in zip((out, *grads), (ref_out, *ref_grads)):
    assert _max_diff(got, ref) <= 3e-2 * float(jnp.abs(ref).max())


def test_no_segment_ids_is_plain_attention():
  q, k, v, _ = _inputs(1, S, 2, 2, 128, jnp.float32, seed=2)
  out = kernels.attention(q, k, v, causal=True, impl="pallas", block_q=BLOCK, block_kv=BLOCK)
  ref = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  assert _max_diff(out, ref) <= 2e-5


def test_kv_cache_decoding_on_the_pallas_path():
  """Sq = 1 against a cache with valid slots marked. On TPU a 1-row query block is not tileable, so
  the pallas impl falls back to XLA there; in interpret mode the kernel itself runs with block_q = 1."""
  assert kernels.pallas_blocks(1, 4096, 512, 512, strict=True) is None
  assert kernels.pallas_blocks(8192, 8192, 512, 512, strict=True) == (512, 512)
  q, k, v, _ = _inputs(2, 128, 4, 2, 128, jnp.float32, seed=4)
  q = q[:, :1]
  valid = jnp.asarray((np.arange(128)[None] < np.array([[37], [128]])).astype(np.int32))
  q_seg = jnp.ones((2, 1), jnp.int32)
  got = kernels.attention(q, k, v, q_segment_ids=q_seg, kv_segment_ids=valid, causal=False, impl="pallas")
  ref = jax.nn.dot_product_attention(q, k, v, mask=(valid != 0)[:, None, None, :], implementation="xla")
  assert _max_diff(got, ref) <= 2e-5


def test_splash_baseline_matches_reference():
  seg = jnp.asarray(np.stack([segment_layouts.padding_at_end(S)]))
  q, k, v, _ = _inputs(1, S, 2, 1, 72, jnp.float32, seed=5)
  got = splash.splash_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True, block_q=128,
                                block_kv=128, interpret=True)
  ref = kernels.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True, impl="xla")
  assert _max_diff(got, ref) <= 1e-4


def _brute_force_visits(seg, causal, block):
  b, s = seg.shape
  m = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
  if causal:
    m = m & np.tril(np.ones((s, s), bool))[None]
  return m.reshape(b, s // block, block, s // block, block).any(axis=(2, 4))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_block_tables_visit_exactly_the_blocks_with_visible_pairs(causal):
  seg = np.stack([segment_layouts.LAYOUTS[name](1024, BLOCK) for name in segment_layouts.LAYOUTS])
  pos = default_positions(*seg.shape)
  got = np.asarray(visit_mask(jnp.asarray(seg), jnp.asarray(seg), pos, pos, causal=causal,
                              block_q=BLOCK, block_kv=BLOCK))
  np.testing.assert_array_equal(got, _brute_force_visits(seg, causal, BLOCK))
  # Packed data skips most of the square: e.g. many short segments visit only near-diagonal blocks.
  assert got[0].mean() < 0.2


def test_block_tables_are_conservative_for_unordered_ids():
  rng = np.random.default_rng(0)
  seg = rng.integers(0, 6, size=(3, 512)).astype(np.int32)
  pos = default_positions(*seg.shape)
  got = np.asarray(visit_mask(jnp.asarray(seg), jnp.asarray(seg), pos, pos, causal=True, block_q=BLOCK,
                              block_kv=BLOCK))
  assert np.all(got | ~_brute_force_visits(seg, True, BLOCK))
