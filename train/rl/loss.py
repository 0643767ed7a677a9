"""Clipped policy-gradient losses of GSPO and GRPO over packed rows (pure, jittable).

Every quantity is taken per response: one response per row (`segment_ids=None`), or several packed in a
row and numbered by `segment_ids` (1, 2, ...; 0 = none). A response's tokens are its positions with
`loss_mask` 1; its length |y_i| and its sums never cross into a neighbour in the same row.

Per response i with tokens t (the spec's formulas, ../shared/spec/interfaces.md):
  gspo        s_i = exp(mean_t(logprobs - old_logprobs));  l_i = min(s_i A_i, clip(s_i) A_i)
  gspo_token  s_it = sg(s_i) exp(logprobs_t - sg(logprobs_t));  l_i = mean_t min(s_it A_i, clip(s_it) A_i)
  grpo        r_t = exp(logprobs_t - old_logprobs_t);  l_i = mean_t min(r_t A_i, clip(r_t) A_i)
  loss = -mean_i l_i  (+ kl_coef * mean_i mean_t k3_t with a reference policy)
with clip(x) = clip(x, 1 - eps_low, 1 + eps_high). gspo and gspo_token have the same value and the same
gradient; gspo_token is the form that accepts per-token advantages.

The KL term is the k3 estimator exp(ref - logp) - (ref - logp) - 1 (TRL's GRPOTrainer with beta > 0;
verl's "low_var_kl"), averaged over a response's tokens, then over responses, like the policy term.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

VARIANTS = ("gspo", "gspo_token", "grpo")
# eps_low, eps_high when not given: the GSPO paper's for the sequence variants, PPO's 0.2 for GRPO.
DEFAULT_EPS = {"gspo": (3e-4, 4e-4), "gspo_token": (3e-4, 4e-4), "grpo": (0.2, 0.2)}


def response_ids(loss_mask: jax.Array, segment_ids: jax.Array | None) -> tuple[jax.Array, int]:
  """Each token's response number in [0, n) (tokens outside responses included; mask them) and n.
  (B, T) -> ((B, T) int32, n = B * (T + 1) static): row b's segment k is response b * (T + 1) + k."""
  b, t = loss_mask.shape
  seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  return jnp.arange(b, dtype=jnp.int32)[:, None] * (t + 1) + seg, b * (t + 1)


def per_response_sum(x: jax.Array, ids: jax.Array, n: int) -> jax.Array:
  """(B, T) values -> (n,) sums over each response's tokens (x already masked)."""
  return jax.ops.segment_sum(x.reshape(-1), ids.reshape(-1), num_segments=n)


def policy_loss(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array,
                loss_mask: jax.Array, *, segment_ids: jax.Array | None = None,
                variant: str = "gspo", eps_low: float | None = None, eps_high: float | None = None,
                ref_logprobs: jax.Array | None = None, kl_coef: float = 0.0):
  """Loss (scalar float32) and metrics for one batch of responses; see the module doc.

  logprobs, old_logprobs, advantages, loss_mask: (B, T); segment_ids: (B, T) int32 or None;
  ref_logprobs: (B, T) or None (the KL metric and, with kl_coef > 0, the KL term).
  eps_low / eps_high default to 3e-4 / 4e-4 for gspo and gspo_token, 0.2 / 0.2 for grpo.

  metrics: clip_fraction (clipped share: of responses for gspo, of response tokens for the token
  variants; clipped = ratio outside the range on the side where the clip binds, i.e. A > 0 above or
  A < 0 below), clip_fraction_low, clip_fraction_high, ratio_mean (same units), log_ratio_mean
  (token-mean of logprobs - old_logprobs), responses (count), and kl when ref_logprobs is given.
  """
  if variant not in VARIANTS:
    raise ValueError(f"policy_loss: unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
  lo_default, hi_default = DEFAULT_EPS[variant]
  lo = 1.0 - (lo_default if eps_low is None else eps_low)
  hi = 1.0 + (hi_default if eps_high is None else eps_high)
  f32 = jnp.float32
  valid = loss_mask > 0
  if segment_ids is not None:
    valid = valid & (segment_ids > 0)
  mask = valid.astype(f32)
  # Outside responses the values may be anything (even -inf): zero them before they meet exp or a gradient.
  logprobs = jnp.where(valid, logprobs.astype(f32), 0.0)
  old_logprobs = jnp.where(valid, old_logprobs.astype(f32), 0.0)
  advantages = jnp.where(valid, advantages.astype(f32), 0.0)
  ids, n = response_ids(loss_mask, segment_ids)

  length = per_response_sum(mask, ids, n)                      # (n,) |y_i|
  present = length > 0
  inv_len = jnp.where(present, 1.0 / jnp.maximum(length, 1.0), 0.0)
  count = jnp.maximum(jnp.sum(present), 1).astype(f32)
  adv_i = per_response_sum(advantages, ids, n) * inv_len   # A_i (constant in i)
  log_ratio = (logprobs - old_logprobs) * mask

  def token_mean(x):                                            # (B, T) -> (n,) mean over each response
    return per_response_sum(x * mask, ids, n) * inv_len

  if variant == "gspo":
    s = jnp.exp(per_response_sum(log_ratio, ids, n) * inv_len)  # (n,)
    l_i = jnp.minimum(s * adv_i, jnp.clip(s, lo, hi) * adv_i)
    low, high = (s < lo) & (adv_i < 0), (s > hi) & (adv_i > 0)
    weight = present.astype(f32) / count                        # per response
    ratio_mean = jnp.sum(s * weight)
    clip_low, clip_high = jnp.sum(low * weight), jnp.sum(high * weight)
  else:
    adv_t = advantages  # per token (constant within a response in the spec; per-token values work too)
    if variant == "gspo_token":
      seq_log = jax.lax.stop_gradient(per_response_sum(log_ratio, ids, n) * inv_len)
      r = jnp.exp(seq_log[ids] + logprobs - jax.lax.stop_gradient(logprobs))
    else:
      r = jnp.exp(log_ratio)
    l_i = token_mean(jnp.minimum(r * adv_t, jnp.clip(r, lo, hi) * adv_t))
    low, high = (r < lo) & (adv_t < 0), (r > hi) & (adv_t > 0)
    tokens = jnp.maximum(jnp.sum(mask), 1.0)
    ratio_mean = jnp.sum(r * mask) / tokens
    clip_low, clip_high = jnp.sum(low * mask) / tokens, jnp.sum(high * mask) / tokens

  loss = -jnp.sum(jnp.where(present, l_i, 0.0)) / count
  metrics = {
    "clip_fraction": clip_low + clip_high,
    "clip_fraction_low": clip_low,
    "clip_fraction_high": clip_high,
    "ratio_mean": ratio_mean,
    "log_ratio_mean": jnp.sum(log_ratio) / jnp.maximum(jnp.sum(mask), 1.0),
    "responses": jnp.sum(present).astype(f32),
  }
  if ref_logprobs is not None:
    d = jnp.where(valid, ref_logprobs.astype(f32), 0.0) - logprobs
    kl = jnp.sum(token_mean(jnp.exp(d) - d - 1.0)) / count
    metrics["kl"] = kl
    if not (isinstance(kl_coef, (int, float)) and kl_coef == 0):
      loss = loss + kl_coef * kl
  metrics = {k: jax.lax.stop_gradient(v) for k, v in metrics.items()}
  return loss, metrics
