"""The Qwen3 decoder against transformers' Qwen3ForCausalLM (same random weights, fp32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from keye_jax import rope
from keye_jax.config import KeyeConfig
from keye_jax.decoder import Decoder
from keye_jax.model import KeyeVL
from keye_jax.params import get_flat, set_flat
from tests.model.hf_reference import hf_qwen3, hf_state_to_flat, tiny_text_config


def _ours(t, scan=True, **kw):
  cfg = KeyeConfig(text=t, vision=None, scan_layers=scan, attention_impl="xla", **kw)
  model = KeyeVL(cfg, rngs=nnx.Rngs(0))
  return cfg, model


@pytest.fixture(scope="module")
def ref():
  t = tiny_text_config()
  hf = hf_qwen3(t)
  return t, hf


def test_logits_match_transformers_with_padding(ref):
  t, hf = ref
  cfg, model = _ours(t)
  set_flat(model, hf_state_to_flat(hf.state_dict(), cfg))
  rng = np.random.default_rng(0)
  ids = rng.integers(0, t.vocab_size, (3, 12))
  mask = np.ones((3, 12), np.int64)
  mask[1, 9:] = 0   # right padding
  mask[2, 5:] = 0
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  pos = np.broadcast_to(np.arange(12), (3, 3, 12))
  got = np.asarray(model.decoder(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask, jnp.int32)))
  valid = mask.astype(bool)
  err = np.abs(got[valid] - want[valid]).max()
  assert err <= 1e-4, err


def test_mrope_rows_differ_matches_spec_formula(ref):
  """3D positions whose rows differ, against an independent numpy version of the spec's formula."""
  t, hf = ref
  rng = np.random.default_rng(1)
  pos = rng.integers(0, 50, (3, 2, 7))
  cos, sin = rope.mrope_cos_sin(jnp.asarray(pos), t.head_dim, t.rope_theta, t.mrope_section)
  hd = t.head_dim
  inv = t.rope_theta ** (-np.arange(0, hd, 2) / hd)
  s0, s1, _ = t.mrope_section
  want = np.zeros((2, 7, hd // 2))
  for j in range(hd // 2):
    axis = 0 if j < s0 else (1 if j < s0 + s1 else 2)
    want[..., j] = pos[axis] * inv[j]
  want = np.concatenate([want, want], -1)
  np.testing.assert_allclose(np.asarray(cos), np.cos(want), atol=1e-5)
  np.testing.assert_allclose(np.asarray(sin), np.sin(want), atol=1e-5)
  # Equal rows reduce to ordinary RoPE: the model matches transformers with plain positions shifted by 5.
  cfg, model = _ours(t)
  set_flat(model, hf_state_to_flat(hf.state_dict(), cfg))
  ids = rng.integers(0, t.vocab_size, (1, 9))
  p1 = np.arange(9)[None] + 5
  with torch.no_grad():
    want_logits = hf(input_ids=torch.tensor(ids), position_ids=torch.tensor(p1)).logits.numpy()
  got = model.decoder(jnp.asarray(ids), jnp.asarray(np.broadcast_to(p1, (3, 1, 9))))
  assert np.abs(np.asarray(got) - want_logits).max() <= 1e-4


@pytest.mark.slow   # a layout parity sweep; ~7 s idle
def test_scanned_and_unscanned_layouts_agree(ref):
  t, hf = ref
  cfg, scanned = _ours(t, scan=True)
  _, unscanned = _ours(t, scan=False)
  flat = hf_state_to_flat(hf.state_dict(), cfg)
  set_flat(scanned, flat)
  set_flat(unscanned, get_flat(scanned))
  ids = jnp.asarray(np.random.default_rng(2).integers(0, t.vocab_size, (2, 10)))
  # Same numbers; XLA fuses the scanned body differently, so allow fp32 rounding.
  np.testing.assert_allclose(np.asarray(scanned.decoder(ids)), np.asarray(unscanned.decoder(ids)), atol=1e-6)


@pytest.mark.parametrize("remat", ["full", pytest.param("dots", marks=pytest.mark.slow)])
def test_remat_gives_same_gradients(ref, remat):
  t, _ = ref
  _, plain = _ours(t)
  _, rem = _ours(t, remat=remat)
  ids = jnp.asarray(np.random.default_rng(3).integers(0, t.vocab_size, (2, 8)))

  def loss(m):
    return jnp.mean(m.decoder(ids) ** 2)

  g1 = nnx.grad(loss)(plain)
  g2 = nnx.grad(loss)(rem)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_decode_with_cache_reproduces_full_logits(ref):
  t, hf = ref
  cfg, model = _ours(t)
  set_flat(model, hf_state_to_flat(hf.state_dict(), cfg))
  dec = model.decoder
  rng = np.random.default_rng(4)
  b, s, extra = 2, 6, 5
  ids = rng.integers(0, t.vocab_size, (b, s + extra))
  full = np.asarray(dec(jnp.asarray(ids)))
  pos = jnp.broadcast_to(jnp.arange(s + extra, dtype=jnp.int32), (3, b, s + extra))
  cache = dec.init_cache(b, 16)
  h, cache = dec.prefill(dec.embed(jnp.asarray(ids[:, :s])), pos[:, :, :s], jnp.ones((b, s), jnp.int32), cache)
  np.testing.assert_allclose(np.asarray(dec.logits(h)), full[:, :s], atol=1e-4)
  for j in range(s, s + extra):
    h, cache = dec.decode(dec.embed(jnp.asarray(ids[:, j:j + 1])), pos[:, :, j:j + 1], cache)
    np.testing.assert_allclose(np.asarray(dec.logits(h))[:, 0], full[:, j], atol=1e-4)


def test_bf16_compute_close_to_fp32(ref):
  t, hf = ref
  cfg, m32 = _ours(t)
  _, m16 = _ours(t, dtype="bfloat16")
  flat = hf_state_to_flat(hf.state_dict(), cfg)
  set_flat(m32, flat)
  set_flat(m16, flat)
  ids = jnp.asarray(np.random.default_rng(5).integers(0, t.vocab_size, (2, 8)))
  a, b = np.asarray(m32.decoder(ids)), np.asarray(m16.decoder(ids).astype(jnp.float32))
  assert np.abs(a - b).max() < 0.05 * np.abs(a).max()


def test_sharded_matches_single_device():
  """fsdp=8 and data=2,fsdp=2,tensor=2 on 8 virtual CPU devices (a subprocess: the device count is fixed
  when jax starts)."""
  import subprocess
  import sys
  r = subprocess.run([sys.executable, "-m", "tests.model.sharded_forward"], capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stdout + r.stderr[-3000:]
