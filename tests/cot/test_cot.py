"""`keye cot` on small generated data with a scripted sampler (deterministic grades), plus one run of the
real jitted sampler on the tiny model: each step, resume after interruption, the review queue round trip,
bad input, RFT, the CLI's result line."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from train.cot import assess, review
from train.cot.collect import collect, with_mode
from train.cot.config import CotConfig, JudgeConfig, ManifestConfig, load_cot_config
from train.cot.run import run
from train.cot.traces import Sample, confidences, step_spans, token_ends


class ScriptedBackend:
  """Responses chosen by question text and sample index; every character is one 'token' with log-prob
  -0.1 (or -5 inside a step containing 'guess', so that step is unsure)."""

  def __init__(self, tokenizer, script):
    self.tokenizer, self.script, self.calls = tokenizer, script, 0

  def generate(self, requests, n, seed, **kw):
    self.calls += 1
    out = []
    for messages, _ in requests:
      q = messages[-1]["content"] if isinstance(messages[-1]["content"], str) else messages[-1]["content"][-1]["text"]
      assert q.endswith(("/think", "/no_think"))
      row = []
      for k in range(n):
        text = self.script(q, k)
        ids = self.tokenizer.encode(text)
        ends = token_ends(ids, lambda t: self.tokenizer.decode(t, skip_special_tokens=True))
        unsure = [(a, b) for a, b in step_spans(text) if "guess" in text[a:b]]
        lps = [-5.0 if any(a < e <= b for a, b in unsure) else -0.1 for e in ends]
        row.append(Sample(text, ids, lps))
      out.append(row)
    return out

  def texts(self, asks, max_new_tokens):
    return ["correct" for _ in asks]


def script(q, k):
  if "2 + 3" in q:
    return ["<think>\n1. two plus three\n2. is five\n</think>\n\n5", "<think>\nI guess six\n</think>\n\n6",
            "<think>\n2 + 3 = 5\n</think>\n\nThe answer is 5", "<think>\nfour\n\nfive"][k]
  if "red" in q:
    return ["<think>\nThere are two red shapes.\n</think>\n\n(B) two", "<think>\nguess\n</think>\n\nA",
            "<think>\nCounting the red ones: two.\n</think>\n\nB", ""][k]
  return ["<think>\nwords\n</think>\n\nblue", "<think>\nsky\n</think>\n\nblue", "blue", "<think>\nguess\n</think>\n\nblue"][k]


@pytest.fixture()
def data(tmp_path):
  img = np.zeros((56, 56, 3), np.uint8)
  img[:28, :28] = (255, 0, 0)
  Image.fromarray(img).save(tmp_path / "shapes.png")
  records = [
      {"id": "m1", "messages": [{"role": "user", "content": "What is 2 + 3?"}], "answer": "5"},
      {"id": "i1", "messages": [{"role": "user", "content": [{"type": "image", "image": "shapes.png"},
                                                             {"type": "text", "text": "How many red shapes? /think"}]},
                                {"role": "assistant", "content": "<think>\nx\n</think>\n\nB"}],
       "options": ["one", "two", "three"]},
      {"id": "t1", "messages": [{"role": "user", "content": "Colour of the sky?"},
                                {"role": "assistant", "content": "blue"}]},
      {"id": "bad1", "messages": [{"role": "user", "content": [{"type": "image", "image": "missing.png"},
                                                               {"type": "text", "text": "?"}]}], "answer": "A"},
      {"id": "bad2", "messages": [{"role": "user", "content": "No answer here"}]},
      {"id": "bad3", "messages": [{"role": "user", "content": "Empty"}], "answer": "  "},
  ]
  with open(tmp_path / "mixed.jsonl", "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  return tmp_path


def _cfg(data, **kw):
  base = dict(manifests=(ManifestConfig(path=str(data / "mixed.jsonl"), name="mixed"),), out=str(data / "out"),
              samples_per_prompt=4, batch_size=1, borderline_confidence=-1.0,
              judge=JudgeConfig(kind="confidence", min_step_confidence=-1.0))
  return CotConfig(**{**base, **kw})


def test_step_spans_and_confidences():
  text = "<think>\n1. first\n2. second\n\nthird\n</think>\n\nanswer"
  thinking = text[len("<think>\n"):text.index("\n</think>")]
  assert [thinking[a:b].strip() for a, b in step_spans(thinking)] == ["1. first", "2. second", "third"]
  ends = list(range(1, len(text) + 1))                       # one token per character
  lps = [-1.0 if i < text.index("2.") else -3.0 for i in range(len(text))]
  conf, steps, texts = confidences(text, lps, ends)
  assert texts == ["1. first", "2. second", "third"]
  assert steps[0] == -1.0 and steps[1] == -3.0 and conf == pytest.approx(np.mean(lps))
  assert confidences("", [], [])[0] == float("-inf")


def test_collect_skips_and_counts_bad_records(data):
  prompts, skipped = collect([ManifestConfig(path=str(data / "mixed.jsonl"), name="mixed")], min_task_size=5)
  assert [p["id"] for p in prompts] == ["mixed/m1", "mixed/i1", "mixed/t1"]
  assert skipped == {"missing_media": 1, "empty_answer": 2}
  assert prompts[1]["answer"] == "B" and prompts[2]["answer"] == "blue"   # from the final assistant turn
  assert all(p["task"] == "merged" for p in prompts)                       # a 3-prompt task is small
  assert prompts[1]["question"] == "How many red shapes?"                  # mode suffix gone
  assert with_mode(prompts[1]["messages"], "no_think")[-1]["content"][-1]["text"].endswith("shapes? /no_think")
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    collect([ManifestConfig(path=str(data / "nope.jsonl"))])
  (data / "broken.jsonl").write_text('{"messages": []}\n{oops\n')
  with pytest.raises(ValueError, match="broken.jsonl line 2: invalid JSON"):
    collect([ManifestConfig(path=str(data / "broken.jsonl"))])


def test_grades_review_round_trip_and_manifest(data, tokenizer):
  backend = ScriptedBackend(tokenizer, script)
  result = run(_cfg(data), backend=backend, process_index=0, process_count=1)
  assert result["prompts"] == 3 and result["traces"] == 12
  out = data / "out"
  assessed = {t["id"]: t for t in map(json.loads, open(out / "assessed.jsonl"))}
  g = {k: t["grade"] for k, t in assessed.items()}
  assert [g[f"mixed/m1#{k}"] for k in range(4)] == ["A", "C", "A", "B"]     # wrong+unsure = C; cut off = B
  assert [g[f"mixed/i1#{k}"] for k in range(4)] == ["A", "C", "A", "C"]     # "" is C (empty response)
  assert g["mixed/t1#3"] == "B"                                             # right answer, unsure step
  assert assessed["mixed/t1#2"]["reason"] == "answer verified, no reasoning"   # "blue": no think block
  assert result["grades"] == {"A": 6, "B": 3, "C": 3}
  assert result["pass_rate"] == {"mixed": pytest.approx(8 / 12)}
  for name in ("report.json", "lengths.png", "confidence.png", "sft.jsonl"):
    assert (out / name).stat().st_size > 0
  queue = [json.loads(l) for l in open(out / "review" / "queue.jsonl")]
  assert sorted(q["id"] for q in queue) == ["mixed/m1#3", "mixed/t1#2", "mixed/t1#3"]
  sft = [json.loads(l) for l in open(out / "sft.jsonl")]
  ids = [r["id"].split("~")[0] for r in sft]
  assert set(ids) == {k for k, v in g.items() if v == "A"}
  rec = next(r for r in sft if r["id"] == "mixed/i1#0")
  assert rec["messages"][0]["content"][0]["image"] == "../shapes.png"       # media relative to the manifest
  assert rec["messages"][0]["content"][-1]["text"].endswith("/think")
  assert rec["messages"][-1]["content"] == "<think>\nThere are two red shapes.\n</think>\n\n(B) two"
  assert set(rec["provenance"]) >= {"prompt_id", "sample", "confidence", "step_confidences", "grade", "score"}
  assert all(len([i for i in ids if i == k]) == (2 if r["provenance"]["score"] >= 4 else 1)
             for k, r in ((r["id"], r) for r in sft if "~" not in r["id"]))
  # The SFT manifest is what the training pipeline reads.
  from keye_jax.processing.chat import encode_example
  ex = encode_example(rec["messages"], tokenizer, base_dir=str(out))
  assert ex["loss_mask"].any()

  # Review: repair the cut-off trace, drop the others; import -> the repaired one is kept.
  fixed = dict(next(q for q in queue if q["id"] == "mixed/m1#3"))
  fixed.update(response="<think>\nfour\n\nfive\n</think>\n\n5", decision="keep", score=5)
  others = [q | {"decision": "drop"} for q in queue if q["id"] != fixed["id"]]
  (out / "review" / "reviewed.jsonl").write_text("".join(json.dumps(q) + "\n" for q in [fixed, *others]))
  calls = backend.calls
  again = run(_cfg(data), backend=backend, process_index=0, process_count=1)
  assert backend.calls == calls                                             # nothing sampled again
  assert again["review"] | {} == {"queued": 3, "kept": 1, "dropped": 2, "pending": 0}
  sft = [json.loads(l) for l in open(out / "sft.jsonl")]
  assert sum(r["id"].startswith("mixed/m1#3") for r in sft) == 2            # reviewer score 5: upsampled
  assert next(r for r in sft if r["id"] == "mixed/m1#3")["provenance"]["reviewed"]


def test_review_import_errors_name_the_line(data, tokenizer):
  run(_cfg(data), backend=ScriptedBackend(tokenizer, script), process_index=0, process_count=1)
  out = data / "out"
  assessed = [json.loads(l) for l in open(out / "assessed.jsonl")]
  prompts = {p["id"]: p for p in map(json.loads, open(out / "prompts.0-of-1.jsonl"))}
  path = out / "review" / "edited.jsonl"
  good = {"id": "mixed/m1#3", "response": "<think>\nx\n</think>\n\n5", "decision": "keep"}
  cases = [
      ("{not json\n", "edited.jsonl line 1: invalid JSON"),
      (json.dumps(good) + "\n" + json.dumps({**good, "id": "mixed/zz#0"}) + "\n", "edited.jsonl line 2: unknown trace id"),
      (json.dumps({**good, "response": "<think>\nx\n</think>\n\n7"}) + "\n", "edited.jsonl line 1: .*does not verify"),
      (json.dumps({**good, "decision": "maybe"}) + "\n", "edited.jsonl line 1: decision"),
      (json.dumps({**good, "score": 9}) + "\n", "edited.jsonl line 1: score"),
  ]
  for text, msg in cases:
    path.write_text(text)
    with pytest.raises(ValueError, match=msg):
      review.import_reviewed(str(path), assessed, prompts)
  path.write_text(json.dumps({**good, "decision": None}) + "\n")
  assert review.import_reviewed(str(path), assessed, prompts)[1] == {"kept": 0, "dropped": 0, "pending": 1}


def test_resume_after_interruption(data, tokenizer):
  class Crash(Exception):
    pass

  class Flaky(ScriptedBackend):
    def generate(self, requests, n, seed, **kw):
      if self.calls == 2:
        raise Crash()
      return super().generate(requests, n, seed, **kw)

  with pytest.raises(Crash):
    run(_cfg(data), backend=Flaky(tokenizer, script), process_index=0, process_count=1)
  out = data / "out"
  done = [json.loads(l) for l in open(out / "traces.0-of-1.jsonl")]
  assert len(done) == 8 and not (out / "traces.0-of-1.jsonl.done").exists()
  with open(out / "traces.0-of-1.jsonl", "a") as f:        # a line cut in half by the interruption
    f.write('{"id": "mixed/t1#0", "chu')
  backend = ScriptedBackend(tokenizer, script)
  result = run(_cfg(data), backend=backend, process_index=0, process_count=1)
  assert backend.calls == 1 and result["traces"] == 12      # only the third prompt was sampled
  fresh = run(_cfg(data, out=str(data / "fresh")), backend=ScriptedBackend(tokenizer, script),
              process_index=0, process_count=1)
  strip = lambda p: [{k: v for k, v in json.loads(l).items()} for l in open(p)]
  assert strip(out / "sft.jsonl") == [
      {**r} for r in strip(data / "fresh" / "sft.jsonl")]   # same manifest as an uninterrupted run


def test_sharded_over_hosts(data, tokenizer):
  cfg = _cfg(data)
  r1 = run(cfg, backend=ScriptedBackend(tokenizer, script), process_index=1, process_count=2)
  assert r1["host"] == 1 and r1["prompts"] == 1
  r0 = run(cfg, backend=ScriptedBackend(tokenizer, script), process_index=0, process_count=2)
  assert r0["prompts"] == 3 and r0["traces"] == 12 and r0["grades"] == {"A": 6, "B": 3, "C": 3}


def test_rft_keeps_verified_answers(data, tokenizer):
  result = run(_cfg(data, mode="rft"), backend=ScriptedBackend(tokenizer, script), process_index=0,
               process_count=1)
  sft = [json.loads(l) for l in open(data / "out" / "sft.jsonl")]
  assert len(sft) == result["kept"] == 8                    # every verified answer, once
  assert not (data / "out" / "review").exists()


def test_judge_command_and_model(data, tokenizer, tmp_path):
  judge = tmp_path / "judge.py"
  judge.write_text("import json, sys\nfor l in sys.stdin:\n  o = json.loads(l)\n"
                   "  print(json.dumps({'id': o['id'], 'steps_ok': 'guess' not in o['thinking']}))\n")
  r = run(_cfg(data, judge=JudgeConfig(kind="command", command=f"{sys.executable} {judge}")),
          backend=ScriptedBackend(tokenizer, script), process_index=0, process_count=1)
  assert r["grades"]["A"] >= 6
  bad = tmp_path / "bad.py"
  bad.write_text("print('nonsense')\n")
  traces = [json.loads(l) for l in open(data / "out" / "traces.0-of-1.jsonl")]
  prompts = {p["id"]: p for p in map(json.loads, open(data / "out" / "prompts.0-of-1.jsonl"))}
  with pytest.raises(ValueError, match="output line 1"):
    assess.judge_command(traces, prompts, f"{sys.executable} {bad}")
  r = run(_cfg(data, out=str(data / "m"), judge=JudgeConfig(kind="model")),
          backend=ScriptedBackend(tokenizer, script), process_index=0, process_count=1)
  assert r["grades"]["C"] == 1   # the judge says every step is sound: only the empty response is C


def test_math_answers_use_math_verify():
  p = {"answer": "\\frac{1}{2}", "kind": "math"}
  assert assess.verify("<think>half</think>The answer is $0.5$", p)
  assert not assess.verify("<think>x</think>$\\frac{1}{3}$", p)


def test_config_and_cli(data, tokenizer, tmp_path, monkeypatch, capsys):
  cfg = tmp_path / "cot.yaml"
  cfg.write_text(f"manifests:\n  - {{path: {data / 'mixed.jsonl'}}}\nout: {tmp_path / 'o'}\nmode: bogus\n")
  with pytest.raises(ValueError, match="mode='bogus'"):
    load_cot_config(str(cfg))
  from keye_jax.cli import main
  assert main(["cot", str(cfg)]) == 2
  assert "keye cot: error: " in capsys.readouterr().err
  cfg.write_text(f"manifests:\n  - {{path: {data / 'mixed.jsonl'}}}\nout: {tmp_path / 'o'}\n")
  assert main(["cot", str(cfg)]) == 2                        # no checkpoint: one clear line
  assert "checkpoint" in capsys.readouterr().err
  from train.cot import run as run_mod
  monkeypatch.setattr(run_mod, "_make_backend", lambda c: ScriptedBackend(tokenizer, script))
  assert main(["cot", str(cfg), "samples_per_prompt=4"]) == 0
  line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert list(line)[:4] == ["prompts", "traces", "grades", "out"] and line["grades"] == {"A": 6, "B": 3, "C": 3}


def test_demo_config_loads():
  here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  cfg = load_cot_config(os.path.join(here, "configs", "demo", "cot.yaml"))
  assert cfg.thinking == "think" and cfg.manifests[0].name == "reasoning"


def test_reviewer_command_repairs_the_queue_and_duplicates_are_kept_once(data, tokenizer, tmp_path):
  # A reviewer that rewrites every queued trace of m1 into one repaired text and drops the rest.
  reviewer = tmp_path / "reviewer.py"
  reviewer.write_text(
      "import json, sys\n"
      "for line in sys.stdin:\n"
      "  q = json.loads(line)\n"
      "  fix = q['id'].startswith('mixed/m1')\n"
      "  q.update(response='<think>\\n2 + 3 = 5\\n</think>\\n\\n5', decision='keep' if fix else 'drop', score=3)\n"
      "  print(json.dumps(q))\n")
  cfg = _cfg(data, reviewer=f"python {reviewer}", borderline_confidence=-0.05)   # every A is borderline too
  result = run(cfg, backend=ScriptedBackend(tokenizer, script), process_index=0, process_count=1)
  out = data / "out"
  reviewed = [json.loads(l) for l in open(out / "review" / "reviewed.jsonl")]
  assert len(reviewed) == result["review"]["queued"] > 2
  assert result["review"]["kept"] == sum(r["decision"] == "keep" for r in reviewed) >= 2
  sft = [json.loads(l) for l in open(out / "sft.jsonl")]
  m1 = [r for r in sft if r["id"].startswith("mixed/m1")]
  assert len(m1) == 1 and m1[0]["messages"][-1]["content"] == "<think>\n2 + 3 = 5\n</think>\n\n5"
  # A failing reviewer is one clear error naming the command; nothing half-written is imported.
  import shutil
  shutil.rmtree(out / "review")
  with pytest.raises(RuntimeError, match="reviewer command"):
    run(_cfg(data, reviewer=f"{sys.executable} -c 'import sys; sys.exit(3)'"),
        backend=ScriptedBackend(tokenizer, script), process_index=0, process_count=1)
  assert not (out / "review" / "reviewed.jsonl").exists()


def test_sampler_backend_on_the_real_engine(data, tokenizer):
  """keye cot's default backend: the rollout engine over a random tiny model with the demo tokenizer's ids.
  A call's traces depend only on its seed; each Sample's tokens and log-probs line up, the stop token cut."""
  from flax import nnx
  from keye_jax import config as config_lib
  from keye_jax.model import KeyeVL
  from train.cot.traces import SamplerBackend
  cfg = config_lib.load(config_lib.KeyeConfig, "configs/model/tiny.yaml")
  backend = SamplerBackend(KeyeVL(cfg, rngs=nnx.Rngs(0)), tokenizer, max_new_tokens=6, temperature=1.0, slots=4)
  image = [{"role": "user", "content": [{"type": "image", "image": "shapes.png"},
                                        {"type": "text", "text": "How many red shapes? /think"}]}]
  text = [{"role": "user", "content": "What is 2 + 3? /think"}]
  requests = [(image, str(data)), (text, None)]
  first = backend.generate(requests, 2, seed=11)
  assert [len(row) for row in first] == [2, 2]
  for row in first:
    for s in row:
      assert len(s.tokens) == len(s.logprobs) <= 6 and all(lp <= 0 for lp in s.logprobs)
      assert not set(s.tokens) & backend.stop
  again = backend.generate(requests, 2, seed=11)
  assert [[s.tokens for s in row] for row in again] == [[s.tokens for s in row] for row in first]


def test_a_model_that_cannot_think_yet_is_sampled_without_thinking(data, tokenizer, tmp_path):
  """sample_thinking=no_think: the model answers directly, right answers are B traces (no sound steps),
  the reviewer repairs them, and the SFT manifest asks for thinking (`thinking`) as configured."""
  asked = []

  def direct(q, k):
    asked.append(q)
    return "<think>\n\n</think>\n\n5" if "2 + 3" in q else "<think>\n\n</think>\n\nblue"

  reviewer = tmp_path / "reviewer.py"
  reviewer.write_text(
      "import json, sys\n"
      "for line in sys.stdin:\n"
      "  q = json.loads(line)\n"
      "  q.update(response='<think>\\n2 + 3 = 5\\n</think>\\n\\n' + q['reference'], decision='keep', score=4)\n"
      "  print(json.dumps(q))\n")
  cfg = _cfg(data, sample_thinking="no_think", reviewer=f"python {reviewer}")
  result = run(cfg, backend=ScriptedBackend(tokenizer, direct), process_index=0, process_count=1)
  assert asked and all(q.endswith(" /no_think") for q in asked)
  assert result["grades"]["A"] == 0 and result["grades"]["B"] > 0
  sft = [json.loads(l) for l in open(data / "out" / "sft.jsonl")]
  assert sft and all(r["messages"][0]["content"][-1]["text"].endswith("/think")
                     if isinstance(r["messages"][0]["content"], list) else
                     r["messages"][0]["content"].endswith("/think") for r in sft)
  assert all(r["messages"][-1]["content"].startswith("<think>\n2 + 3 = 5") for r in sft)
  with pytest.raises(ValueError, match="sample_thinking"):
    _cfg(data, sample_thinking="maybe")
