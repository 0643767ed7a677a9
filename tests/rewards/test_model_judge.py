"""Judges that are our checkpoints (train/rewards/model_judge.py) on a tiny random model: the callable's
replies are the sampler's greedy answers to the judging prompt (mode suffix included), rewards built from
`ckpt:` in a config judge both orders of every pair and count the replies they cannot parse; the reward
model's SFT manifest (train/rewards/rm_data.py) holds both orders, with and without thinking."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.cli.helpers import converted_text_model, demo_tokenizer
from train.rewards import registry
from train.rewards.judge import parse_score
from train.rewards.model_judge import judge_from_checkpoint
from train.rewards.pairwise import parse_preference


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  d = tmp_path_factory.mktemp("judge_ckpt")
  tok = demo_tokenizer(d / "tokenizer")
  converted_text_model(d / "ckpt", seed=3, tokenizer=tok)
  return str(d / "ckpt")


def _recording(judge):
  seen = {"prompts": [], "replies": []}

  def wrapped(prompts):
    replies = judge(prompts)
    seen["prompts"] += list(prompts)
    seen["replies"] += list(replies)
    return replies
  return wrapped, seen


def test_replies_are_the_samplers_greedy_answers(ckpt):
  from keye_jax import checkpoint_io
  from keye_jax.generate import Sampler, SamplingParams, encode_messages
  from keye_jax.processing.tokenizer import load_tokenizer
  judge = judge_from_checkpoint(ckpt, max_new_tokens=6, thinking=False)
  assert judge_from_checkpoint(ckpt, max_new_tokens=6, thinking=False) is judge  # loaded once
  prompts = ["Which answer is better? [[A]] or [[B]]", "Score it out of 10."]
  replies = judge(prompts)
  tok = load_tokenizer(checkpoint_io.tokenizer_dir(ckpt))
  _, model = checkpoint_io.load_model(ckpt)
  want = Sampler(model, tok).generate(
      [encode_messages([{"role": "user", "content": [{"type": "text", "text": p + " /no_think"}]}], tok, thinking=False)
       for p in prompts], SamplingParams(max_new_tokens=6))
  assert replies == [g.text for g in want]
  assert judge([]) == []


def test_pairwise_from_ckpt_judges_both_orders_and_counts_unparsable(ckpt):
  reward = registry.build("pairwise", ckpt=ckpt, ckpt_options={"max_new_tokens": 6, "thinking": False})
  reward.judge, seen = _recording(reward.judge)
  samples = [{"id": "q1", "prompt": "What colour?", "answer": "red"},
             {"id": "q2", "prompt": "How many?", "answer": "three"}]
  out = reward(samples, ["blue", "3"])
  assert out.shape == (2,) and len(seen["prompts"]) == 4 and reward.stats["judged"] == 4
  for k, (resp, ref) in enumerate([("blue", "red"), ("3", "three")]):  # (response, reference) then swapped
    first, second = seen["prompts"][2 * k], seen["prompts"][2 * k + 1]
    assert first.index(f"[Answer A]\n{resp}") < first.index(f"[Answer B]\n{ref}")
    assert second.index(f"[Answer A]\n{ref}") < second.index(f"[Answer B]\n{resp}")
  probs = [parse_preference(r) for r in seen["replies"]]
  assert reward.stats["unparsable"] == sum(p is None for p in probs)
  p = [0.5 if q is None else q for q in probs]
  np.testing.assert_allclose(out, [(p[0] + 1 - p[1]) / 2, (p[2] + 1 - p[3]) / 2], rtol=1e-6)

  # a judge that always prefers the first position: both orders cancel it
  reward.judge = lambda prompts: ["[[A]]"] * len(prompts)
  np.testing.assert_allclose(reward(samples, ["blue", "3"]), [0.5, 0.5])


def test_judge_and_grounded_from_ckpt(ckpt):
  judge = registry.build("judge", aspect="safety", ckpt=ckpt, ckpt_options={"max_new_tokens": 6, "thinking": False})
  grounded = registry.build("grounded", ckpt=ckpt, ckpt_options={"max_new_tokens": 6, "thinking": False})
  assert judge.judge is grounded.judge  # one checkpoint, one model in memory
  judge.judge, seen = _recording(judge.judge)
  scores = judge([{"prompt": "Say hi."}], ["hi"])
  parsed = parse_score(seen["replies"][0])
  assert judge.stats == {"judged": 1, "unparsable": int(parsed is None)}
  assert scores[0] == (0.0 if parsed is None else parsed)  # unparsable scores 0, never 1
  out = grounded([{"prompt": "Where?", "context": ["Paris is in France."]}], ["France"])
  assert out.shape == (1,) and grounded.stats["judged"] == 1


def test_ckpt_option_errors(ckpt, tmp_path):
  with pytest.raises(ValueError, match="ckpt_options: unknown option 'beams'"):
    registry.build("pairwise", ckpt=ckpt, ckpt_options={"beams": 2})
  with pytest.raises(ValueError, match="give one judge"):
    registry.build("pairwise", ckpt=ckpt, cmd="cat")
  with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
    registry.build("pairwise", ckpt=str(tmp_path / "nothing"))


def test_rm_manifest_both_orders_with_and_without_thinking(tmp_path):
  from train.rewards.rm_data import main
  pairs = [{"id": "a", "prompt": "Colour?", "images": ["pic.png"], "chosen": "red", "rejected": "blue",
            "rationale": "The left half is red."},
           {"id": "b", "messages": [{"role": "user", "content": [{"type": "text", "text": "Count?"}]}],
            "chosen": "two", "rejected": {"role": "assistant", "content": "five"}}]
  (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
  assert main([str(tmp_path / "pairs.jsonl"), str(tmp_path / "rm" / "sft.jsonl")]) == 0
  rows = [json.loads(x) for x in (tmp_path / "rm" / "sft.jsonl").read_text().splitlines()]
  # pair a: no-think and think, both orders; pair b (no rationale): no-think, both orders
  assert [r["id"] for r in rows] == ["a:A", "a:B", "a:A", "a:B", "b:A", "b:B"]
  answers = [r["messages"][1]["content"][0]["text"] for r in rows]
  assert answers[0] == "<think>\n\n</think>\n\n[[A]]" and answers[3].startswith("<think>\nThe left half is red.")
  assert answers[3].endswith("[[B]]") and answers[5].endswith("[[B]]")
  assert rows[0]["messages"][0]["content"][0] == {"type": "image", "image": str(tmp_path / "pic.png")}
  assert "[Answer A]\nred" in rows[0]["messages"][0]["content"][1]["text"]
  assert "[Answer A]\nfive" in rows[5]["messages"][0]["content"][0]["text"]
  (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
  assert main([str(tmp_path / "bad.jsonl"), str(tmp_path / "out.jsonl")]) == 1
