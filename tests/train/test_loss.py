"""The chunked loss equals cross-entropy over full logits, with the documented target rule; token_logprobs
equals a plain log_softmax of the full logits."""

import jax
import jax.numpy as jnp
import numpy as np

import pytest

from flax import nnx

from keye_jax import ops
from keye_jax.config import KeyeConfig, from_dict
from keye_jax.model import KeyeVL
from tests.train.helpers import TEXT_MODEL
from train.losses.cross_entropy import (chunked_token_losses, cross_entropy_loss, next_token_targets,
                                        token_cross_entropy, token_logprobs)


def test_targets_follow_mask_and_segments():
  batch = dict(input_ids=jnp.array([[1, 2, 3, 4, 5, 6]]), segment_ids=jnp.array([[1, 1, 1, 2, 2, 0]]),
               loss_mask=jnp.array([[0, 1, 1, 1, 1, 1]], bool))
  targets, w = next_token_targets(batch)
  np.testing.assert_array_equal(targets[0, :5], [2, 3, 4, 5, 6])
  # 0->1 and 1->2 count; 2->3 crosses segments; 3->4 counts; 4->5 predicts padding.
  np.testing.assert_array_equal(w[0], [1, 1, 0, 1, 0, 0])


def test_chunked_equals_full_logits_with_z_loss_and_grads():
  rng = np.random.default_rng(0)
  b, s, d, v = 2, 24, 16, 50
  h = jnp.asarray(rng.standard_normal((b, s, d)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((d, v)) * 0.3, jnp.float32)
  t = jnp.asarray(rng.integers(0, v, (b, s)), jnp.int32)

  def full(h, k):
    logits = h @ k
    lse = jax.nn.logsumexp(logits, -1)
    return lse - jnp.take_along_axis(logits, t[..., None], -1)[..., 0] + 1e-3 * lse ** 2

  for chunk in (1, 5, 8, 24):  # 5 does not divide 24: the nearest divisor is used
    got = chunked_token_losses(h, k, t, chunk=chunk, z_loss=1e-3)
    np.testing.assert_allclose(got, full(h, k), rtol=1e-5, atol=1e-5)
  g_full = jax.grad(lambda h, k: full(h, k).sum(), argnums=(0, 1))(h, k)
  g_chunk = jax.grad(lambda h, k: chunked_token_losses(h, k, t, chunk=8, z_loss=1e-3).sum(), argnums=(0, 1))(h, k)
  for a, b_ in zip(g_full, g_chunk):
    np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gather", [True, False])
def test_cross_entropy_gradient_matches_autodiff(gather):
  """Both ways of picking the target (gather on one device, masked sum for vocabulary-split logits)
  give autodiff's values and gradients, with a per-position cotangent and a z-loss."""
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.standard_normal((3, 7, 40)) * 4.0, jnp.float32)
  t = jnp.asarray(rng.integers(0, 40, (3, 7)), jnp.int32)
  g = jnp.asarray(rng.standard_normal((3, 7)), jnp.float32)

  def plain(logits):
    lse = jax.nn.logsumexp(logits, -1)
    return lse - jnp.take_along_axis(logits, t[..., None], -1)[..., 0] + 1e-2 * lse ** 2

  platform = ops.for_platform("cpu" if gather else "tpu")
  ours, vjp = jax.vjp(lambda x: token_cross_entropy(x, t, 1e-2, platform), logits)
  ref, ref_vjp = jax.vjp(plain, logits)
  np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(vjp(g)[0], ref_vjp(g)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_equal_full_logits_log_softmax(temperature):
  """log p(input_ids[t+1]) at position t from the chunked path equals jax.nn.log_softmax of the model's
  full logits / temperature, gathered at the next token; at temperature 1 it is minus the loss's terms."""
  model = KeyeVL(from_dict(KeyeConfig, TEXT_MODEL), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(4)
  b, s = 2, 32
  ids = jnp.asarray(rng.integers(0, 256, (b, s)), jnp.int32)
  batch = dict(input_ids=ids, segment_ids=jnp.ones((b, s), jnp.int32), loss_mask=jnp.ones((b, s), bool),
               position_ids=jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (3, b, s)))
  got = token_logprobs(model, batch, chunk=8, temperature=temperature)
  assert got.shape == (b, s) and got.dtype == jnp.float32
  logp = jax.nn.log_softmax(model(batch).astype(jnp.float32) / temperature, axis=-1)
  want = jnp.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
  np.testing.assert_allclose(got[:, :-1], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got[:, -1], 0.0)
  if temperature == 1.0:
    total, count, metrics = cross_entropy_loss(chunk=8)(model, batch)
    _, w = next_token_targets(batch)
    np.testing.assert_allclose(total, -(got * w).sum(), rtol=1e-6)
    assert float(count) == float(w.sum()) == float(metrics["source_tokens"][0])
