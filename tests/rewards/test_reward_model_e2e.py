"""The pairwise reward model end to end: small demo data -> preference pairs (train/data/demo_pairs.py) ->
the A/B judging SFT manifest (train/rewards/rm_data.py) -> a stage config like configs/demo/rm.yaml trains
a fresh small Keye-VL for a few steps -> `{name: pairwise, ckpt: RUN_DIR}` built by the reward registry
scores responses against a reference: every value finite in [0, 1], both orders judged, swapping response
and reference gives 1 - the win, and an answer against itself is exactly 0.5 whatever the judge's position
bias. (Whether such a model learns the preference is measured by hand at demo scale: docs in the report.)"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml

from tests.cli.helpers import demo_tokenizer
from train.metrics import read_metrics
from train.rewards import registry
from train.rewards.pairwise import parse_preference

STEPS = 4
# configs/model/tiny.yaml made smaller (a few steps on CPU): text 2 x 64, vision 1 x 32.
MODEL = {"text": {"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2,
                  "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "mrope_section": [2, 3, 3],
                  "max_position_embeddings": 4096},
         "vision": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2,
                    "num_channels": 3, "image_size": 112, "patch_size": 14, "spatial_merge_size": 2,
                    "position_init_std": 0.7},
         "image_token_id": 5, "video_token_id": 6, "vision_start_token_id": 3, "vision_end_token_id": 4,
         "bos_token_id": 0, "eos_token_id": 2, "attention_impl": "xla"}


def _read(path):
  return [json.loads(x) for x in open(path)]


@pytest.mark.slow  # ~60 s on 2 loaded cores (32 s CPU): a training run, a checkpoint load and the sampler
def test_reward_model_trained_from_demo_pairs_scores_both_orders(tmp_path):
  from train.data.demo import write_demo_dataset
  from train.data.demo_pairs import write_demo_pairs
  from train.rewards.rm_data import write_rm_manifest
  from train.stages import run

  write_demo_dataset(str(tmp_path / "data"), seed=0, with_tfds=False, scale=0.05)
  write_demo_pairs(str(tmp_path / "data"))
  manifest = write_rm_manifest(str(tmp_path / "data" / "train_pairs.jsonl"), str(tmp_path / "rm_data" / "sft.jsonl"))
  assert manifest["records"] == 4 * manifest["pairs"] > 0
  demo_tokenizer(tmp_path / "tokenizer")
  cfg = {"model": MODEL, "tokenizer": "tokenizer",
         "data": {"sources": [{"path": "rm_data/sft.jsonl", "name": "rm"}], "seq_len": 512, "num_patches": 128,
                  "batch_size": 2, "seed": 11},
         "optimizer": {"trainable": ["projector", "language"], "learning_rate": 3.0e-3, "warmup_steps": 1,
                       "schedule": "cosine", "weight_decay": 0.01},
         "mesh": {"data": 1, "fsdp": 1, "tensor": 1, "context": 1}, "loss_chunk": 128, "steps": STEPS,
         "checkpoint": {"every": 100, "keep": 1}, "log_every": 1, "run_dir": "runs/rm"}
  (tmp_path / "rm.yaml").write_text(yaml.safe_dump(cfg))
  out = run(str(tmp_path / "rm.yaml"))
  run_dir = tmp_path / "runs" / "rm"
  assert out["final_step"] == STEPS and os.path.isdir(run_dir / "checkpoints" / str(STEPS))
  losses = [r["loss"] for r in read_metrics(str(run_dir)) if "loss" in r]
  assert len(losses) == STEPS and all(np.isfinite(losses))

  reward = registry.build("pairwise", ckpt=str(run_dir), ckpt_options={"max_new_tokens": 8, "thinking": False})
  judge, seen = reward.judge, []

  def recording(prompts):
    replies = judge(prompts)
    seen.append((list(prompts), list(replies)))
    return replies
  reward.judge = recording

  pairs = _read(tmp_path / "data" / "test_pairs.jsonl") + _read(tmp_path / "data" / "train_pairs.jsonl")[:2]
  samples = [{"id": p["id"], "prompt": p["prompt"], "answer": p["chosen"]} for p in pairs]
  rejected = [p["rejected"] for p in pairs]
  win = reward(samples, rejected)
  assert win.shape == (len(pairs),) and np.all(np.isfinite(win)) and np.all((win >= 0) & (win <= 1))
  prompts, replies = seen[-1]
  assert len(prompts) == 2 * len(pairs) and reward.stats["judged"] == 2 * len(pairs)
  for k, p in enumerate(pairs):  # (response, reference), then (reference, response)
    assert f"[Answer A]\n{p['rejected']}\n\n[Answer B]\n{p['chosen']}\n" in prompts[2 * k]
    assert f"[Answer A]\n{p['chosen']}\n\n[Answer B]\n{p['rejected']}\n" in prompts[2 * k + 1]
  probs = [0.5 if q is None else q for q in map(parse_preference, replies)]
  assert reward.stats["unparsable"] == sum(parse_preference(r) is None for r in replies)
  np.testing.assert_allclose(win, [(probs[2 * k] + 1 - probs[2 * k + 1]) / 2 for k in range(len(pairs))])

  # swapping the roles of response and reference: the same two judgements, so the win is 1 - the win
  swapped = reward([{**s, "answer": r} for s, r in zip(samples, rejected)], [p["chosen"] for p in pairs])
  np.testing.assert_allclose(swapped, 1.0 - win, atol=1e-6)
  # an answer against itself: both orders cancel any position bias
  np.testing.assert_allclose(reward(samples, [p["chosen"] for p in pairs]), 0.5)
