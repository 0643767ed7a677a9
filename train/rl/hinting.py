"""What the RL loop keeps per prompt between steps, and the hint and correctness rules it applies.

  Records     pass rates per prompt id ([correct, sampled] of the un-hinted rollouts), the minimum hint
              level per prompt (None: no level helped), reward before/after; a JSON dict saved with the
              prompt iterator (per process), and written to RUN_DIR/pass_rates/process_<i>.json at the end
  round_filter  a previous run's records -> (ids with a pass rate in (0, 1), ids without)
  hint_texts  the L1..Lk hints of a prompt (train/rl/hints.py: from the data's `hints`, or cut from the
              reference solution by a rule)
  is_correct  the rule verifier's score (train/rewards/rule.py) of a response against the reference
"""

from __future__ import annotations

import glob
import json
import os

from train.rewards.rule import score_answer


def is_correct(meta: dict, text: str, threshold: float) -> bool:
  """True when the response's final answer matches the prompt's reference (False without a reference)."""
  ref = meta.get("reference")
  if ref is None:
    return False
  try:
    return score_answer(text, ref, kind=meta.get("kind"), options=meta.get("options")) > threshold
  except ValueError:
    return False


def hint_texts(meta: dict, rule: str, max_level: int) -> list[str]:
  """Hints L1..max_level for a prompt, [] when it has neither `hints` nor a reference solution."""
  try:
    from train.rl import hints
  except ImportError:  # until train/rl/hints.py exists: only the data's own hints
    levels = meta.get("hints") or []
  else:
    levels = hints.hint_levels(meta, rule=rule)
  return [h for h in list(levels or [])[:max_level] if h]


class Records:
  def __init__(self):
    self.passes: dict[str, list[int]] = {}
    self.min_hint: dict[str, int | None] = {}
    self.reward_before: float | None = None
    self.reward_after: float | None = None

  def record_pass(self, pid: str, correct: int, sampled: int):
    c = self.passes.setdefault(pid, [0, 0])
    c[0] += int(correct)
    c[1] += int(sampled)

  def record_hint(self, pid: str, level: int | None, tried: bool = True):
    if tried:
      self.min_hint[pid] = level

  def pass_rate(self, pid: str) -> float | None:
    c = self.passes.get(pid)
    return None if not c or not c[1] else c[0] / c[1]

  def state(self) -> dict:
    return {"passes": self.passes, "min_hint": self.min_hint, "reward_before": self.reward_before,
            "reward_after": self.reward_after}

  @staticmethod
  def from_state(state: dict | None) -> "Records":
    r = Records()
    state = state or {}
    r.passes = {k: list(v) for k, v in state.get("passes", {}).items()}
    r.min_hint = dict(state.get("min_hint", {}))
    r.reward_before, r.reward_after = state.get("reward_before"), state.get("reward_after")
    return r

  def write(self, run_dir: str, process_index: int):
    d = os.path.join(run_dir, "pass_rates")
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".process_{process_index}.json.tmp")
    with open(tmp, "w") as f:
      json.dump({"passes": self.passes, "min_hint": self.min_hint}, f)
    os.replace(tmp, os.path.join(d, f"process_{process_index}.json"))


def round_filter(run_dir: str) -> tuple[frozenset, frozenset]:
  """(prompt ids whose pass rate in `run_dir`'s records is strictly in (0, 1), ids measured outside it)."""
  files = sorted(glob.glob(os.path.join(run_dir, "pass_rates", "process_*.json")))
  if not files:
    raise FileNotFoundError(f"rl.pass_rates_from: no pass-rate records in {run_dir}/pass_rates (written at the "
                            f"end of an RL run)")
  passes: dict[str, list[int]] = {}
  for path in files:
    with open(path) as f:
      for pid, (c, n) in json.load(f)["passes"].items():
        acc = passes.setdefault(pid, [0, 0])
        acc[0] += c
        acc[1] += n
  keep = frozenset(pid for pid, (c, n) in passes.items() if n and 0 < c < n)
  return keep, frozenset(passes) - keep
