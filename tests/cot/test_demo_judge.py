"""The demo's step judge accepts every worked solution of the demo data and rejects lucky answers."""

import json
import os
import subprocess
import sys

from train.cot.demo_judge import steps_ok
from train.data.demo import write_demo_dataset


def test_every_demo_solution_is_sound_and_a_lucky_answer_is_not(tmp_path):
  write_demo_dataset(str(tmp_path), seed=0, with_tfds=False, scale=0.05)
  n = 0
  for line in open(os.path.join(tmp_path, "train_reasoning.jsonl")):
    r = json.loads(line)
    question = r["messages"][0]["content"][-1]["text"]
    assert steps_ok(question, r["solution"], r["answer"]), r["solution"]
    wrong = str(int(r["answer"]) + 1)
    assert not steps_ok(question, r["solution"], wrong)   # counted one number, answered another
    n += 1
  assert n > 10


def test_speaks_json_lines():
  q = "How many blue shapes are there?\nAnswer with a number. /think"
  lines = [{"id": "a", "question": q, "thinking": "The blue ones are the triangle, so 1.", "answer": "2"},
           {"id": "b", "question": q, "thinking": "There are 2 circles and 1 square. 2 minus 1 is 1.", "answer": "1"}]
  out = subprocess.run([sys.executable, "-m", "train.cot.demo_judge"], input="\n".join(map(json.dumps, lines)),
                       capture_output=True, text=True, check=True).stdout
  assert [json.loads(x) for x in out.splitlines()] == [{"id": "a", "steps_ok": False}, {"id": "b", "steps_ok": True}]


def test_demo_reviewer_repairs_into_the_worked_solution_and_the_judge_accepts_it(tmp_path):
  from keye_jax.processing.thinking import split_thinking
  from train.cot.demo_reviewer import review
  write_demo_dataset(str(tmp_path), seed=0, with_tfds=False, scale=0.05)
  r = json.loads(open(os.path.join(tmp_path, "train_reasoning.jsonl")).readline())
  question = r["messages"][0]["content"][-1]["text"]
  item = {"id": "x#0", "question": question, "reference": r["answer"], "response": "C", "solution": r["solution"],
          "decision": None, "score": None}
  fixed = review(item)
  thinking, answer = split_thinking(fixed["response"])
  assert fixed["decision"] == "keep" and answer == r["answer"] and steps_ok(question, thinking, answer)
  assert review({**item, "solution": None})["decision"] == "drop"


def test_pretraining_sees_reasoning_answered_directly(tmp_path):
  """Reasoning questions join pre-training in /no_think form (no worked solution); the reasoning split
  keeps the /think question and its solution for chain-of-thought data and RL."""
  write_demo_dataset(str(tmp_path), seed=0, with_tfds=False, scale=0.05)
  pre = [json.loads(l) for name in ("train_image.jsonl", "train_video.jsonl")
         for l in open(os.path.join(tmp_path, name))]
  pre = [r for r in pre if r["category"] == "reasoning"]
  assert pre
  for r in pre:
    assert r["messages"][0]["content"][-1]["text"].endswith(" /no_think")
    assert r["messages"][1]["content"][0]["text"] == f"<think>\n\n</think>\n\n{r['answer']}"
  split = [json.loads(l) for l in open(os.path.join(tmp_path, "train_reasoning.jsonl"))]
  assert all(r["messages"][0]["content"][-1]["text"].endswith(" /think") and "</think>" in
             r["messages"][1]["content"][0]["text"] for r in split)
