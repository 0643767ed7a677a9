"""The policy update's pieces on the device: the GSPO loss as a `make_step` loss_fn, the trainer's
log-probs of the sampled tokens, and the frozen reference's log-probs (once per rollout batch).

Log-probs here sit on the token itself, like the batch's per-token fields (train/rl/batch.py):
lp[t] = log p(input_ids[t] | input_ids[<t]) of the same segment; the loss reads them on response tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from keye_jax import batch_layout

from train.losses.cross_entropy import token_logprobs
from train.model_state import batch_shardings
from train.rl.loss import policy_loss


def aligned_logprobs(model, batch, *, chunk: int, temperature: float = 1.0):
  """(B, S) float32 log-prob of each token given the tokens before it (0 at position 0), under
  softmax(logits / temperature): the policy RL trains is the one it samples from (as in TRL and verl)."""
  lp = token_logprobs(model, batch, chunk=chunk, temperature=temperature)  # position t: log p(input_ids[t+1])
  return jnp.concatenate([jnp.zeros_like(lp[:, :1]), lp[:, :-1]], axis=1)


def rl_loss_fn(rl_cfg, chunk: int):
  """loss_fn(model, batch) -> (sum over responses of their loss, number of responses, metric sums)."""
  eps_low, eps_high = rl_cfg.eps
  kl_coef = rl_cfg.kl_coef

  def loss_fn(model, batch):
    lp = aligned_logprobs(model, batch, chunk=chunk, temperature=rl_cfg.temperature)
    loss, m = policy_loss(lp, batch["old_logprobs"], batch["advantages"], batch["loss_mask"],
                          segment_ids=batch["segment_ids"], variant=rl_cfg.variant, eps_low=eps_low,
                          eps_high=eps_high, ref_logprobs=batch.get("ref_logprobs"), kl_coef=kl_coef)
    n = m["responses"]
    mask = batch["loss_mask"].astype(jnp.float32)
    # Sums, so that microbatches add up; the host divides by `responses` (or by `response_tokens`).
    metrics = {"responses": n, "response_tokens": mask.sum(), "clip_sum": m["clip_fraction"] * n,
               "clip_low_sum": m["clip_fraction_low"] * n, "clip_high_sum": m["clip_fraction_high"] * n,
               "ratio_sum": m["ratio_mean"] * n,
               "log_ratio_token_sum": jax.lax.stop_gradient(jnp.sum((lp - batch["old_logprobs"]) * mask))}
    if "kl" in m:
      metrics["kl_sum"] = m["kl"] * n
    return loss * n, n, metrics

  return loss_fn


def make_ref_logprobs(shape, mesh, batch_keys, chunk: int, temperature: float = 1.0):
  """Jitted (params, batch) -> (B, S) aligned log-probs at `temperature`, for the frozen reference policy."""
  from train.model_state import ModelShape  # noqa: F401 (shape is a ModelShape)
  sh = batch_shardings(batch_keys, mesh)
  fn = jax.jit(lambda params, batch: aligned_logprobs(shape.build(params), batch, chunk=chunk,
                                                            temperature=temperature),
               in_shardings=(shape.shardings(mesh), sh), out_shardings=sh["input_ids"])

  def run(params, batch):
    with jax.set_mesh(mesh):
      return fn(params, batch)

  return run


def to_global(batch: dict, mesh) -> dict:
  """This process's rows (numpy) -> global jax.Arrays with the rows of every process, sharded on the mesh."""
  return batch_layout.to_global({k: np.asarray(v) for k, v in batch.items()}, mesh)


def local_rows(x) -> np.ndarray:
  """This process's rows of a global array (rows in order), as numpy."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  seen, parts = set(), []
  for s in shards:
    start = s.index[0].start or 0
    if start in seen:
      continue
    seen.add(start)
    parts.append(np.asarray(s.data))
  return np.concatenate(parts, axis=0)
