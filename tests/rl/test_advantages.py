"""Group-normalised advantages against verl's compute_grpo_outcome_advantage; batch statistics."""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import numpy as np
import pytest
import torch

from tests.rl.reference_code import load
from train.rl.advantages import group_advantages, group_pass_rates, group_stats


def verl_advantages(rewards, index, **kw):
  fn = load("verl", "trainer/ppo/core_algos.py", ["compute_grpo_outcome_advantage"],
            {"torch": torch, "np": np, "Optional": Optional, "defaultdict": defaultdict,
             "AlgoConfig": object})["compute_grpo_outcome_advantage"]
  n = len(rewards)
  token_rewards = torch.zeros((n, 4), dtype=torch.float64)
  token_rewards[:, 2] = torch.tensor(rewards, dtype=torch.float64)  # the outcome reward on one token
  adv, _ = fn(token_rewards, torch.ones((n, 4), dtype=torch.float64), np.asarray(index), **kw)
  return adv[:, 0].numpy()


@pytest.mark.parametrize("scale", [True, False])
def test_matches_verl(scale):
  rng = np.random.default_rng(0)
  index = np.array([3, 3, 3, 3, 7, 7, 7, 7, 1, 1, 5, 5, 5, 5, 5, 5])  # uneven, not sorted, one all-equal
  rewards = rng.uniform(0, 1, len(index)).round(2)
  rewards[index == 1] = 0.5
  rng.shuffle(perm := np.arange(len(index)))
  index, rewards = index[perm], rewards[perm]
  ours = group_advantages(rewards, index, scale=scale)
  ref = verl_advantages(rewards, index, norm_adv_by_std_in_grpo=scale)
  np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
  assert np.all(ours[index == 1] == 0)


def test_binary_rewards_and_singleton():
  adv = group_advantages([1, 0, 0, 0, 1], [0, 0, 0, 0, 1])
  # unbiased std of (1, 0, 0, 0) is 0.5: A = (1 - 0.25) / 0.5, (0 - 0.25) / 0.5
  np.testing.assert_allclose(adv, [1.5, -0.5, -0.5, -0.5, 0.0], rtol=1e-5)
  with pytest.raises(ValueError, match="3 rewards but 2 group ids"):
    group_advantages([1, 0, 1], [0, 0])


def test_stats():
  rewards = [1, 0, 1, 1, 0, 0, 0.5, 0.5]
  groups = [0, 0, 1, 1, 2, 2, 3, 3]
  s = group_stats(rewards, groups, correct=[r == 1 for r in rewards])
  assert s["groups"] == 4
  assert s["no_signal_share"] == 0.75  # groups 1, 2, 3 are all-equal
  assert s["pass_rate"] == 3 / 8
  assert s["reward_mean"] == pytest.approx(0.5)
  assert group_pass_rates([1, 0, 1, 1, 0, 0], ["a", "a", "b", "b", "c", "c"]) == {"a": 0.5, "b": 1.0, "c": 0.0}
