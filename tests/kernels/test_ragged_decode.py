"""The Pallas ragged decode-attention kernel in interpret mode against the XLA reference
(`kernels.decode.xla_cache_attention`) and jax.nn.dot_product_attention.

Rows cover: lengths not multiples of the block, an empty row (length 0), a left-padding hole (segment 0
at the start of a row), a full row (length == T), R = 2 and R = 8 query rows per KV head. Tolerances
(inputs ~ N(0, 1)): fp32 max |diff| <= 1e-5 (out and lse); bf16 caches against the fp32 reference of the
same bf16 numbers at <= 5e-3 on out (probabilities rounded to bf16 before the second matmul), 1e-4 on lse.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import decode
from kernels.ragged_decode import kv_block_index, ragged_decode_attention

T, BLOCK, D = 512, 128, 64
LENGTHS = [300, 0, T, 77, 129, 5]   # partial blocks, empty, full, a block edge + 1


def _case(r, dtype, hkv=2, seed=0):
  rng = np.random.default_rng(seed)
  b = len(LENGTHS)
  q = jnp.asarray(rng.normal(size=(b, hkv, r, D)), dtype)
  k = jnp.asarray(rng.normal(size=(b, hkv, T, D)), dtype)
  v = jnp.asarray(rng.normal(size=(b, hkv, T, D)), dtype)
  seg = np.ones((b, T), np.int32)
  seg[0, :40] = 0          # left padding
  seg[3, 10:20] = 0        # a hole inside the filled part
  seg[5, :] = 0            # slots before the length, all empty: no valid key
  return q, k, v, jnp.asarray(seg), jnp.asarray(LENGTHS, jnp.int32)


def _run(q, k, v, seg, lengths, **kw):
  return ragged_decode_attention(q, k, v, seg, lengths, scale=D ** -0.5, interpret=True, **kw)


def _reference(q, k, v, seg, lengths):
  f32 = lambda x: x.astype(jnp.float32)
  return decode.xla_cache_attention(f32(q), f32(k), f32(v), seg, lengths, scale=D ** -0.5)


@pytest.mark.parametrize("r,dtype,out_tol,lse_tol", [
    (2, jnp.float32, 1e-5, 1e-5), (8, jnp.float32, 1e-5, 1e-5), (8, jnp.bfloat16, 5e-3, 1e-4)])
def test_matches_xla_reference(r, dtype, out_tol, lse_tol):
  case = _case(r, dtype)
  out, lse = _run(*case, block_kv=BLOCK)
  ref_out, ref_lse = _reference(*case)
  assert out.dtype == lse.dtype == jnp.float32
  assert out.shape == case[0].shape and lse.shape == case[0].shape[:3]
  err_out, err_lse = float(jnp.max(jnp.abs(out - ref_out))), float(jnp.max(jnp.abs(lse - ref_lse)))
  print(f"R={r} {jnp.dtype(dtype).name}: max |out - ref| {err_out:.2e}, max |lse - ref| {err_lse:.2e}")
  assert err_out <= out_tol and err_lse <= lse_tol
  for empty in (1, 5):     # length 0; all slots before the length empty
    assert np.all(np.asarray(out[empty]) == 0) and np.all(np.asarray(lse[empty]) == decode.NO_KEYS)


def test_matches_jax_nn_attention():
  """Out against jax.nn.dot_product_attention (GQA: the R rows of KV head h are query heads h*R..h*R+R-1)."""
  q, k, v, seg, lengths = _case(4, jnp.float32, seed=1)
  out, _ = _run(q, k, v, seg, lengths)   # default block (512 = T: one block per row)
  b, hkv, r, _ = q.shape
  mask = decode.valid_slots(seg, lengths, T)[:, None, None, :]          # (B, 1, 1, T)
  ref = jax.nn.dot_product_attention(q.reshape(b, 1, hkv * r, D), k.transpose(0, 2, 1, 3),
                                     v.transpose(0, 2, 1, 3), mask=mask, scale=D ** -0.5, implementation="xla")
  has_keys = np.asarray(mask.any(axis=-1))[:, 0, 0]
  err = float(jnp.max(jnp.abs(out.reshape(b, 1, hkv * r, D) - ref)[has_keys]))
  print(f"max |out - jax.nn| {err:.2e}")
  assert err <= 1e-5


def test_dispatch_pallas():
  case = _case(2, jnp.float32, seed=2)
  out, lse = decode.cache_attention(*case, scale=D ** -0.5, impl="pallas", interpret=True)
  ref_out, ref_lse = _reference(*case)
  np.testing.assert_allclose(out, ref_out, atol=1e-5)
  np.testing.assert_allclose(lse, ref_lse, atol=1e-5)


def test_t_not_a_block_multiple_falls_back_to_xla():
  q, k, v, seg, lengths = _case(2, jnp.float32, seed=3)
  k, v, seg = k[:, :, :200], v[:, :, :200], seg[:, :200]
  lengths = jnp.minimum(lengths, 200)
  out, lse = _run(q, k, v, seg, lengths)
  ref_out, ref_lse = _reference(q, k, v, seg, lengths)
  np.testing.assert_allclose(out, ref_out, atol=1e-6)
  np.testing.assert_allclose(lse, ref_lse, atol=1e-6)


def test_slots_past_length_are_never_used():
  """NaN and inf in every slot at/after the row's length (the partial last block is read but masked,
  the blocks past it are not fetched): the result is finite and equal to the clean cache's."""
  q, k, v, seg, lengths = _case(8, jnp.float32, seed=4)
  past = (jnp.arange(T)[None, :] >= lengths[:, None])[:, None, :, None]
  dirty = lambda x, bad: jnp.where(past, bad, x)
  out, lse = _run(q, k, v, seg, lengths, block_kv=BLOCK)
  out_d, lse_d = _run(q, dirty(k, jnp.nan), dirty(v, jnp.inf), seg, lengths, block_kv=BLOCK)
  assert np.isfinite(np.asarray(out_d)).all() and np.isfinite(np.asarray(lse_d)).all()
  np.testing.assert_array_equal(out_d, out)
  np.testing.assert_array_equal(lse_d, lse)


def test_index_map_fetches_only_blocks_before_the_length():
  """The k/v/segment block index over the grid: each row fetches exactly its ceil(length / block) blocks
  (one for an empty row), then repeats the last index (no copy) up to the end of the grid."""
  nk = T // BLOCK
  for length in (0, 1, 127, 128, 129, 300, T, T + 50):
    idx = [int(kv_block_index(i, jnp.int32(length), BLOCK, nk)) for i in range(nk)]
    needed = min(max(-(-length // BLOCK), 1), nk)
    assert idx == list(range(needed)) + [needed - 1] * (nk - needed), (length, idx)
