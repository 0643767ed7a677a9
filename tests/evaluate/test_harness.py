"""`keye eval`'s harness: predictions keyed by checkpoint and settings, --limit, and every error path as one
clear line (the CLI's exit code and no "Traceback"), with a scripted sampler instead of a model."""

import json
import os
import subprocess
import sys

import pytest

from keye_jax.evaluate import run_eval
from keye_jax.evaluate.harness import checkpoint_identity
from keye_jax.generate import Generation


class Fixed:
  """A sampler that answers every prompt with the same text and counts the prompts it saw."""

  def __init__(self, reply: str):
    self.reply, self.prompts = reply, 0

  def generate(self, prompts, params):
    self.prompts += len(prompts)
    return [Generation(tokens=[1], logprobs=[0.0], text=self.reply, finish_reason="stop") for _ in prompts]


def _demo_file(path, n=6, answer="B"):
  records = [{"id": f"q{i}", "category": "color" if i % 2 else "shape", "answer": answer,
              "options": ["red", "blue", "green", "cyan"],
              "messages": [{"role": "user", "content": [{"type": "text", "text": f"question {i}"}]},
                           {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}
             for i in range(n)]
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return records


def _eval(data, out, reply="B", **kw):
  sampler = Fixed(reply)
  res = run_eval(None, None, "demo", str(data), str(out), sampler=sampler, encode=lambda m: m, batch_size=4, **kw)
  return res, sampler


def _recomputed(out) -> float:
  lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
  return sum(r["score"] for r in lines) / len(lines)


def test_predictions_of_another_checkpoint_are_refused_or_recomputed(tmp_path):
  data = tmp_path / "test.jsonl"
  _demo_file(data)
  out = tmp_path / "out"
  res, s = _eval(data, out, "B", checkpoint="stage2#aaaa")
  assert res["accuracy"] == 1.0 and s.prompts == 6
  # The same checkpoint and settings: everything is reused, nothing generated again.
  res, s = _eval(data, out, "C", checkpoint="stage2#aaaa")
  assert res["accuracy"] == 1.0 and s.prompts == 0
  # Stage 1 must not report stage 2's predictions (issue 19): refused, with what differs and the way out.
  with pytest.raises(ValueError, match=r"another run \(checkpoint: 'stage2#aaaa' there, 'stage1#bbbb' now\).*--overwrite"):
    _eval(data, out, "C", checkpoint="stage1#bbbb")
  with pytest.raises(ValueError, match="max_new_tokens"):
    _eval(data, out, "C", checkpoint="stage2#aaaa", max_new_tokens=7)
  res, s = _eval(data, out, "C", checkpoint="stage1#bbbb", overwrite=True)
  assert res["accuracy"] == 0.0 and s.prompts == 6 and _recomputed(out) == 0.0
  assert json.loads((out / "run.json").read_text())["key"]["checkpoint"] == "stage1#bbbb"
  assert {json.loads(x)["run"] for x in (out / "predictions.jsonl").read_text().splitlines()} == \
      {json.loads((out / "run.json").read_text())["id"]}
  # An in-memory model with no identity is never trusted with old predictions: always recomputed.
  res, s = _eval(data, out, "B")
  assert res["accuracy"] == 1.0 and s.prompts == 6


def test_checkpoint_identity_changes_when_the_checkpoint_is_rewritten(tmp_path):
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  (ckpt / "params").write_bytes(b"1234")
  first = checkpoint_identity(str(ckpt))
  assert first.startswith(str(ckpt) + "#") and checkpoint_identity(str(ckpt)) == first
  (ckpt / "params").write_bytes(b"123456")
  assert checkpoint_identity(str(ckpt)) != first


def test_limit_scores_the_first_n_and_accuracy_is_the_predictions_mean(tmp_path):
  data = tmp_path / "test.jsonl"
  _demo_file(data, n=10)
  out = tmp_path / "out"
  res, s = _eval(data, out, "B", checkpoint="c", limit=3)
  assert res["n"] == 3 and s.prompts == 3
  assert [json.loads(x)["id"] for x in (out / "predictions.jsonl").read_text().splitlines()] == ["q0", "q1", "q2"]
  res, s = _eval(data, out, "B", checkpoint="c", limit=5)     # a larger limit reuses the first three
  assert res["n"] == 5 and s.prompts == 2 and res["accuracy"] == _recomputed(out) == 1.0
  results = json.loads((out / "results.json").read_text())
  assert results["limit"] == 5 and results["n"] == 5
  with pytest.raises(ValueError, match="--limit must be at least 1"):
    _eval(data, out, checkpoint="c", limit=0)


def _lines(tmp_path, name, lines):
  p = tmp_path / name
  p.write_text("".join(x + "\n" for x in lines))
  return p


GOOD = json.dumps({"id": "a", "answer": "A", "messages": [{"role": "user", "content": "q?"}]})


@pytest.mark.parametrize("lines,message", [
    ([GOOD, GOOD.replace('"a"', '"b"'), GOOD.replace('"a"', '"c"'), '{"id": "d", "answer": '],
     r"test.jsonl line 4: invalid JSON"),
    ([GOOD, GOOD.replace('"a"', '"b"'), json.dumps({"id": "c", "answer": "A"})],
     r"test.jsonl line 3: missing key 'messages'"),
    ([], r"no demo items in .*test.jsonl"),
    (["", "  "], r"no demo items in .*test.jsonl"),
])
def test_bad_data_is_one_clear_error_and_leaves_no_output_dir(tmp_path, lines, message):
  data = _lines(tmp_path, "test.jsonl", lines)
  out = tmp_path / "out"
  with pytest.raises(ValueError, match=message):
    _eval(data, out, checkpoint="c")
  assert not out.exists()


def test_an_existing_out_dir_is_kept_on_failure(tmp_path):
  data = _lines(tmp_path, "test.jsonl", [])
  out = tmp_path / "out"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  with pytest.raises(ValueError):
    _eval(data, out, checkpoint="c")
  assert (out / "notes.txt").read_text() == "mine"


def _cli(*args, cwd):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "keye_jax", "eval", *args], cwd=cwd, capture_output=True, text=True,
                        env=env, timeout=300)


def test_cli_errors_exit_nonzero_without_traceback(tmp_path):
  """Every bad input ends in one `keye eval: error: ...` line and a non-zero exit, before a model loads (the
  checkpoint here is a directory that only looks like one: loading it would fail differently)."""
  from keye_jax import checkpoint_io
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  (ckpt / checkpoint_io.META).write_text("{}")
  data = _lines(tmp_path, "test.jsonl", [GOOD, GOOD, GOOD, "{not json"])
  empty = _lines(tmp_path, "empty.jsonl", [])
  cases = [
      (["ckpt", "--benchmark", "demo", "--data", "test.jsonl", "--out", "o1"], "test.jsonl line 4: invalid JSON"),
      (["ckpt", "--benchmark", "demo", "--data", "empty.jsonl", "--out", "o2"], "no demo items in"),
      (["ckpt", "--benchmark", "nope", "--data", "empty.jsonl", "--out", "o3"], "unknown benchmark 'nope'"),
      (["ckpt", "--benchmark", "demo", "--data", "missing.jsonl", "--out", "o4"], "missing.jsonl: no such file"),
      (["ckpt", "--benchmark", "demo", "--data", "test.jsonl", "--out", "o5", "--limit", "0"], "--limit must be"),
      (["ckpt", "--benchmark", "mia_bench", "--data", "test.jsonl", "--out", "o6"], "scored by a judge"),
      (["nockpt", "--benchmark", "demo", "--data", "test.jsonl", "--out", "o7"], "nockpt"),
  ]
  assert empty.exists() and data.exists()
  for args, message in cases:
    done = _cli(*args, cwd=tmp_path)
    assert done.returncode != 0, (args, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert message in done.stderr, (args, done.stderr)
    assert done.stderr.strip().count("\n") == 0, done.stderr  # one line
    assert not (tmp_path / args[args.index("--out") + 1]).exists()


def test_the_sampling_seed_reaches_the_sampler_and_keys_the_predictions(tmp_path):
  """--seed: sampled evals with other seeds are other runs (pass@k over seeds); greedy ignores it, and
  seed 0 keeps the run key that predictions had before the flag existed."""
  data = tmp_path / "test.jsonl"
  _demo_file(data)
  seen = []

  class Recording(Fixed):
    def generate(self, prompts, params):
      seen.append(params.seed)
      return super().generate(prompts, params)

  def run(out, **kw):
    return run_eval(None, None, "demo", str(data), str(tmp_path / out), sampler=Recording("B"), encode=lambda m: m,
                    batch_size=6, checkpoint="c", **kw)

  run("s3", temperature=1.0, seed=3)
  assert seen == [3]
  with pytest.raises(ValueError, match="seed"):
    run("s3", temperature=1.0, seed=4)
  run("greedy", seed=5)
  run("greedy")                                   # greedy: the seed is not part of the run
  assert seen == [3, 0]
  key = json.loads((tmp_path / "greedy" / "run.json").read_text())["key"]
  assert "seed" not in key
