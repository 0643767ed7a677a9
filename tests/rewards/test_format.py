"""Format rewards on hand-made responses that obey and break each format."""

from __future__ import annotations

import numpy as np
import pytest

from train.rewards import registry
from train.rewards.format import code_fenced, markdown_structured, think_mode, think_obeyed, valid_json


def score(name, sample, responses, **options):
  return registry.build(name, **options)([sample] * len(responses), responses).tolist()


def test_think_mode_from_record_and_prompt():
  assert think_mode({"think_mode": "no_think"}) == "no_think"
  assert think_mode({"prompt": "How many circles? /think"}) == "think"
  assert think_mode({"prompt": "How many circles? /no_think"}) == "no_think"
  assert think_mode({"prompt": "How many circles?"}) == "auto"
  with pytest.raises(ValueError, match="think_mode 'deep'"):
    think_mode({"id": "a", "think_mode": "deep"})


@pytest.mark.parametrize("response,think,no_think,auto", [
  ("<think>Two red, one blue.</think>3", True, False, True),
  ("<think>\n\n</think>\n\n3", False, True, True),
  ("3", False, True, True),
  ("<think>Two red, one blue.</think>", False, False, False),       # no answer after thinking
  ("<think>Two red, one blue. The answer is 3", False, False, False),  # never closed
  ("So: <think>x</think>3", False, False, False),                    # block not at the start
  ("<think>a</think><think>b</think>3", False, False, False),        # two blocks
])
def test_think_obeyed(response, think, no_think, auto):
  assert think_obeyed(response, "think") is think
  assert think_obeyed(response, "no_think") is no_think
  assert think_obeyed(response, "auto") is auto


def test_think_format_and_answer_present_rewards():
  sample = {"prompt": "Count them. /think"}
  assert score("think_format", sample, ["<think>count</think>3", "3"]) == [1.0, 0.0]
  assert score("answer_present", sample, ["<think>count</think>3", "<think>count</think>  ", "3"]) == [1, 0, 1]


def test_length_penalty():
  resp = [" ".join(["w"] * n) for n in (50, 80, 90, 100, 101)]
  assert score("length_penalty", {}, resp, max_length=100, buffer=20) == [0.0, 0.0, -0.5, -1.0, -1.0]
  assert score("length_penalty", {}, ["abcd", "abcdef"], max_length=5, unit="chars") == [0.0, -1.0]
  with pytest.raises(ValueError, match="not words or chars"):
    registry.build("length_penalty", max_length=5, unit="tokens")


def test_json():
  assert valid_json('{"a": [1, 2]}') and valid_json('```json\n{"a": 1}\n```')
  assert not valid_json("{'a': 1}") and not valid_json('Here: {"a": 1}')
  asked = {"format": "json"}
  assert score("json_format", asked, ['<think>make json</think>{"k": "v"}', '{"k": v}']) == [1.0, 0.0]
  assert score("json_format", {}, ['{"k": "v"}']) == [0.0]  # not asked
  assert score("json_format", {}, ['{"k": "v"}'], always=True) == [1.0]


def test_markdown():
  assert markdown_structured("# Title\nSome text")
  assert markdown_structured("Steps:\n- one\n- two")
  assert markdown_structured("| a | b |\n|---|---|\n| 1 | 2 |")
  assert not markdown_structured("Just a plain paragraph with #hashtag.")
  assert not markdown_structured("# Title\n```python\nx = 1")  # open fence
  assert not markdown_structured("```\n# not a heading\n- nor a list\n```")
  assert score("markdown_format", {"format": "markdown"}, ["## A\n1. x", "plain"]) == [1.0, 0.0]


def test_code_block():
  good = "Use this:\n```python\nprint(1)\n```\nDone."
  assert code_fenced(good) and code_fenced(good, "python") and not code_fenced(good, "rust")
  assert not code_fenced("```python\nprint(1)\n")   # never closed
  assert not code_fenced("```\n\n```")              # empty
  assert not code_fenced("print(1)")
  sample = {"format": "code", "code_language": "python"}
  np.testing.assert_array_equal(score("code_block", sample, [good, "print(1)"]), [1.0, 0.0])
