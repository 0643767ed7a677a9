"""Scoring one output against its item (multiple choice and open answers)."""

from __future__ import annotations

from keye_jax.evaluate.extract import extract_choice, final_answer, match_open
from keye_jax.evaluate.items import Item


def score(item: Item, text: str, judge=None) -> dict:
  """{"pred": extracted answer, "score": 1.0 / 0.0}. Choice: the letter; open: the final-answer span."""
  if item.kind == "choice":
    pred = extract_choice(text, item.options or None)
    return {"pred": pred, "score": float(pred is not None and pred == str(item.answer).strip().upper())}
  if item.kind == "open":
    return {"pred": final_answer(text), "score": float(match_open(text, item.answer))}
  raise ValueError(f"item {item.id}: no default scoring for kind {item.kind!r}")
