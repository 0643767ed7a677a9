"""Rule verifiers and the registry on hand-made pass / fail responses."""

from __future__ import annotations

import numpy as np
import pytest

from train.rewards import registry
from train.rewards.rule import infer_kind, score_answer


@pytest.mark.parametrize("response,reference,kind,options,expected", [
  ("<think>A or C? Probably A.</think>The answer is C.", "C", None, None, 1.0),
  ("<think>It is C.</think>The answer is (A).", "C", None, None, 0.0),
  ("B. red", "red", "choice", ["blue", "red", "green"], 1.0),
  ("I pick the green one.", "B", "choice", ["blue", "red", "green"], 0.0),
  ("no idea", "B", "choice", ["blue", "red"], 0.0),
  ("So the total is \\boxed{1,250}.", "1250", None, None, 1.0),
  ("The answer is 3.14159", "3.14", "number", None, 1.0),
  ("The answer is 3.5", "3.14", "number", None, 0.0),
  ("Answer: \\frac{3}{4}", "0.75", "number", None, 1.0),
  ("It costs 12 dollars; answer: 13", "12", "number", None, 0.0),
  ("Final answer: Paris", "paris", "exact", None, 1.0),
  ("Final answer: Paris, France", "paris", "exact", None, 0.0),
  ("Final answer: Paris, France", "paris", "text", None, 1.0),
  ("Final answer: London", "paris", "text", None, 0.0),
  ("Final answer: London", ["paris", "london"], "text", None, 1.0),
  ("so x = \\boxed{42}", "42", "boxed", None, 1.0),
  ("so x = 42", "42", "boxed", None, 0.0),
  ("so x = \\boxed{\\text{blue}}", "Blue", "boxed", None, 1.0),
  ("so x = \\boxed{41}", "42", "boxed", None, 0.0),
])
def test_score_answer(response, reference, kind, options, expected):
  assert score_answer(response, reference, kind=kind, options=options) == expected


def test_tolerance_is_configurable():
  assert score_answer("answer: 100.5", "100", kind="number") == 0.0  # the evaluation's rule: two decimals
  assert score_answer("answer: 100.5", "100", kind="number", rel_tol=1e-2) == 1.0
  assert score_answer("answer: 100.5", "100", kind="number", rel_tol=1e-3) == 0.0
  assert score_answer("answer: 100.5", ["7", "100"], kind="number", rel_tol=1e-2) == 1.0


def test_math_kind_uses_math_verify():
  assert score_answer("so the result is $\\boxed{\\frac{1}{2}}$", "0.5", kind="math") == 1.0
  assert score_answer("\\boxed{x^2 + 2x + 1}", "(x+1)^2", kind="math") == 1.0
  assert score_answer("\\boxed{x^2 + 1}", "(x+1)^2", kind="math") == 0.0
  assert score_answer("\\boxed{\\sqrt{2}/2}", "\\frac{1}{\\sqrt{2}}") == 1.0  # auto: LaTeX reference -> math


def test_infer_kind():
  assert infer_kind("B") == "choice"
  assert infer_kind("red", ["red", "blue"]) == "choice"
  assert infer_kind("-2.5") == "number"
  assert infer_kind("a red ball") == "text"
  assert infer_kind("\\frac{1}{2}") == "math"


def test_bad_references_are_one_line_errors():
  with pytest.raises(ValueError, match="neither a letter"):
    score_answer("A", "purple", kind="choice", options=["red", "blue"])
  with pytest.raises(ValueError, match="unknown answer kind"):
    score_answer("A", "A", kind="essay")


def test_registry_answer_reward_and_combine():
  samples = [{"id": "a", "answer": "B", "options": ["x", "y"]},
             {"id": "b", "answer": "7", "answer_kind": "number"}]
  fn = registry.build("answer")
  np.testing.assert_array_equal(fn(samples, ["The answer is B", "it is 8"]), [1.0, 0.0])
  combined = registry.combine([{"name": "answer", "weight": 2.0},
                               {"name": "answer", "key": "strict", "weight": 0.5, "kind": "exact"}])
  total, parts = combined(samples, ["The answer is (B)", "Answer: 7"])
  np.testing.assert_array_equal(parts["answer"], [1.0, 1.0])
  np.testing.assert_array_equal(parts["strict"], [0.0, 1.0])
  np.testing.assert_allclose(total, [2.0, 2.5])
  total, _ = registry.combine({"answer": 3.0})(samples, ["B", "7"])
  np.testing.assert_allclose(total, [3.0, 3.0])


def test_registry_errors():
  with pytest.raises(ValueError, match="unknown reward 'nope'"):
    registry.build("nope")
  with pytest.raises(ValueError, match="bad options"):
    registry.build("answer", colour="red")
  with pytest.raises(ValueError, match="appears twice"):
    registry.combine([{"name": "answer"}, {"name": "answer"}])
  with pytest.raises(ValueError, match="no 'answer' field"):
    registry.build("answer")([{"id": "q"}], ["B"])


def test_every_reward_is_registered():
  assert set(registry.names()) == {"answer", "think_format", "answer_present", "length_penalty", "json_format",
                                   "markdown_format", "code_block", "command", "ifeval", "judge", "pairwise",
                                   "grounded"}


def test_a_task_mixture_rewards_each_prompt_by_its_own_reward():
  """Instruction prompts (constraints, no reference) and reasoning prompts (a reference, no constraints) in
  one RL stream: each reward scores the prompts it applies to and a constant elsewhere."""
  mixed = registry.combine([{"name": "ifeval", "score": "fraction"}, {"name": "answer", "no_reference": 0.0}])
  samples = [{"id": "i", "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]},
             {"id": "r", "answer": "B", "options": ["one", "two", "three", "four"]}]
  total, _ = mixed(samples, ["all lowercase here", "<think>\ntwo\n</think>\n\nB"])
  np.testing.assert_allclose(total, [1.0, 1.0])
  total, _ = mixed(samples, ["Not Lowercase", "<think>\none\n</think>\n\nA"])
  np.testing.assert_allclose(total, [0.0, 0.0])
