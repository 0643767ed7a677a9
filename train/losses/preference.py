"""Preference losses over per-sequence log-probabilities (pure, jittable): MPO = DPO + BCO + SFT.

Inputs are the summed log-probabilities of each pair's chosen and rejected responses (B,) under the
policy and under the frozen reference (computed once per batch), and the chosen responses' token counts.
With the log-ratios rho_c = logp_c - ref_c and rho_r = logp_r - ref_r:

  dpo (TRL loss_type "sigmoid")  -(1 - ls) logsigmoid(beta (rho_c - rho_r)) - ls logsigmoid(-beta (rho_c - rho_r))
  bco (TRL loss_type "bco_pair") -logsigmoid(beta rho_c - delta) - logsigmoid(-(beta rho_r - delta))
  sft (TRL loss_type "sft")      -sum(logp_c) / sum(|y_c|)   (token mean over the batch's chosen tokens)

each averaged over the batch, and MPO = w_dpo dpo + w_bco bco + w_sft sft with the MPO paper's weights
0.8, 0.2, 1.0 (TRL's documented MPO preset). `delta` is BCO's reward shift: TRL 1.16 uses 0; earlier TRL
releases and the BCO paper use a running mean of the rewards beta rho, kept with `running_mean_update`
(state outside the jitted step, like any metric).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MPO_WEIGHTS = {"dpo": 0.8, "bco": 0.2, "sft": 1.0}


def dpo_sigmoid(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
                beta: float = 0.1, label_smoothing: float = 0.0) -> jax.Array:
  """(B,) DPO losses (conservative DPO with label_smoothing > 0)."""
  z = beta * ((chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps))
  return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)


def bco_pair(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
             beta: float = 0.1, delta=0.0) -> jax.Array:
  """(B,) BCO quality losses: the chosen response classified good, the rejected one bad, each alone."""
  chosen_reward = beta * (chosen_logps - ref_chosen_logps)
  rejected_reward = beta * (rejected_logps - ref_rejected_logps)
  return -jax.nn.log_sigmoid(chosen_reward - delta) - jax.nn.log_sigmoid(-(rejected_reward - delta))


def sft_nll(chosen_logps, chosen_lengths) -> jax.Array:
  """Scalar: mean negative log-likelihood per chosen token over the batch."""
  return -jnp.sum(chosen_logps) / jnp.maximum(jnp.sum(chosen_lengths), 1)


def mpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths, *,
             beta: float = 0.1, weights: dict | None = None, label_smoothing: float = 0.0,
             bco_delta=0.0):
  """MPO loss (scalar) and metrics. All arrays (B,); `weights` maps dpo / bco / sft to their weights
  (a missing term weighs 0; default MPO_WEIGHTS)."""
  weights = MPO_WEIGHTS if weights is None else weights
  unknown = set(weights) - set(MPO_WEIGHTS)
  if unknown:
    raise ValueError(f"mpo_loss: unknown loss terms {sorted(unknown)} (known: dpo, bco, sft)")
  args = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
  terms = {"dpo": jnp.mean(dpo_sigmoid(*args, beta=beta, label_smoothing=label_smoothing)),
           "bco": jnp.mean(bco_pair(*args, beta=beta, delta=bco_delta)),
           "sft": sft_nll(chosen_logps, chosen_lengths)}
  loss = sum(weights.get(k, 0.0) * v for k, v in terms.items())
  chosen_reward = jax.lax.stop_gradient(beta * (chosen_logps - ref_chosen_logps))
  rejected_reward = jax.lax.stop_gradient(beta * (rejected_logps - ref_rejected_logps))
  metrics = {f"loss_{k}": jax.lax.stop_gradient(v) for k, v in terms.items()}
  metrics.update({
    "reward_chosen": jnp.mean(chosen_reward),
    "reward_rejected": jnp.mean(rejected_reward),
    "reward_accuracy": jnp.mean((chosen_reward > rejected_reward).astype(jnp.float32)),
    "reward_margin": jnp.mean(chosen_reward - rejected_reward),
    # the batch's mean reward, what BCO's running mean is updated with
    "reward_mean": jnp.mean(jnp.concatenate([chosen_reward, rejected_reward])),
  })
  return loss, metrics


def running_mean_update(mean: float, count: int, batch_mean: float) -> tuple[float, int]:
  """BCO's running mean of the batch-mean reward (earlier TRL's RunningMoments fed one value per step)."""
  count += 1
  return mean + (float(batch_mean) - mean) / count, count
