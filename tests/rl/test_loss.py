"""policy_loss against TRL's GRPOTrainer loss and verl's compute_policy_loss_gspo on the same numbers:
values, gradients and clip fractions, one response per row and packed, clipping at both bounds."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.rl.reference_code import load
from train.rl.loss import policy_loss

LENGTHS = [5, 9, 3, 12, 7, 6, 10, 4]
T = 12


def _trl():
  utils = load("trl", "trainer/utils.py", ["nanmin", "nanmax"], {"torch": torch})
  return load("trl", "trainer/grpo_trainer.py", ["GRPOTrainer._compute_loss"],
              {"torch": torch, **utils})["GRPOTrainer._compute_loss"]


def _verl():
  verl_f = load("verl", "utils/torch_functional.py", ["masked_sum", "masked_mean"], {"torch": torch})

  class ActorConfig:  # the fields compute_policy_loss_gspo reads
    def __init__(self, clip_ratio_low, clip_ratio_high):
      self.clip_ratio, self.clip_ratio_low, self.clip_ratio_high = 0.2, clip_ratio_low, clip_ratio_high
      self.global_batch_info = {}

  ns = {"torch": torch, "np": np, "Optional": Optional, "Any": Any, "defaultdict": defaultdict,
        "ActorConfig": ActorConfig, "verl_F": SimpleNamespace(**verl_f)}
  fns = load("verl", "trainer/ppo/core_algos.py", ["agg_loss", "compute_policy_loss_gspo"], ns)
  return fns["compute_policy_loss_gspo"], ActorConfig


def trl_loss(lp, old, adv_rows, mask, *, level, eps_low, eps_high, ref=None, beta=0.0):
  """TRL GRPOTrainer._compute_loss (loss_type "grpo") on one response per row: (loss, dlp, metrics)."""
  compute_loss = _trl()
  old = np.where(mask > 0, old, 0.0)  # the references multiply padding by 0, so it must be finite there
  lp_t = torch.tensor(lp, dtype=torch.float64, requires_grad=True)
  m = torch.tensor(mask, dtype=torch.float64)
  this = SimpleNamespace(
    top_entropy_quantile=1.0, aux_loss_enabled=False, off_policy_mask_threshold=None,
    importance_sampling_level=level, beta=beta, loss_type="grpo", epsilon_low=eps_low,
    epsilon_high=eps_high, use_vllm=False, _entropy_bonus_enabled=False,
    current_gradient_accumulation_steps=1, model=SimpleNamespace(training=True),
    args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
    accelerator=SimpleNamespace(reduce=lambda x, reduction: x, gather=lambda x: x),
    _metrics={"train": defaultdict(list)},
    _get_per_token_logps_and_entropies=lambda *a, **k: (lp_t, torch.zeros_like(lp_t), None))
  inputs = {"prompt_ids": torch.zeros((len(lp), 1), dtype=torch.long),
            "prompt_mask": torch.ones((len(lp), 1), dtype=torch.long),
            "completion_ids": torch.zeros(np.shape(lp), dtype=torch.long), "completion_mask": m,
            "advantages": torch.tensor(adv_rows, dtype=torch.float64),
            "old_per_token_logps": torch.tensor(old, dtype=torch.float64)}
  if ref is not None:
    inputs["ref_per_token_logps"] = torch.tensor(ref, dtype=torch.float64)
  loss = compute_loss(this, None, inputs)
  loss.backward()
  return loss.item(), lp_t.grad.numpy(), {k: v[0] for k, v in this._metrics["train"].items()}


def verl_loss(lp, old, adv_rows, mask, *, eps_low, eps_high):
  """verl compute_policy_loss_gspo with seq-mean-token-mean (its GSPO recipe): (loss, dlp, metrics)."""
  fn, actor_config = _verl()
  old = np.where(mask > 0, old, 0.0)
  lp_t = torch.tensor(lp, dtype=torch.float64, requires_grad=True)
  m = torch.tensor(mask, dtype=torch.float64)
  adv = torch.tensor(adv_rows, dtype=torch.float64)[:, None] * m
  loss, metrics = fn(torch.tensor(old, dtype=torch.float64), lp_t, adv, m,
                     loss_agg_mode="seq-mean-token-mean", config=actor_config(eps_low, eps_high))
  loss.backward()
  return loss.item(), lp_t.grad.numpy(), metrics


def batch(seed, mean_log_ratios, token_noise, advantages):
  """One response per row: logprobs, old logprobs, advantages (B,), mask. Response i's mean log ratio
  is exactly mean_log_ratios[i]; its tokens spread around it by token_noise."""
  rng = np.random.default_rng(seed)
  b = len(mean_log_ratios)
  mask = (np.arange(T)[None] < np.array(LENGTHS[:b])[:, None]).astype(np.float64)
  lp = -rng.uniform(0.1, 3.0, (b, T))
  noise = rng.normal(0, token_noise, (b, T)) * mask
  noise -= (noise.sum(1) / mask.sum(1))[:, None] * mask
  old = lp - (np.asarray(mean_log_ratios)[:, None] + noise) * mask
  old = np.where(mask > 0, old, -1e9)  # padding is garbage and must not matter
  return lp, old, np.asarray(advantages, np.float64), mask


def ours(lp, old, adv_rows, mask, **kw):
  adv = np.asarray(adv_rows)[:, None] * mask
  fn = lambda x: policy_loss(x, jnp.asarray(old, jnp.float32), jnp.asarray(adv, jnp.float32),
                             jnp.asarray(mask, jnp.int32), **kw)
  (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(lp, jnp.float32))
  return float(loss), np.asarray(grad), {k: float(v) for k, v in metrics.items()}


# GSPO eps 3e-4 / 4e-4: responses inside the range, above it, below it, with either sign of advantage.
GSPO_RATIOS = [1e-4, 2e-3, -2e-3, 2e-3, -2e-3, -1e-4, 5e-4, -5e-4]
GSPO_ADV = [1.2, 0.8, -0.5, -1.0, 0.7, -0.3, 1.5, -1.1]


@pytest.mark.parametrize("variant", ["gspo", "gspo_token"])
def test_gspo_matches_trl_sequence_level_and_verl(variant):
  lp, old, adv, mask = batch(0, GSPO_RATIOS, 0.05, GSPO_ADV)
  loss, grad, metrics = ours(lp, old, adv, mask, variant=variant)
  t_loss, t_grad, t_metrics = trl_loss(lp, old, adv, mask, level="sequence", eps_low=3e-4, eps_high=4e-4)
  v_loss, v_grad, v_metrics = verl_loss(lp, old, adv, mask, eps_low=3e-4, eps_high=4e-4)
  np.testing.assert_allclose(loss, t_loss, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(loss, v_loss, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(grad, t_grad, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(grad, v_grad, rtol=1e-4, atol=1e-7)
  # 2e-3 / 5e-4 with A > 0 clip high, -2e-3 / -5e-4 with A < 0 clip low (no gradient); the others
  # are inside the range or on the side where the clip does not bind.
  assert np.abs(grad[[1, 2, 6, 7]]).max() == 0.0
  assert all(np.count_nonzero(grad[i]) == LENGTHS[i] for i in (0, 3, 4, 5))
  if variant == "gspo":  # per response, as TRL counts sequence-level clipping
    assert metrics["clip_fraction_high"] == pytest.approx(t_metrics["clip_ratio/high_mean"]) == 2 / 8
    assert metrics["clip_fraction_low"] == pytest.approx(t_metrics["clip_ratio/low_mean"]) == 2 / 8
    assert metrics["clip_fraction"] == pytest.approx(t_metrics["clip_ratio/region_mean"])
  else:  # per token, as verl counts it
    assert metrics["clip_fraction"] == pytest.approx(v_metrics["actor/pg_clipfrac"], abs=1e-6)


def test_gspo_gradient_is_the_same_in_both_forms():
  lp, old, adv, mask = batch(1, GSPO_RATIOS, 0.2, GSPO_ADV)
  _, g_seq, _ = ours(lp, old, adv, mask, variant="gspo")
  _, g_tok, _ = ours(lp, old, adv, mask, variant="gspo_token")
  np.testing.assert_allclose(g_seq, g_tok, rtol=1e-5, atol=1e-9)
  assert np.count_nonzero(g_seq) > 0


def test_grpo_matches_trl_token_level():
  lp, old, adv, mask = batch(2, [0.0] * 8, 0.4, GSPO_ADV)  # token ratios spread past 1 +- 0.2
  loss, grad, metrics = ours(lp, old, adv, mask, variant="grpo")
  t_loss, t_grad, t_metrics = trl_loss(lp, old, adv, mask, level="token", eps_low=0.2, eps_high=0.2)
  np.testing.assert_allclose(loss, t_loss, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(grad, t_grad, rtol=1e-4, atol=1e-7)
  assert metrics["clip_fraction_low"] == pytest.approx(t_metrics["clip_ratio/low_mean"], abs=1e-6)
  assert metrics["clip_fraction_high"] == pytest.approx(t_metrics["clip_ratio/high_mean"], abs=1e-6)
  assert 0 < metrics["clip_fraction_low"] and 0 < metrics["clip_fraction_high"]


def test_kl_term_matches_trl():
  lp, old, adv, mask = batch(3, GSPO_RATIOS, 0.05, GSPO_ADV)
  ref = lp + np.random.default_rng(4).normal(0, 0.3, lp.shape)
  loss, grad, metrics = ours(lp, old, adv, mask, ref_logprobs=jnp.asarray(ref, jnp.float32), kl_coef=0.04)
  t_loss, t_grad, t_metrics = trl_loss(lp, old, adv, mask, level="sequence", eps_low=3e-4,
                                       eps_high=4e-4, ref=ref, beta=0.04)
  np.testing.assert_allclose(loss, t_loss, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(grad, t_grad, rtol=1e-4, atol=1e-7)
  # TRL's kl metric is token-weighted; ours is the loss's own per-response mean: compare with the maths.
  k3 = np.exp(ref - lp) - (ref - lp) - 1
  assert metrics["kl"] == pytest.approx(np.mean((k3 * mask).sum(1) / mask.sum(1)), rel=1e-5)
  assert t_metrics["kl"] == pytest.approx((k3 * mask).sum() / mask.sum(), rel=1e-6)


def pack(mask, layout):
  """Where each one-response row goes when packed by `layout` (lists of row numbers per packed row):
  (width, {row: (packed row, start, length)}, segment_ids). Each packed row starts with a prompt token."""
  w = max(sum(int(mask[i].sum()) for i in group) for group in layout) + 2
  seg = np.zeros((len(layout), w), np.int32)
  where = {}
  for r, group in enumerate(layout):
    at = 1
    for k, i in enumerate(group, start=1):
      n = int(mask[i].sum())
      where[i] = (r, at, n)
      seg[r, at:at + n] = k
      at += n
  return w, where, seg


@pytest.mark.parametrize("variant,eps", [("gspo", (3e-4, 4e-4)), ("gspo_token", (3e-4, 4e-4)),
                                         ("grpo", (0.2, 0.2))])
def test_packed_equals_unpacked_reference(variant, eps):
  lp, old, adv, mask = batch(5, GSPO_RATIOS if variant != "grpo" else [0.0] * 8,
                             0.05 if variant != "grpo" else 0.4, GSPO_ADV)
  layout = [[0, 1, 2], [3, 5], [4, 6, 7]]
  w, where, seg = pack(mask, layout)
  p_lp, p_old, p_adv = (np.full((len(layout), w), -7.0) for _ in range(3))
  for i, (r, at, n) in where.items():
    p_lp[r, at:at + n], p_old[r, at:at + n], p_adv[r, at:at + n] = lp[i, :n], old[i, :n], adv[i]
  p_mask = (seg > 0).astype(np.int32)
  fn = lambda x: policy_loss(x, jnp.asarray(p_old, jnp.float32), jnp.asarray(p_adv, jnp.float32),
                             jnp.asarray(p_mask), segment_ids=jnp.asarray(seg), variant=variant)
  (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(p_lp, jnp.float32))
  level = "token" if variant == "grpo" else "sequence"
  t_loss, t_grad, _ = trl_loss(lp, old, adv, mask, level=level, eps_low=eps[0], eps_high=eps[1])
  np.testing.assert_allclose(float(loss), t_loss, rtol=1e-5, atol=1e-7)
  grad = np.asarray(grad)
  for i, (r, at, n) in where.items():
    np.testing.assert_allclose(grad[r, at:at + n], t_grad[i, :n], rtol=1e-4, atol=1e-7)
  assert np.all(grad[p_mask == 0] == 0)
  assert float(metrics["responses"]) == 8
  # and the same packed batch equals our own unpacked one
  u_loss, _, u_metrics = ours(lp, old, adv, mask, variant=variant)
  assert float(loss) == pytest.approx(u_loss, rel=1e-6)
  assert float(metrics["clip_fraction"]) == pytest.approx(u_metrics["clip_fraction"], abs=1e-6)


def test_first_step_ratio_is_one_and_jit():
  lp, _, adv, mask = batch(6, [0.0] * 4, 0.0, [1.0, -1.0, 0.5, 0.0])
  adv_t = jnp.asarray(np.asarray(adv)[:, None] * mask, jnp.float32)
  f = jax.jit(policy_loss, static_argnames=("variant",))
  for variant in ("gspo", "gspo_token", "grpo"):
    loss, m = f(jnp.asarray(lp, jnp.float32), jnp.asarray(lp, jnp.float32), adv_t,
                jnp.asarray(mask, jnp.int32), variant=variant)
    assert float(loss) == pytest.approx(-np.mean(adv))
    assert float(m["ratio_mean"]) == 1.0 and float(m["clip_fraction"]) == 0.0


def test_unknown_variant():
  z = jnp.zeros((1, 2))
  with pytest.raises(ValueError, match="unknown variant 'ppo'"):
    policy_loss(z, z, z, z, variant="ppo")
