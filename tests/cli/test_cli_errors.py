"""Every user error is one line on stderr naming the file/key, no traceback, and a non-zero exit code."""

import json
import os

import pytest
import yaml

from tests.cli.helpers import converted_text_model, demo_tokenizer, keye, last_json, one_line_error
from tests.train.helpers import TEXT_MODEL, write_config


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """A converted tiny text checkpoint with the demo tokenizer and only 64 positions."""
  d = tmp_path_factory.mktemp("ckpt")
  converted_text_model(d / "c", tokenizer=demo_tokenizer(d / "tok"), max_position_embeddings=64)
  return d / "c"


def test_bad_yaml_and_overrides(tmp_path):
  (tmp_path / "bad.yaml").write_text("steps: [1, 2\nrun_dir: x\n")
  one_line_error(keye("train", "bad.yaml", cwd=tmp_path), "bad.yaml: not valid YAML", "line")
  cfg = write_config(tmp_path / "c.yaml", "run", steps=1)
  one_line_error(keye("train", "c.yaml", "stepz", cwd=tmp_path), "'stepz' is not of the form key.sub=value")
  one_line_error(keye("train", "c.yaml", "data.sources=[{path: x", cwd=tmp_path), "data.sources", "not valid YAML")
  one_line_error(keye("train", "c.yaml", "data.seq_len=abc", cwd=tmp_path), "data.seq_len: expected int")
  one_line_error(keye("train", "missing.yaml", cwd=tmp_path), "missing.yaml")
  assert os.path.exists(cfg)


def test_generate_arguments(tmp_path, ckpt):
  for args, needle in ((["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
                       (["--max-new-tokens", "-5"], "--max-new-tokens must be at least 1"),
                       (["--temperature", "-1"], "--temperature must be >= 0")):
    one_line_error(keye("generate", ckpt, "--prompt", "hi", *args, cwd=tmp_path), needle)
  # 60 prompt tokens + 8 new ones > 64 positions: both numbers named.
  line = one_line_error(keye("generate", ckpt, "--prompt", "the red square " * 30, "--max-new-tokens", "8",
                             cwd=tmp_path), "--max-new-tokens is 8", "64 positions")
  assert "the prompt is" in line
  one_line_error(keye("generate", tmp_path, "--prompt", "hi", cwd=tmp_path), "not a checkpoint")
  one_line_error(keye("generate", "nowhere", "--prompt", "hi", cwd=tmp_path), "nowhere: no such checkpoint directory")


def test_verify_hf_dir_needs_the_flag_and_torch(tmp_path, ckpt):
  one_line_error(keye("verify", ckpt, "--hf-dir", tmp_path, cwd=tmp_path), "--trust-remote-code")
  p = keye("verify", ckpt, "--hf-dir", tmp_path, "--trust-remote-code", cwd=tmp_path,
           prelude="import sys; sys.modules['torch'] = None")
  one_line_error(p, "needs torch", "pip install torch")


def test_plan_without_libtpu(tmp_path):
  cfg = write_config(tmp_path / "p.yaml", "run")
  p = keye("plan", cfg, "--topology", "v5p:2x2x1", cwd=tmp_path, prelude="import sys; sys.modules['libtpu'] = None")
  one_line_error(p, "libtpu", "make setup-tpu")


def _corrupt_manifest(root, n=6):
  os.makedirs(root / "img", exist_ok=True)
  (root / "img" / "bad.png").write_bytes(b"\x89PNG not an image")
  rec = {"messages": [{"role": "user", "content": [{"type": "image", "image": "img/bad.png"},
                                                   {"type": "text", "text": "what colour"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]}
  (root / "bad.jsonl").write_text("".join(json.dumps(rec) + "\n" for _ in range(n)))
  return root / "bad.jsonl"


def test_corrupt_media_only(tmp_path):
  _corrupt_manifest(tmp_path)
  p = keye("data", "check", "bad.jsonl", cwd=tmp_path)
  assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
  assert last_json(p) == {"total": 6, "ok": 0, "bad": {"bad media": 6}}
  demo_tokenizer(tmp_path / "tok")
  write_config(tmp_path / "t.yaml", "run", model={**TEXT_MODEL, "text": {**TEXT_MODEL["text"], "vocab_size": 1024}},
               tokenizer="tok", data={"sources": [{"path": "bad.jsonl"}], "bad_check_min_samples": 10})
  one_line_error(keye("train", "t.yaml", cwd=tmp_path), "bad.jsonl")


@pytest.mark.slow  # 17 s: two trainings in subprocesses
def test_run_dir_of_another_model_and_steps_zero(tmp_path):
  write_config(tmp_path / "a.yaml", "run", steps=1)
  p = keye("train", "a.yaml", cwd=tmp_path)
  assert p.returncode == 0, p.stderr[-3000:]
  other = {**TEXT_MODEL, "text": {**TEXT_MODEL["text"], "hidden_size": 32}}
  write_config(tmp_path / "b.yaml", "run", steps=1, model=other)
  one_line_error(keye("train", "b.yaml", cwd=tmp_path), "holds checkpoints of another model",
                 "model.text.hidden_size is 64 there, 32 in this config")
  for args in (["a.yaml"], ["a.yaml", "steps=0", "run_dir=fresh"]):  # finished; nothing to do
    p = keye("train", *args, cwd=tmp_path)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    out = last_json(p)  # valid JSON: no NaN
    assert out["final_step"] == (1 if args == ["a.yaml"] else 0)
  assert last_json(p)["final_loss"] is None
  assert yaml.safe_load(open(tmp_path / "run" / "config.yaml"))["model"]["text"]["hidden_size"] == 64
