"""Next-token cross-entropy from hidden states and the lm_head kernel, a chunk of positions at a time, and
the per-token log-probabilities other losses build on (`token_logprobs`).

Full-vocabulary fp32 logits for a whole batch never exist: positions are split into `n` strided chunks
(chunk j holds positions j, j+n, j+2n, ...; strided so that a sequence sharded over the `context` axis
stays sharded inside every chunk), and each chunk's logits are recomputed in the backward pass
(`jax.checkpoint`), so at most one chunk of logits is live. Over a mesh each chunk's logits are split by
vocabulary (see `chunked_token_losses`).

Targets: position t predicts input_ids[t+1] when loss_mask[t+1] and t, t+1 are in the same segment.

`cross_entropy_loss(...)` is the training step's default loss: a function (model, batch) -> (sum of the
weighted token losses, number of target tokens, metrics), see train/step.py for the contract.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from keye_jax import ops
from keye_jax.sharding import constrain


def next_token_targets(batch):
  """(targets (B, S) int32, weights (B, S) float32): what position t predicts and whether it counts."""
  ids, seg, mask = batch["input_ids"], batch["segment_ids"], batch["loss_mask"]
  targets = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
  same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0) & mask[:, 1:].astype(bool)
  weights = jnp.concatenate([same, jnp.zeros_like(same[:, :1])], axis=1).astype(jnp.float32)
  return targets.astype(jnp.int32), weights


def _num_chunks(seq_len: int, chunk: int) -> int:
  """Largest number of chunks n <= seq_len / chunk that divides seq_len (each chunk ~`chunk` positions)."""
  n = max(1, seq_len // max(chunk, 1))
  while seq_len % n:
    n -= 1
  return n


def chunked_token_losses(h_bsd, kernel_dv, targets_bs, *, chunk: int, z_loss: float = 0.0,
                         temperature: float = 1.0):
  """Per-position (cross-entropy + z_loss * logsumexp^2) (B, S) float32 of the logits / temperature,
  logits one chunk at a time."""
  b, s, d = h_bsd.shape
  n = _num_chunks(s, chunk)
  # (B, S, D) -> (n, B, S/n, D): chunk j = positions j, j+n, ...
  hs = h_bsd.reshape(b, s // n, n, d).transpose(2, 0, 1, 3)
  ts = targets_bs.reshape(b, s // n, n).transpose(2, 0, 1)

  # Vocabulary-parallel: the kernel is split on its vocab dim over the axes parameters are split across
  # (a cheap all-to-all of a shard, done once) and each chunk's tokens are gathered over those axes.
  # Every device computes all gathered tokens' logits for its slice of the vocabulary, so no device
  # holds the whole (D, V) kernel or its gradient, which is accumulated in the slice alone.
  kernel_dv = constrain(kernel_dv.astype(h_bsd.dtype), (None, "param_shards"))
  platform = ops.current()

  def one(h, t):
    h = constrain(h, ("batch_replicas", None, None))
    logits = platform.matmul(h, kernel_dv, preferred_element_type=jnp.float32)  # (B, S/n, V)
    if temperature != 1.0:
      logits = logits / temperature
    logits = constrain(logits, ("batch_replicas", None, "param_shards"))
    t = constrain(t, ("batch_replicas", None))
    return constrain(token_cross_entropy(logits, t, z_loss, platform), ("batch", "length"))

  if n == 1:
    # One chunk holds all the logits: recomputing them in the backward would cost a vocabulary-sized
    # matmul and save no memory.
    return one(h_bsd, targets_bs)
  out = jax.lax.map(lambda xs: jax.checkpoint(one)(*xs), (hs, ts))  # (n, B, S/n)
  return out.transpose(1, 2, 0).reshape(b, s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def token_cross_entropy(logits, targets, z_loss: float, platform: ops.Ops):
  """lse - logits[target] + z_loss * lse^2 per position: logits (..., V) fp32, targets (...) int32.

  The gradient is written out, softmax - one-hot, in one pass over the logits; autodiff of logsumexp
  stores exp(logits - max) as a second vocabulary-sized array and reads both again. `platform` (an
  ops.Ops) picks the target logit and subtracts the one-hot: a masked sum, which stays local to each
  vocabulary slice when logits are split by vocabulary, or on the CPU a gather and a scatter."""
  return _xent_fwd(logits, targets, z_loss, platform)[0]


def _xent_fwd(logits, targets, z_loss, platform):
  lse = jax.nn.logsumexp(logits, axis=-1)  # no autodiff here: its stored exponentials are never made
  target_logit = platform.target_logit(logits, targets)
  return lse - target_logit + z_loss * jnp.square(lse), (logits, targets, lse)


def _xent_bwd(z_loss, platform, res, g):
  logits, targets, lse = res
  d = (g * (1.0 + 2.0 * z_loss * lse))[..., None] * jnp.exp(logits - lse[..., None])
  return platform.subtract_at_target(d, targets, g), None


token_cross_entropy.defvjp(_xent_fwd, _xent_bwd)


def token_logprobs(model, batch, *, chunk: int, temperature: float = 1.0):
  """log p(input_ids[t+1] | ..t) at every position t, (B, S) float32, under softmax(logits / temperature).

  The same chunked computation as the loss (never a whole batch of fp32 logits; differentiable, each
  chunk's logits recomputed in the backward pass), so it is exactly minus the loss's cross-entropy. The
  last position has no next token: 0 there. Which positions count is the caller's business (e.g.
  `next_token_targets(batch)[1]`, or a mask of sampled tokens)."""
  h = model.hidden_states(batch)
  targets, _ = next_token_targets(batch)
  out = -chunked_token_losses(h, model.decoder.lm_head_kernel(), targets, chunk=chunk, temperature=temperature)
  return out.at[:, -1].set(0.0)


def source_sums(values_bs, weights_bs, source_ids_bs, num_sources: int):
  """(sum of weighted values per source (K,), sum of weights per source (K,)); the value at position t
  belongs to the source of the token it predicts, source_ids[t+1] (-1: none)."""
  src = jnp.concatenate([source_ids_bs[:, 1:], jnp.full_like(source_ids_bs[:, :1], -1)], axis=1)
  onehot = (src[..., None] == jnp.arange(num_sources)).astype(jnp.float32)  # (B, S, K)
  return jnp.einsum("bs,bsk->k", values_bs * weights_bs, onehot), jnp.einsum("bs,bsk->k", weights_bs, onehot)


def cross_entropy_loss(*, chunk: int, z_loss: float = 0.0, num_sources: int = 1):
  """The default training loss: loss_fn(model, batch) -> (sum of weighted token losses, target tokens,
  metrics {"source_loss_sum" (K,), "source_tokens" (K,), "loss_tokens"}), for `train.step.make_step`."""

  def loss_fn(model, batch):
    h = model.hidden_states(batch)
    targets, weights = next_token_targets(batch)
    losses = chunked_token_losses(h, model.decoder.lm_head_kernel(), targets, chunk=chunk, z_loss=z_loss)
    src = batch.get("source_ids")
    if src is None:
      src = jnp.zeros_like(targets)
    per_source, per_source_count = source_sums(losses, weights, src, num_sources)
    count = weights.sum()
    return (losses * weights).sum(), count, dict(source_loss_sum=per_source, source_tokens=per_source_count,
                                                 loss_tokens=count)

  return loss_fn
