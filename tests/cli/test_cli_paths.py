"""A user's first hour with relative paths from a temporary working directory: train into a relative run
dir, then give that run dir to generate, merge and convert to-hf; the merged and converted checkpoints
carry the tokenizer, so generate reads them too, and greedy answers agree across all of them."""

import os

import pytest

from tests.cli.helpers import demo_tokenizer, keye, last_json
from tests.train.helpers import TINY_MODEL, write_config


# 51 s (every command in its own process); run dirs as inputs stay covered in CI by test_cli_eval_run_dir
# and the merge tests.
@pytest.mark.slow
def test_run_dir_through_every_command_with_relative_paths(tmp_path):
  os.makedirs(tmp_path / "configs")
  demo_tokenizer(tmp_path / "configs" / "tok")
  # Paths inside the file resolve against the file (tok, its own run_dir); the override against the CWD.
  write_config(tmp_path / "configs" / "s.yaml", "runs/in-configs", model=TINY_MODEL, steps=2, tokenizer="tok")
  work = tmp_path / "work"
  os.makedirs(work)
  p = keye("train", "../configs/s.yaml", "run_dir=runs/r", cwd=work)
  assert p.returncode == 0, p.stderr[-3000:]
  assert last_json(p)["run_dir"] == str(work / "runs" / "r")
  assert os.path.isfile(work / "runs" / "r" / "tokenizer" / "tokenizer.json")
  assert not os.path.exists(tmp_path / "configs" / "runs")

  ask = ["--prompt", "what colour is the square", "--max-new-tokens", "4"]
  p = keye("generate", "runs/r", *ask, cwd=work)
  assert p.returncode == 0, p.stderr[-3000:]
  answer = last_json(p)["text"]

  p = keye("merge", "runs/r", "runs/r/checkpoints/2", "--weights", "1", "1", "--out", "merged", cwd=work)
  assert p.returncode == 0, p.stderr[-3000:]
  assert last_json(p) == {"out": str(work / "merged")} and "merge:" in p.stderr
  assert os.path.isfile(work / "merged" / "tokenizer.json")

  p = keye("convert", "to-hf", "merged", "hf", cwd=work)
  assert p.returncode == 0, p.stderr[-3000:]
  p = keye("convert", "to-orbax", "hf", "back", cwd=work)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "to-orbax: group" in p.stderr and "no tokenizer.json" not in p.stderr
  for ckpt in ("merged", "back"):
    p = keye("generate", ckpt, *ask, cwd=work)
    assert p.returncode == 0, p.stderr[-3000:]
    assert last_json(p)["text"] == answer, ckpt
