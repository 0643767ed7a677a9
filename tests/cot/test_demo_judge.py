"""The demo's step judge accepts every worked solution of the demo data and rejects lucky letters."""

import json
import os
import subprocess
import sys

from train.cot.demo_judge import steps_ok
from train.data.demo import write_demo_dataset


def test_every_demo_solution_is_sound_and_a_lucky_letter_is_not(tmp_path):
  write_demo_dataset(str(tmp_path), seed=0, with_tfds=False, scale=0.05)
  n = 0
  for line in open(os.path.join(tmp_path, "train_reasoning.jsonl")):
    r = json.loads(line)
    question = r["messages"][0]["content"][-1]["text"]
    assert steps_ok(question, r["solution"], r["answer"]), r["solution"]
    wrong = "ABCD"[("ABCD".index(r["answer"]) + 1) % 4]
    lucky = r["solution"].replace(f"That is option {r['answer']}.", f"That is option {wrong}.")
    assert not steps_ok(question, lucky, wrong)
    n += 1
  assert n > 10


def test_speaks_json_lines():
  q = "How many?\nA. one\nB. two\nC. four\nD. five\nAnswer with the option's letter."
  lines = [{"id": "a", "question": q, "thinking": "The blue ones are the triangle, so one. That is option B.",
            "answer": "B"},
           {"id": "b", "question": q, "thinking": "There are two. That is option B.", "answer": "B"}]
  out = subprocess.run([sys.executable, "-m", "train.cot.demo_judge"], input="\n".join(map(json.dumps, lines)),
                       capture_output=True, text=True, check=True).stdout
  assert [json.loads(x) for x in out.splitlines()] == [{"id": "a", "steps_ok": False}, {"id": "b", "steps_ok": True}]
