"""GSPO end to end moves the policy towards what it is rewarded for: from a random tiny Keye-VL, a reward the
policy samples a fifth to a third of the time (the response contains the letter "y") rises to most responses
within 20 steps. A sign or bookkeeping error anywhere between the rewards and the update (advantages,
packing, old log-probs, the loss) would leave it flat or push it down; the loss maths alone is pinned
against TRL and verl in test_loss.py."""

from __future__ import annotations

import os

import numpy as np
import pytest
import yaml

from tests.train.helpers import REPO
from train.rewards import registry


def contains_y():
  return registry.per_item(lambda sample, response: float("y" in response))


@pytest.mark.slow   # 20 RL steps: ~30 s on the 2-core machine
def test_gspo_raises_a_reward_the_policy_can_sample(tmp_path, monkeypatch):
  # Registered for this test only, so the registry other tests see holds just the project's rewards.
  monkeypatch.setitem(registry._FACTORIES, "test_contains_y", contains_y)
  from keye_jax.processing import build_demo_tokenizer
  from train.data.demo import write_demo_dataset
  from train.metrics import read_metrics
  from train.rl import loop
  write_demo_dataset(str(tmp_path / "data"), seed=4, with_tfds=False, scale=0.05)
  build_demo_tokenizer(str(tmp_path / "data" / "tokenizer"))
  cfg = {"model": os.path.join(REPO, "configs", "model", "tiny.yaml"), "tokenizer": str(tmp_path / "data" / "tokenizer"),
         "data": {"sources": [{"path": str(tmp_path / "data" / "train_reasoning.jsonl")}], "seq_len": 256,
                  "num_patches": 384, "batch_size": 16, "seed": 1},
         "optimizer": {"trainable": ["projector", "language"], "learning_rate": 3e-3, "schedule": "constant",
                       "warmup_steps": 0},
         "loss_chunk": 128, "steps": 20, "checkpoint": {"every": 100, "keep": 1}, "run_dir": str(tmp_path / "run"),
         "rl": {"prompts_per_step": 8, "group_size": 4, "minibatches": 1, "max_new_tokens": 8, "max_prompt_len": 120,
                "max_prompt_patches": 192, "rewards": [{"name": "test_contains_y"}], "hints": {"enabled": False},
                "slots": 32}}
  with open(tmp_path / "rl.yaml", "w") as f:
    yaml.safe_dump(cfg, f)
  loop.run(str(tmp_path / "rl.yaml"), [])
  rewards = [r["reward_mean"] for r in read_metrics(str(tmp_path / "run")) if "reward_mean" in r]
  assert len(rewards) == 20
  first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
  assert first < 0.4 and last > 0.7 and last - first > 0.4, rewards
