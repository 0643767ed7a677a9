"""Judge reply parsing, the generative judge and grounded rewards, and the pairwise reward's order swap."""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest

from train.rewards import registry
from train.rewards.judge import parse_score
from train.rewards.pairwise import pair_sft_records, parse_preference


@pytest.mark.parametrize("reply,expected", [
  ('{"score": 8}', 0.8),
  ('Reasoning...\n```json\n{"Score": 7, "notes": "ok"}\n```', 0.7),
  ('{"rating": "9/10"}', 0.9),
  ("**Score:** 6/10", 0.6),
  ("## Agreement\n4/10\n## Overall\n**Total: 7 out of 10**\nThanks, 3/5 of reviewers...", 0.7),
  ("### Score\nScore: **5**", 0.5),
  ("<think>maybe 2/10? no</think>Final score: 9/10", 0.9),
  ("Verdict: correct", 1.0),
  ("Judgement: **incorrect**", 0.0),
  ("Answer: unsafe", 0.0),
  ("The answer looks fine to me.", None),
  ("Score: 12/10", None),            # out of range: not clamped into a score
  ('{"comment": "good"}', None),
  ("", None),
])
def test_parse_score(reply, expected):
  got = parse_score(reply)
  assert got == pytest.approx(expected) if expected is not None else got is None


def test_parse_score_scale():
  assert parse_score('{"score": 4}', scale=5) == pytest.approx(0.8)
  assert parse_score("Rating: 1", scale=1) == 1.0


def fake_judge(replies):
  seen = []

  def judge(prompts):
    seen.extend(prompts)
    return [replies(p) for p in prompts]
  judge.seen = seen
  return judge


def test_judge_reward_agreement_and_unparsable_counting():
  judge = fake_judge(lambda p: '{"score": 10}' if "[Response's final answer]\n42" in p else
                     "I cannot decide." if "unsure" in p else "Score: 1/10")
  fn = registry.build("judge", aspect="agreement", judge=judge)
  sample = {"id": "q", "prompt": "What is 6 x 7?", "answer": "42"}
  out = fn([sample] * 3, ["<think>6*7</think>42", "41", "unsure"])
  np.testing.assert_allclose(out, [1.0, 0.1, 0.0])
  assert fn.stats == {"judged": 3, "unparsable": 1}
  assert "[Reference answer]\n42" in judge.seen[0] and "6*7" not in judge.seen[0]  # answer part only
  fn = registry.build("judge", aspect="agreement", judge=judge, unparsable_score=0.5)
  assert fn([sample], ["unsure"]).tolist() == [0.5]
  with pytest.raises(ValueError, match="has no 'reference'"):
    fn([{"id": "x", "prompt": "?"}], ["1"])


def test_consistency_and_safety_templates_show_what_they_judge():
  judge = fake_judge(lambda p: "Verdict: consistent" if "[Reasoning]\n3 circles" in p else "Verdict: yes")
  fn = registry.build("judge", aspect="consistency", judge=judge)
  assert fn([{"prompt": "How many?"}], ["<think>3 circles</think>3"]).tolist() == [1.0]
  assert "[Final answer]\n3" in judge.seen[0]
  fn = registry.build("judge", aspect="safety", judge=fake_judge(lambda p: "Answer: unsafe"))
  assert fn([{"prompt": "How do I ...?"}], ["Here is how ..."]).tolist() == [0.0]
  with pytest.raises(ValueError, match="exactly one of 'cmd'"):
    registry.build("judge")
  with pytest.raises(ValueError, match="is not one of"):
    registry.build("judge", aspect="style", judge=judge)


def test_judge_command(tmp_path):
  program = tmp_path / "judge.py"
  program.write_text(textwrap.dedent("""
    import json, sys
    for line in sys.stdin:
      m = json.loads(line)
      print(json.dumps({"reply": "**Score: 10/10**" if "Paris" in m["prompt"] else "Score: 0/10"}), flush=True)
  """))
  fn = registry.build("judge", cmd=[sys.executable, str(program)], timeout=20)
  try:
    sample = {"prompt": "Capital of France?", "answer": "Paris"}
    assert fn([sample, {**sample, "answer": "Rome"}], ["Paris", "Rome"]).tolist() == [1.0, 0.0]
  finally:
    fn.judge.process.close()


def test_grounded():
  def judge(prompts):
    return ["Score: 9/10" if "blue" in p.split("[Answer]")[1] else "Score: 2/10" for p in prompts]
  fn = registry.build("grounded", judge=judge)
  sample = {"prompt": "What colour is the car?", "context": ["The car is blue.", "It was built in 1990."]}
  np.testing.assert_allclose(fn([sample] * 2, ["It is blue.", "It is red."]), [0.9, 0.2])
  with pytest.raises(ValueError, match="has no 'context'"):
    fn([{"id": "n", "prompt": "?"}], ["x"])


@pytest.mark.parametrize("reply,expected", [
  (0.7, 0.7), ("[[A]]", 1.0), ("thinking [[A]] ... final: [[B]]", 0.0), ("[[tie]]", 0.5),
  ('{"winner": "B"}', 0.0), ('{"p_a": 0.25}', 0.25), ("**Answer A is better.**", 1.0),
  ("Verdict: B", 0.0), ("<think>[[A]]?</think>Better answer: B", 0.0), ("Both are fine.", None), (1.5, None),
])
def test_parse_preference(reply, expected):
  got = parse_preference(reply)
  assert got == pytest.approx(expected) if expected is not None else got is None


def biased_judge(prefer, bias):
  """P(A better) = 0.5 + 0.3 * (A is the preferred text - B is) + bias (a position bias towards A)."""
  def judge(prompts):
    out = []
    for p in prompts:
      a = p.split("[Answer A]\n")[1].split("\n\n[Answer B]")[0]
      b = p.split("[Answer B]\n")[1].split("\n\nWhich")[0]
      out.append(0.5 + 0.3 * ((a == prefer) - (b == prefer)) + bias)
    return out
  return judge


def test_pairwise_order_swap_cancels_position_bias():
  sample = {"id": "q", "prompt": "Describe.", "answer": "reference text"}
  for bias in (0.0, 0.15):
    fn = registry.build("pairwise", judge=biased_judge("good", bias))
    np.testing.assert_allclose(fn([sample] * 2, ["good", "meh"]), [0.8, 0.5], atol=1e-6)
  # one order only would have given 0.95 / 0.65 with the bias: the swap is what removes it


def test_pairwise_siblings():
  fn = registry.build("pairwise", against="siblings", judge=biased_judge("best", 0.1))
  samples = [{"id": "q1", "prompt": "p"}] * 3 + [{"id": "q2", "prompt": "p"}]
  out = fn(samples, ["best", "x", "<think>long</think>y", "alone"])
  # best beats each sibling with 0.8; x and y tie (0.5) and lose to best (0.2); a lone response: 0.5
  np.testing.assert_allclose(out, [0.8, 0.35, 0.35, 0.5], atol=1e-6)


def test_pairwise_unparsable_is_a_counted_tie():
  fn = registry.build("pairwise", judge=lambda prompts: ["hmm"] * len(prompts))
  assert fn([{"prompt": "p", "answer": "r"}], ["x"]).tolist() == [0.5]
  assert fn.stats == {"judged": 2, "unparsable": 2}


def test_pair_sft_records_both_orders():
  pair = {"id": "p1", "prompt": "Which shape?", "chosen": "A circle.", "rejected": "A cat.",
          "images": ["img/1.png"], "rationale": "The image shows a round outline."}
  plain = pair_sft_records(pair)
  assert [r["id"] for r in plain] == ["p1:A", "p1:B"]
  first_user, first_answer = plain[0]["messages"][0]["content"], plain[0]["messages"][1]["content"][0]["text"]
  assert first_user[0] == {"type": "image", "image": "img/1.png"}
  assert "[Answer A]\nA circle." in first_user[1]["text"] and first_answer.endswith("[[A]]")
  assert "[Answer A]\nA cat." in plain[1]["messages"][0]["content"][1]["text"]
  assert plain[1]["messages"][1]["content"][0]["text"].endswith("[[B]]")
  thought = pair_sft_records(pair, thinking=True)[0]["messages"][1]["content"][0]["text"]
  assert thought.startswith("<think>\nThe image shows") and json.dumps(thought)
  with pytest.raises(ValueError, match="needs a 'rationale'"):
    pair_sft_records({**pair, "rationale": None}, thinking=True)
