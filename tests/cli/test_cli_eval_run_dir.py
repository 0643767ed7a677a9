"""`keye eval` takes a training run dir (its latest checkpoint) by a relative path from the working
directory, as it takes a converted checkpoint (issue 19): a tiny text model trained two steps, scored on a
small demo test file; the run dir and its explicit checkpoint dir are the same checkpoint to the
prediction keying (the second run reuses the first's predictions), another step of the run is not."""

from __future__ import annotations

import glob
import json
import os

from tests.cli.helpers import demo_tokenizer, keye, last_json, one_line_error
from tests.train.helpers import TEXT_MODEL, write_config

# The demo tokenizer's vocabulary and special ids (as tests/cli/helpers.converted_text_model).
MODEL = {**TEXT_MODEL, "text": {**TEXT_MODEL["text"], "vocab_size": 1024}, "image_token_id": 5,
         "video_token_id": 6, "vision_start_token_id": 3, "vision_end_token_id": 4, "bos_token_id": 0,
         "eos_token_id": 2}


def _test_file(path, n: int = 4) -> None:
  options = ["red", "blue", "green", "cyan"]
  with open(path, "w") as f:
    for i in range(n):
      f.write(json.dumps({"id": f"q{i}", "category": "color", "answer": "ABCD"[i % 4], "options": options,
                          "messages": [{"role": "user", "content": [{"type": "text", "text":
                                        f"what colour is square {i}? A. red B. blue C. green D. cyan"}]},
                                       {"role": "assistant", "content": [{"type": "text", "text": "A"}]}]}) + "\n")


def test_eval_takes_a_relative_run_dir(tmp_path):
  work = tmp_path / "work"
  os.makedirs(work / "data")
  demo_tokenizer(work / "tok")
  write_config(work / "s.yaml", "runs/r", model=MODEL, steps=2, tokenizer="tok")
  _test_file(work / "data" / "test.jsonl")
  p = keye("train", "s.yaml", cwd=work)
  assert p.returncode == 0, p.stderr[-3000:]
  assert os.path.isdir(work / "runs" / "r" / "checkpoints" / "2")

  ask = ["--benchmark", "demo", "--data", "data/test.jsonl", "--max-new-tokens", "4", "--batch-size", "2"]
  p = keye("eval", "runs/r", *ask, "--out", "out", cwd=work)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "Traceback" not in p.stderr
  res = last_json(p)
  assert res["benchmark"] == "demo" and res["n"] == 4, res
  preds = [json.loads(x) for x in (work / "out" / "predictions.jsonl").read_text().splitlines()]
  assert sorted(r["id"] for r in preds) == ["q0", "q1", "q2", "q3"]
  assert res["accuracy"] == sum(r["score"] for r in preds) / len(preds)

  # The run dir names its latest checkpoint: the same predictions, reused, under either spelling. With
  # JAX_PLATFORMS unset, as a user runs it: no screen of libtpu warnings on a machine without a TPU, and no
  # Orbax notices about the read-only restore.
  p = keye("eval", "runs/r/checkpoints/2", *ask, "--out", "out", cwd=work, extra_env={"JAX_PLATFORMS": ""})
  assert p.returncode == 0, p.stderr[-3000:]
  assert last_json(p) == res
  if not glob.glob("/dev/accel*") and not glob.glob("/dev/vfio/[0-9]*"):
    assert "TPU" not in p.stderr and "read_only" not in p.stderr, p.stderr
  # Step 1 is another checkpoint: its run may not report step 2's predictions.
  p = keye("eval", "runs/r/checkpoints/1", *ask, "--out", "out", cwd=work)
  one_line_error(p, "--overwrite")
