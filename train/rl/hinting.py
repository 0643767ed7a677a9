"""What the RL loop keeps per prompt between steps, and the hint and correctness rules it applies.

  Records     the hint tracker of train/rl/hints.py (no-hint pass rates, minimum hints, escalation) plus
              the run's reward before/after; a JSON dict saved with the prompt iterator (per process), and
              written to RUN_DIR/pass_rates/process_<i>.json at the end of a run
  round_filter  a previous run's records -> (ids with a pass rate in (0, 1), ids measured outside it)
  prompt_hints  the L1..L5 hints of a prompt (its `hints`, or cut from its `solution`), None without
  is_correct  the rule verifier's score (train/rewards/rule.py) of a response against the reference
"""

from __future__ import annotations

import glob
import json
import logging
import os

from train.rewards.rule import score_answer
from train.rl.hints import CutRule, HintTracker, hints_for

log = logging.getLogger("train.rl")


def is_correct(meta: dict, text: str, threshold: float) -> bool:
  """True when the response's final answer matches the prompt's reference (False without a reference)."""
  ref = meta.get("reference")
  if ref is None:
    return False
  try:
    return score_answer(text, ref, kind=meta.get("kind"), options=meta.get("options")) > threshold
  except ValueError:
    return False


def prompt_hints(meta: dict, hint_cfg) -> list[str] | None:
  """Hints L1..L5 of a prompt; None when it has neither `hints` nor a solution (or they are malformed)."""
  try:
    return hints_for(meta, CutRule(split=hint_cfg.split, fractions=tuple(hint_cfg.fractions)))
  except ValueError as e:
    log.warning("prompt %s: no hints (%s)", meta.get("id"), e)
    return None


class Records:
  def __init__(self, max_level: int = 5):
    self.tracker = HintTracker(max_level=max_level)
    self.reward_before: float | None = None
    self.reward_after: float | None = None

  def state(self) -> dict:
    return {"hints": self.tracker.state_dict(), "reward_before": self.reward_before,
            "reward_after": self.reward_after}

  @staticmethod
  def from_state(state: dict | None, max_level: int = 5) -> "Records":
    r = Records(max_level)
    state = state or {}
    if "hints" in state:
      r.tracker = HintTracker.from_state_dict(state["hints"])
    r.reward_before, r.reward_after = state.get("reward_before"), state.get("reward_after")
    return r

  def write(self, run_dir: str, process_index: int):
    d = os.path.join(run_dir, "pass_rates")
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".process_{process_index}.json.tmp")
    with open(tmp, "w") as f:
      json.dump(self.tracker.state_dict(), f)
    os.replace(tmp, os.path.join(d, f"process_{process_index}.json"))


def round_filter(run_dir: str) -> tuple[frozenset, frozenset]:
  """(prompt ids whose pass rate in `run_dir`'s records is strictly in (0, 1), ids measured outside it)."""
  files = sorted(glob.glob(os.path.join(run_dir, "pass_rates", "process_*.json")))
  if not files:
    raise FileNotFoundError(f"rl.pass_rates_from: no pass-rate records in {run_dir}/pass_rates (written at the "
                            f"end of an RL run)")
  merged = HintTracker()
  for path in files:
    with open(path) as f:
      for pid, (c, n) in HintTracker.from_state_dict(json.load(f)).passed.items():
        acc = merged.passed.setdefault(pid, [0, 0])
        acc[0] += c
        acc[1] += n
  keep = frozenset(merged.keep_for_next_round(merged.passed))
  return keep, frozenset(merged.passed) - keep
