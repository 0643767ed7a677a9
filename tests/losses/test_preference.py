"""MPO's terms against TRL DPOTrainer's loss (loss_type sigmoid, bco_pair, sft and the MPO mix), run from
the pinned TRL source with a stand-in model that returns the per-token log-probs under test."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.rl.reference_code import load
from train.losses.preference import mpo_loss, running_mean_update

B, T = 4, 9


def trl_dpo(per_token, mask, ref_chosen, ref_rejected, *, loss_types, loss_weights, beta):
  """DPOTrainer._compute_loss on a batch [chosen; rejected]: (loss, d loss / d per-token log-probs)."""
  compute_loss = load("trl", "trainer/dpo_trainer.py", ["DPOTrainer._compute_loss"],
                      {"torch": torch, "F": F, "math": math})["DPOTrainer._compute_loss"]
  lp = torch.tensor(per_token, dtype=torch.float64, requires_grad=True)  # (2B, T - 1), 0 off-completion
  outputs = SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp), mean_logits=torch.zeros_like(lp),
                            is_top1=torch.zeros(lp.shape, dtype=torch.bool))
  this = SimpleNamespace(
    model=SimpleNamespace(training=True), aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
    f_divergence_type="reverse_kl", loss_types=loss_types, loss_weights=loss_weights, beta=beta,
    use_weighting=False, label_smoothing=0.0, _metrics={"train": defaultdict(list)},
    _total_train_tokens=0, _tp_size=1,
    accelerator=SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x))
  m = torch.tensor(mask, dtype=torch.long)
  inputs = {"input_ids": torch.zeros_like(m), "attention_mask": torch.ones_like(m), "completion_mask": m,
            "ref_chosen_logps": torch.tensor(ref_chosen, dtype=torch.float64),
            "ref_rejected_logps": torch.tensor(ref_rejected, dtype=torch.float64)}
  loss = compute_loss(this, lambda **kw: outputs, inputs, return_outputs=False)
  loss.backward()
  return loss.item(), lp.grad.numpy()


def data(seed):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, T, 2 * B)
  mask = np.zeros((2 * B, T), np.int64)
  for i, n in enumerate(lengths):
    mask[i, T - n:] = 1  # prompt first, completion at the end
  per_token = -rng.uniform(0.05, 2.0, (2 * B, T - 1)) * mask[:, 1:]
  sums = per_token.sum(1)
  ref = sums + rng.normal(0, 1.5, 2 * B)
  return per_token, mask, sums, ref


@pytest.mark.parametrize("terms,trl_types", [
  ({"dpo": 1.0}, ["sigmoid"]), ({"bco": 1.0}, ["bco_pair"]), ({"sft": 1.0}, ["sft"]),
  ({"dpo": 0.8, "bco": 0.2, "sft": 1.0}, ["sigmoid", "bco_pair", "sft"])])
def test_matches_trl_dpo_trainer(terms, trl_types):
  per_token, mask, sums, ref = data(0)
  lengths = mask[:, 1:].sum(1)
  beta = 0.3
  ref_loss, ref_grad = trl_dpo(per_token, mask, ref[:B], ref[B:], loss_types=trl_types,
                               loss_weights=[terms[k] for k in terms], beta=beta)

  def f(s):
    return mpo_loss(s[:B], s[B:], jnp.asarray(ref[:B], jnp.float32), jnp.asarray(ref[B:], jnp.float32),
                    jnp.asarray(lengths[:B]), beta=beta, weights=terms)
  (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(sums, jnp.float32))
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  # d/d(sum of a sequence's log-probs) is what every token of that sequence gets in TRL
  expected = np.array([ref_grad[i][mask[i, 1:] > 0][0] for i in range(2 * B)])
  np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-4, atol=1e-7)
  for i in range(2 * B):
    np.testing.assert_allclose(ref_grad[i][mask[i, 1:] > 0], expected[i], rtol=1e-9)


def test_metrics_and_errors():
  c, r = jnp.array([-3.0, -5.0]), jnp.array([-4.0, -4.0])
  loss, m = mpo_loss(c, r, jnp.zeros(2), jnp.zeros(2), jnp.array([3, 5]), beta=1.0)
  assert float(m["reward_accuracy"]) == 0.5
  assert float(m["loss_sft"]) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="unknown loss terms"):
    mpo_loss(c, r, c, r, jnp.array([1, 1]), weights={"ipo": 1.0})


def test_running_mean():
  mean, count = 0.0, 0
  for x in [1.0, 2.0, 6.0]:
    mean, count = running_mean_update(mean, count, x)
  assert (mean, count) == (3.0, 3)
