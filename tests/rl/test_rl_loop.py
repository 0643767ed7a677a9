"""The RL loop end to end on the demo's reasoning prompts and the tiny Keye-VL: metrics per step,
progressive hints wired into the update, pass-rate records for the next round, exact resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from keye_jax.generate import Generation
from tests.train.helpers import REPO, env

METRICS = ("loss", "grad_norm", "reward_mean", "reward_std", "pass_rate", "no_signal_share", "clip_fraction",
           "response_length", "entropy", "rollout_tokens_per_second", "rollout_share", "hinted_groups",
           "rollout_seconds", "reward_seconds", "update_seconds", "prompts_skipped/too_long", "prompts_bad")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  from keye_jax.processing import build_demo_tokenizer
  from train.data.demo import write_demo_dataset
  root = tmp_path_factory.mktemp("rl_loop")
  write_demo_dataset(str(root / "data"), seed=4, with_tfds=False, scale=0.05)
  build_demo_tokenizer(str(root / "data" / "tokenizer"))
  return root


def _config(root, run_dir, **rl):
  cfg = {"model": os.path.join(REPO, "configs", "model", "tiny.yaml"), "tokenizer": str(root / "data" / "tokenizer"),
         "data": {"sources": [{"path": str(root / "data" / "train_reasoning.jsonl")}], "seq_len": 256,
                  "num_patches": 384, "batch_size": 4, "seed": 1},
         "optimizer": {"trainable": ["projector", "language"], "learning_rate": 1e-4, "schedule": "constant"},
         "loss_chunk": 128, "steps": 2, "checkpoint": {"every": 1, "keep": 3}, "run_dir": str(run_dir),
         "rl": {"prompts_per_step": 2, "group_size": 2, "minibatches": 2, "max_new_tokens": 8,
                "max_prompt_len": 120, "max_prompt_patches": 192, **rl}}
  path = str(run_dir) + ".yaml"
  with open(path, "w") as f:
    yaml.safe_dump(cfg, f)
  return path


def test_metrics_hints_and_pass_rates(demo, monkeypatch):
  """Rollouts faked: a response echoes its prompt, and counts as correct only when the prompt carries the
  L2 hint. Every group fails without hints, escalates L1 -> L2, and the L2 group enters the update."""
  from keye_jax.processing.tokenizer import load_tokenizer
  from train.metrics import read_metrics
  from train.rl import hinting, loop, rollouts
  tok = load_tokenizer(str(demo / "data" / "tokenizer"))
  seen = []

  def fake_sample(self, prompts, seeds, n):
    out = []
    for p in prompts:
      text = tok.decode([int(i) for i in p.input_ids])
      seen.append(text)
      toks = list(range(20, 26))
      out.append([Generation(tokens=toks, logprobs=[-1.0] * 6, text=text, finish_reason="stop") for _ in range(n)])
    # the tower is frozen here, so the update reads the rollout's vision features (any values will do)
    self.features = [None if p.pixel_values is None else np.zeros((len(p.pixel_values), 64), np.float32)
                     for p in prompts]
    return out

  monkeypatch.setattr(rollouts.Rollouts, "sample", fake_sample)
  monkeypatch.setattr(rollouts.Rollouts, "set_weights", lambda self, params: None)
  monkeypatch.setattr(hinting, "is_correct", lambda meta, text, thr: meta["hints"][1] in text)
  run_dir = demo / "hints"
  result = loop.run(_config(demo, run_dir), ["steps=1"])
  assert result["final_step"] == 1 and result["reward_before"] is not None
  rec = read_metrics(str(run_dir))[-1]
  for k in METRICS:
    assert k in rec and np.isfinite(rec[k]), k
  assert rec["hinted_groups"] == 2 and rec["pass_rate"] == 0.0
  assert rec["reward/answer"] == rec["reward_mean"]  # each reward's own mean (here the only one)
  # each prompt sampled without a hint, with L1, then with L2 (whose group was kept)
  assert len(seen) == 6 and sum("Hint:" in s for s in seen) == 4
  state = json.load(open(run_dir / "pass_rates" / "process_0.json"))
  assert set(state["min_hint"].values()) == {2} and all(v == [0, 2] for v in state["passed"].values())
  assert os.listdir(run_dir / "tensorboard")
  # a new round keeps only prompts with a pass rate in (0, 1): none here
  keep, drop = hinting.round_filter(str(run_dir))
  assert not keep and len(drop) == 2


def _proc(config, *overrides):
  code = "import json, sys; from train.rl.loop import run; print(json.dumps(run(sys.argv[1], sys.argv[2:])))"
  return subprocess.Popen([sys.executable, "-c", code, config, *overrides], cwd=REPO, env=env(1),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _records(run_dir):
  from train.metrics import read_metrics
  return {r["step"]: (r["loss"], r["reward_mean"], r["response_length"]) for r in read_metrics(str(run_dir))}


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_kill9_then_resume_gives_the_same_losses_and_rewards(demo):
  steps = 3
  straight, killed = demo / "straight", demo / "killed"
  # A reward every response gets a different value of (minus its length), so every step has a signal.
  rl = {"hints": {"enabled": False}, "rewards": [{"name": "answer"}, {"name": "length_penalty", "max_length": 60,
                                                                      "buffer": 60, "unit": "chars"}]}
  a = _proc(_config(demo, straight, **rl), f"steps={steps}")
  b = _proc(_config(demo, killed, **rl), f"steps={steps}")
  t0 = time.time()
  while 2 not in _records(killed):
    assert b.poll() is None, b.stderr.read()[-3000:]
    assert time.time() - t0 < 1200
    time.sleep(0.2)
  b.send_signal(signal.SIGKILL)
  b.wait()
  out, err = a.communicate(timeout=1200)
  assert a.returncode == 0, err[-3000:]
  c = _proc(_config(demo, killed, **rl), f"steps={steps}")
  out, err = c.communicate(timeout=1200)
  assert c.returncode == 0, err[-3000:]
  assert json.loads(out.strip().splitlines()[-1])["final_step"] == steps
  want, got = _records(straight), _records(killed)
  assert sorted(got) == list(range(1, steps + 1))
  assert got == want
  assert all(loss != 0.0 for loss, _, _ in got.values())  # real updates, not empty ones
