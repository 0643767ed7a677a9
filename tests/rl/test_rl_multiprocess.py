"""Multi-host `keye rl`: two local processes of 4 CPU devices, each sampling, rewarding and packing its own
prompts' groups on its own devices, give the same steps as one process of 8 devices."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.train.helpers import REPO, env

STEPS = 2
FIELDS = ("loss", "reward_mean", "reward_std", "response_length", "entropy", "grad_norm")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  from keye_jax.processing import build_demo_tokenizer
  from train.data.demo import write_demo_dataset
  root = tmp_path_factory.mktemp("rl_multiprocess")
  write_demo_dataset(str(root / "data"), seed=4, with_tfds=False, scale=0.05)
  build_demo_tokenizer(str(root / "data" / "tokenizer"))
  # The image questions only: no prompt is skipped as too long (a skipped element moves the next prompts
  # of one process only, and the two runs would then sample different prompts).
  with open(root / "data" / "train_reasoning.jsonl") as f, open(root / "data" / "images.jsonl", "w") as out:
    out.writelines(line for line in f if '"video"' not in line)
  return root


def _rl_process(root, run_dir, *overrides, devices):
  """`keye rl` on the demo's reasoning prompts (images) and the tiny Keye-VL, FSDP over every device."""
  import yaml
  cfg = {"model": os.path.join(REPO, "configs", "model", "tiny.yaml"), "tokenizer": str(root / "data" / "tokenizer"),
         "data": {"sources": [{"path": str(root / "data" / "images.jsonl")}], "seq_len": 128,
                  "num_patches": 64, "batch_size": 8, "seed": 1},
         "mesh": {"fsdp": -1}, "steps": STEPS, "seed": 3, "loss_chunk": 128, "run_dir": str(run_dir),
         "checkpoint": {"every": STEPS, "keep": 1},
         "optimizer": {"trainable": ["projector", "language"], "learning_rate": 1e-3, "schedule": "constant"},
         # A reward every response gets a different value of (minus its length), so every group has a signal.
         "rl": {"prompts_per_step": 2, "group_size": 2, "minibatches": 2, "max_new_tokens": 8, "slots": 8,
                "max_prompt_len": 120, "max_prompt_patches": 64, "hints": {"enabled": False},
                "rewards": [{"name": "answer"}, {"name": "length_penalty", "max_length": 60, "buffer": 60,
                                                 "unit": "chars"}]}}
  path = str(run_dir) + ".yaml"
  with open(path, "w") as f:
    yaml.safe_dump(cfg, f)
  code = "import json, sys; from train.rl.loop import run; print(json.dumps(run(sys.argv[1], sys.argv[2:])))"
  return subprocess.Popen([sys.executable, "-c", code, path, *overrides], cwd=REPO, env=env(devices),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _records(run_dir) -> dict[int, dict]:
  from train.metrics import read_metrics
  return {r["step"]: r for r in read_metrics(str(run_dir))}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_processes_of_four_devices_match_one_process_of_eight(demo):
  port = 20000 + (os.getpid() + 7) % 20000
  two = [_rl_process(demo, demo / "two", f"distributed.coordinator_address=127.0.0.1:{port}",
                     "distributed.num_processes=2", f"distributed.process_id={i}", devices=4) for i in range(2)]
  one = _rl_process(demo, demo / "one", devices=8)
  for p in [*two, one]:
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-3000:]
  want, got = _records(demo / "one"), _records(demo / "two")
  assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
  # Same prompts, same sampled tokens (entropy is the mean -log-prob of the sampled tokens), same updates;
  # float sums in other orders (the engines' meshes have 4 and 8 devices): seen <= 1e-7 apart (the loss, a
  # near-cancelling sum over advantages of both signs, 9e-8 of 0.013).
  for k in FIELDS:
    np.testing.assert_allclose([got[s][k] for s in got], [want[s][k] for s in got], rtol=1e-5, atol=1e-6, err_msg=k)
  assert all(r["loss"] != 0.0 and r["reward_std"] > 0 for r in got.values())  # real updates with a signal
