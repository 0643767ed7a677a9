"""RL step time split into rollout / reward / update, and rollout tokens/s (printed).

  python benchmarks/bench_rl.py [--config configs/demo/rl.yaml] [--steps 4] [key.sub=value ...]

Without a config: the tiny Keye-VL from fresh weights on the demo's reasoning prompts (demo data written
to a temporary directory), 8 prompts x G=4 responses of up to 64 tokens, 2 minibatches. The first step
(compilation) is reported apart; the split is the mean over the later steps.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _default_config(tmp: str) -> str:
  from keye_jax.processing import build_demo_tokenizer
  from train.data.demo import write_demo_dataset
  write_demo_dataset(os.path.join(tmp, "data"), seed=0, with_tfds=False, scale=0.2)
  build_demo_tokenizer(os.path.join(tmp, "data", "tokenizer"))
  cfg = {"model": os.path.join(ROOT, "configs", "model", "tiny.yaml"), "tokenizer": os.path.join(tmp, "data", "tokenizer"),
         "data": {"sources": [{"path": os.path.join(tmp, "data", "train_reasoning.jsonl")}], "seq_len": 320,
                  "num_patches": 128, "batch_size": 8, "seed": 0},
         "optimizer": {"trainable": ["projector", "language"], "learning_rate": 1e-5, "schedule": "constant"},
         "loss_chunk": 160, "steps": 100, "checkpoint": {"every": 0, "keep": 1}, "run_dir": os.path.join(tmp, "run"),
         "rl": {"prompts_per_step": 8, "group_size": 4, "minibatches": 2, "max_new_tokens": 64,
                "max_prompt_len": 96, "max_prompt_patches": 64, "hints": {"enabled": False}}}
  path = os.path.join(tmp, "rl.yaml")
  with open(path, "w") as f:
    yaml.safe_dump(cfg, f)
  return path


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default=None)
  ap.add_argument("--steps", type=int, default=4)
  args, overrides = ap.parse_known_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from train.rl.config import load_rl_config
  from train.rl.loop import RLRun
  with tempfile.TemporaryDirectory(prefix="bench-rl-") as tmp:
    path = args.config or _default_config(tmp)
    cfg = load_rl_config(path, [*overrides, f"run_dir={os.path.join(tmp, 'run')}", "checkpoint.every=0"])
    run = RLRun(cfg)
    recs = [run.step() for _ in range(args.steps)]
    run.ckpt.close()
  keys = ("step_seconds", "rollout_seconds", "reward_seconds", "update_seconds", "rollout_tokens_per_second",
          "response_length")
  first = recs[0]
  print(f"RL step on {cfg.rl.prompts_per_step} prompts x G={cfg.rl.group_size}, max {cfg.rl.max_new_tokens} new "
        f"tokens, {cfg.rl.minibatches} optimizer steps (machine possibly loaded: compare runs, not absolutes)")
  print(f"  first step (compiles): {first['step_seconds']:.1f} s")
  later = recs[1:] or recs
  mean = {k: float(np.mean([r[k] for r in later])) for k in keys}
  total = mean["step_seconds"]
  for name in ("rollout", "reward", "update"):
    s = mean[f"{name}_seconds"]
    print(f"  {name:<8} {s:8.3f} s  {100 * s / total:5.1f}%")
  print(f"  step     {total:8.3f} s  (mean of {len(later)} steps)")
  print(f"  rollout tokens/s {mean['rollout_tokens_per_second']:.0f}  mean response {mean['response_length']:.1f} tokens")


if __name__ == "__main__":
  main()
