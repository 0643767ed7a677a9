"""Progressive hint escalation, hint sources, pass-rate filtering and exact state round trips."""

from __future__ import annotations

import json

import pytest

from train.rl.hints import CutRule, HintTracker, hint_levels, hints_for, with_hint

SOLUTION = "Area of a circle is pi r^2.\nr = 3.\nSo area = 9 pi.\n9 pi is about 28.27.\nAnswer: 28.27"


def test_hints_from_field_and_from_solution():
  five = ["concept", "strategy", "formula", "first step", "full"]
  assert hints_for({"hints": five}) == five
  assert hints_for({"hints": {f"L{k}": h for k, h in enumerate(five, 1)}}) == five
  assert hints_for({"id": "q"}) is None
  cut = hints_for({"solution": SOLUTION})
  assert cut[0] == "Area of a circle is pi r^2."            # fraction 0 -> the first step
  assert cut[1] == "Area of a circle is pi r^2."            # ceil(0.2 * 5) = 1
  assert cut[2] == "Area of a circle is pi r^2.\nr = 3."    # ceil(0.4 * 5) = 2
  assert cut[4] == SOLUTION
  by_sentence = hints_for({"solution": "One. Two. Three. Four."},
                          CutRule(split="sentences", fractions=(0.25, 0.5, 0.5, 0.75, 1.0)))
  assert by_sentence[:4] == ["One.", "One.\nTwo.", "One.\nTwo.", "One.\nTwo.\nThree."]
  with pytest.raises(ValueError, match="5 strings"):
    hints_for({"id": "x", "hints": ["a", "b"]})
  with pytest.raises(ValueError, match="needs L1..L5"):
    hints_for({"id": "x", "hints": {"L1": "a"}})
  with pytest.raises(ValueError, match="non-decreasing"):
    CutRule(fractions=(0.5, 0.1, 0.2, 0.3, 1.0))
  assert hint_levels({"solution": SOLUTION}) == cut  # "auto": several lines -> lines
  assert hint_levels({"solution": "One. Two."})[0] == "One."  # one line -> sentences
  with pytest.raises(ValueError, match="is not lines"):
    hint_levels({"solution": "x"}, rule="words")
  assert with_hint("What is the area?", "r = 3.") == "What is the area?\n\nHint: r = 3."
  assert with_hint("Q", None) == "Q"


def test_escalation_until_a_level_works():
  t = HintTracker()
  d = t.observe("p", [False] * 4, has_hints=True)
  assert (d.action, d.level) == ("escalate", 1)
  for level in (1, 2):
    assert t.current_level("p") == level
    d = t.observe("p", [False] * 4, has_hints=True)
    assert (d.action, d.level) == ("escalate", level + 1)
  d = t.observe("p", [False, True, False, False], has_hints=True)  # L3 works
  assert (d.action, d.level) == ("update", 0)
  assert t.min_hint["p"] == 3 and t.current_level("p") == 0
  # the pass rate only counts the no-hint group
  assert t.pass_rate("p") == 0.0


def test_give_up_after_l5_and_no_hints():
  t = HintTracker()
  for level in range(5):
    assert t.observe("p", [False, False], has_hints=True).action == "escalate"
  d = t.observe("p", [False, False], has_hints=True)
  assert (d.action, d.level) == ("give_up", 0) and t.gave_up["p"] == 1 and "p" not in t.min_hint
  # without a reference solution an all-wrong group just goes on (no signal), nothing escalates
  assert t.observe("q", [False] * 3, has_hints=False).action == "update"
  assert t.current_level("q") == 0
  # solved without hints: minimum hint 0
  assert t.observe("r", [True, False], has_hints=True).action == "update"
  assert t.min_hint["r"] == 0


def test_pass_rate_filter_and_shares():
  t = HintTracker()
  t.observe("all", [True] * 4, has_hints=True)
  t.observe("none", [False] * 4, has_hints=False)
  t.observe("half", [True, False, True, False], has_hints=True)
  t.observe("half", [False] * 4, has_hints=True)  # accumulates: 2 / 8
  assert t.pass_rate("half") == 0.25 and t.pass_rate("unseen") is None
  assert t.keep_for_next_round(["all", "none", "half", "unseen"]) == ["half"]
  shares = t.min_hint_shares()
  assert shares["none"] == 1.0 and shares["L1"] == 0.0


def test_state_round_trip_is_exact():
  t = HintTracker(max_level=3)
  t.observe("a", [False], has_hints=True)
  t.observe("a", [False], has_hints=True)
  t.observe("b", [True, False], has_hints=True)
  restored = HintTracker.from_state_dict(json.loads(json.dumps(t.state_dict())))
  assert restored == t
  # and it continues identically
  assert restored.observe("a", [False], has_hints=True) == t.observe("a", [False], has_hints=True)
  assert restored.observe("a", [False], has_hints=True).action == "give_up"
