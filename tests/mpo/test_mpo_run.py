"""`keye train` with `loss: mpo` end to end on a small text model: the reference log-probs are computed
once (one pass, each pair once, none on resume or in a second epoch), they are the initial model's (the
first step's rewards are 0 and its DPO term log 2), and a resumed run continues exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest

from keye_jax.config import from_dict
from tests.mpo.conftest import PAIRS
from train import mpo
from train.config import TrainConfig
from train.metrics import read_metrics

TEXT = {"text": {"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2,
                 "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "mrope_section": [2, 3, 3]},
        "vision": None, "attention_impl": "xla"}
N_TEXT = sum("pic.png" not in str(p) for p in PAIRS)


def _cfg(pairs_dir, tokenizer_dir, run_dir, steps):
  return from_dict(TrainConfig, {
    "model": TEXT, "tokenizer": tokenizer_dir, "loss": "mpo", "loss_chunk": 64, "steps": steps,
    "data": {"sources": [{"path": str(pairs_dir / "text_pairs.jsonl")}], "seq_len": 128, "num_patches": 4,
             "batch_size": 2, "packing_bins": 2},
    "optimizer": {"learning_rate": 3e-3, "schedule": "constant"}, "checkpoint": {"every": 1, "keep": 3},
    "mesh": {"data": 1, "fsdp": 1, "tensor": 1, "context": 1}, "run_dir": str(run_dir)})


@pytest.mark.slow   # 25 s idle: the fast suite must stay within the CI budget; run with -m slow
def test_reference_once_and_exact_resume(pairs_dir, tokenizer_dir, tmp_path):
  from train.loop import train
  before = dict(mpo.REFERENCE_STATS)
  train(_cfg(pairs_dir, tokenizer_dir, tmp_path / "a", 2))
  assert mpo.REFERENCE_STATS == {"passes": before["passes"] + 1, "pairs": before["pairs"] + N_TEXT}
  fp, table = mpo.read_reference(str(tmp_path / "a" / mpo.REFERENCE_FILE))
  assert sorted(table) == list(range(N_TEXT))
  first = read_metrics(str(tmp_path / "a"))[0]
  assert abs(first["reward_chosen"]) < 1e-4 and abs(first["reward_margin"]) < 1e-4
  assert first["loss_dpo"] == pytest.approx(math.log(2), abs=1e-4)

  # resumed for more steps than one epoch of pairs holds: no second reference pass
  out = train(_cfg(pairs_dir, tokenizer_dir, tmp_path / "a", 4))
  assert out["final_step"] == 4
  assert mpo.REFERENCE_STATS["passes"] == before["passes"] + 1

  train(_cfg(pairs_dir, tokenizer_dir, tmp_path / "b", 4))  # uninterrupted
  assert mpo.REFERENCE_STATS["passes"] == before["passes"] + 2
  resumed = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / "a"))}
  straight = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / "b"))}
  assert sorted(resumed) == [1, 2, 3, 4]
  np.testing.assert_array_equal([resumed[s] for s in (1, 2, 3, 4)], [straight[s] for s in (1, 2, 3, 4)])
