"""Verifiable instruction constraints (IFEval): lm-eval's own checkers, through keye_jax.evaluate.ifeval.

A prompt record carries its constraints IFEval-style: `instruction_id_list` (e.g.
["length_constraints:number_words", "detectable_format:title"]) and `kwargs` (one dict per instruction).
The reward is checked on the answer part (after </think>: a thinking trace is not the reply).

Config: {name: ifeval, mode: strict | loose, score: all | fraction}
  all       1.0 when every instruction is followed (IFEval's prompt-level accuracy), else 0.0;
  fraction  the share of the prompt's instructions followed (instruction-level).
A record without constraints scores `no_constraints` (default 0.0, the same for its whole group).
"""

from __future__ import annotations

from collections.abc import Mapping

from keye_jax.evaluate.extract import after_thinking
from train.rewards.registry import per_item, register


def follows(sample: Mapping, response: str, mode: str = "strict") -> list[bool]:
  """Per-instruction results of the answer part of `response` for the record's constraints."""
  from keye_jax.evaluate import ifeval  # lm-eval and NLTK data load on first use
  ids = list(sample.get("instruction_id_list") or [])
  kwargs = sample.get("kwargs") or [None] * len(ids)
  prompt = str(sample.get("prompt") or "")
  try:
    result = ifeval.check(after_thinking(response), ids, kwargs, prompt)
  except ValueError as e:
    raise ValueError(f"ifeval reward: sample {sample.get('id', '?')!r}: {e}") from None
  return result[f"{mode}_list"]


@register("ifeval")
def ifeval_reward(mode: str = "strict", score: str = "all", no_constraints: float = 0.0):
  """IFEval instruction following of each response (see the module doc)."""
  if mode not in ("strict", "loose"):
    raise ValueError(f"ifeval.mode: {mode!r} is not strict or loose")
  if score not in ("all", "fraction"):
    raise ValueError(f"ifeval.score: {score!r} is not all or fraction")

  def reward(sample, response):
    if not sample.get("instruction_id_list"):
      return no_constraints
    ok = follows(sample, response, mode)
    return float(all(ok)) if score == "all" else sum(ok) / len(ok)
  return per_item(reward)
