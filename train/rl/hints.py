"""Progressive hint sampling and per-prompt pass rates (pure logic; state serialises to JSON).

A prompt whose whole group fails and that has a reference solution is sampled again with a hint
appended after the query, escalating through five levels of "minimal intervention":
  L1 concept / observation, L2 strategy / method, L3 tools / formula, L4 the first concrete step,
  L5 the complete solution.
Hints come from the record's `hints` field (a list of five strings, or a mapping "L1".."L5" / 1..5), or
are cut from its reference `solution` by a `CutRule`: the solution split into steps (lines, sentences
or paragraphs), level k keeping the first ceil(fractions[k-1] * steps) of them (L5 the whole solution).

`HintTracker.observe` takes one group's correctness at the level it was sampled with and says what to
do: "update" (use the group), "escalate" (sample again at `level`), or "give_up" (even L5 failed). The
first level with a correct response is recorded as the prompt's minimum hint; that group enters the
update. Pass rates are measured without hints only; a new RL round keeps the prompts whose pass rate is
strictly between 0 and 1 (`keep_for_next_round`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence

LEVELS = 5
LEVEL_NAMES = ("concept", "strategy", "tools", "first_step", "solution")


@dataclasses.dataclass(frozen=True)
class CutRule:
  """How hints are cut from a reference solution: split into steps, level k keeps a prefix."""
  split: str = "lines"                  # "lines", "sentences" or "paragraphs"
  fractions: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 1.0)  # of the steps, per level; 0 -> one step

  def __post_init__(self):
    if self.split not in ("lines", "sentences", "paragraphs"):
      raise ValueError(f"hints.cut.split: {self.split!r} is not lines, sentences or paragraphs")
    if len(self.fractions) != LEVELS or list(self.fractions) != sorted(self.fractions):
      raise ValueError(f"hints.cut.fractions: need {LEVELS} non-decreasing values, got {self.fractions}")


def _steps(solution: str, split: str) -> list[str]:
  if split == "lines":
    parts = solution.splitlines()
  elif split == "paragraphs":
    parts = re.split(r"\n\s*\n", solution)
  else:
    parts = re.split(r"(?<=[.!?])\s+", solution)
  return [p.strip() for p in parts if p.strip()]


def hints_for(record: Mapping, rule: CutRule = CutRule()) -> list[str] | None:
  """The five hints of a record (L1..L5), or None when it has neither `hints` nor `solution`."""
  given = record.get("hints")
  if given:
    if isinstance(given, Mapping):
      keys = [next((key for key in (f"L{k}", k, str(k)) if key in given), None) for k in range(1, LEVELS + 1)]
      if None in keys:
        raise ValueError(f"record {record.get('id', '?')!r}: 'hints' needs L1..L5, has {sorted(map(str, given))}")
      given = [given[key] for key in keys]
    if len(given) != LEVELS or not all(isinstance(h, str) for h in given):
      raise ValueError(f"record {record.get('id', '?')!r}: 'hints' must hold {LEVELS} strings")
    return list(given)
  solution = record.get("solution")
  if not solution:
    return None
  steps = _steps(str(solution), rule.split)
  hints = []
  for frac in rule.fractions:
    k = min(len(steps), max(1, math.ceil(frac * len(steps))))
    hints.append("\n".join(steps[:k]) if rule.split != "paragraphs" else "\n\n".join(steps[:k]))
  hints[-1] = str(solution).strip()
  return hints


def hint_levels(record: Mapping, rule: str | CutRule = "auto") -> list[str] | None:
  """`hints_for` with the rule named in a config: "auto" (lines when the solution has several lines,
  else sentences), "lines", "sentences", "paragraphs", or a CutRule."""
  if isinstance(rule, str):
    if rule == "auto":
      solution = str(record.get("solution") or "")
      rule = "lines" if len(_steps(solution, "lines")) > 1 else "sentences"
    rule = CutRule(split=rule)
  return hints_for(record, rule)


def with_hint(query: str, hint: str | None, template: str = "\n\nHint: {hint}") -> str:
  """The query with the hint appended after it (unchanged when hint is None)."""
  return query if hint is None else query + template.format(hint=hint)


@dataclasses.dataclass
class HintDecision:
  action: str   # "update", "escalate" or "give_up"
  level: int    # the level to sample at next (0 = no hint)


@dataclasses.dataclass
class HintTracker:
  """Per-prompt escalation state, minimum hints and no-hint pass counts. JSON-serialisable."""
  max_level: int = LEVELS
  level: dict = dataclasses.field(default_factory=dict)      # prompt id -> level in progress (absent = 0)
  min_hint: dict = dataclasses.field(default_factory=dict)   # prompt id -> first level that worked (0: no hint)
  passed: dict = dataclasses.field(default_factory=dict)     # prompt id -> [correct, sampled] without hints
  gave_up: dict = dataclasses.field(default_factory=dict)    # prompt id -> times L{max_level} failed too

  def current_level(self, prompt_id: str) -> int:
    return self.level.get(prompt_id, 0)

  def observe(self, prompt_id: str, correct: Sequence[bool], *, has_hints: bool) -> HintDecision:
    """Record a group sampled at the prompt's current level and decide what happens next."""
    if not len(correct):
      raise ValueError(f"hints: empty group for prompt {prompt_id!r}")
    level = self.current_level(prompt_id)
    any_correct = any(bool(c) for c in correct)
    if level == 0:
      c, n = self.passed.get(prompt_id, (0, 0))
      self.passed[prompt_id] = [c + sum(bool(x) for x in correct), n + len(correct)]
    if any_correct:
      self.level.pop(prompt_id, None)
      self.min_hint[prompt_id] = level  # the latest escalation's first working level
      return HintDecision("update", 0)
    if level == 0 and not (has_hints and self.max_level > 0):
      return HintDecision("update", 0)  # no hint to give: the group goes on as it is (no signal)
    if level < self.max_level:
      self.level[prompt_id] = level + 1
      return HintDecision("escalate", level + 1)
    self.level.pop(prompt_id, None)
    self.gave_up[prompt_id] = self.gave_up.get(prompt_id, 0) + 1
    return HintDecision("give_up", 0)

  def pass_rate(self, prompt_id: str) -> float | None:
    """Share of correct no-hint responses; None if never sampled."""
    c, n = self.passed.get(prompt_id, (0, 0))
    return c / n if n else None

  def keep_for_next_round(self, prompt_ids: Iterable[str]) -> list[str]:
    """The prompts of `prompt_ids` whose measured pass rate is strictly in (0, 1), in order."""
    return [p for p in prompt_ids if (r := self.pass_rate(p)) is not None and 0.0 < r < 1.0]

  def min_hint_shares(self) -> dict:
    """{"none": share, "L1": share, ...} of prompts by their minimum hint (report's table 9 layout)."""
    total = len(self.min_hint)
    out = {"none": 0.0, **{f"L{k}": 0.0 for k in range(1, self.max_level + 1)}}
    for v in self.min_hint.values():
      out["none" if v == 0 else f"L{v}"] += 1.0 / total
    return out

  def state_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_state_dict(cls, state: Mapping) -> "HintTracker":
    return cls(max_level=int(state["max_level"]), level=dict(state["level"]),
               min_hint=dict(state["min_hint"]), passed={k: list(v) for k, v in state["passed"].items()},
               gave_up=dict(state.get("gave_up", {})))
