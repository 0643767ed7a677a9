"""Step 4: the review queue. B traces and borderline A traces are exported as JSONL for a person or a
stronger model to repair; each line:

  {"id", "grade", "reason", "question", "reference", "response", "decision": null, "score": null}
  (plus "solution", the record's worked solution, when its manifest has one)

The reviewer edits `response` where needed and sets `decision` to "keep" or "drop" (optionally `score`
1-5). Re-importing the edited file: a line whose decision is still null is pending (skipped and counted);
an unknown id, a malformed line, or a kept response whose answer no longer verifies is an error naming the
file and line.
"""

from __future__ import annotations

import json

from keye_jax.evaluate.items import read_jsonl
from keye_jax.processing.thinking import split_thinking, thinking_state
from train.cot.assess import verify


def queue_items(assessed: list[dict]) -> list[dict]:
  return [t for t in assessed if t["grade"] == "B" or t.get("borderline")]


def export(assessed: list[dict], prompts: dict, path: str) -> int:
  items = queue_items(assessed)
  with open(path, "w") as f:
    for t in items:
      p = prompts[t["prompt_id"]]
      f.write(json.dumps({"id": t["id"], "grade": t["grade"], "reason": t["reason"], "question": p["question"],
                          "reference": p["answer"], "response": t["text"], "decision": None, "score": None,
                          **({"solution": p["solution"]} if p.get("solution") else {})}) + "\n")
  return len(items)


def import_reviewed(path: str, assessed: list[dict], prompts: dict) -> tuple[dict[str, dict], dict]:
  """({trace id: reviewed trace (grade A, `reviewed`) or None for drop}, counts {kept, dropped, pending})."""
  queued = {t["id"]: t for t in queue_items(assessed)}
  out, counts = {}, {"kept": 0, "dropped": 0, "pending": 0}
  for n, item in read_jsonl(path):
    where = f"{path} line {n}"
    if "id" not in item:
      raise ValueError(f"{where}: a review line is an object with an 'id'")
    if item["id"] not in queued:
      raise ValueError(f"{where}: unknown trace id {item['id']!r} (not in the review queue)")
    decision = item.get("decision")
    if decision is None:
      counts["pending"] += 1
      continue
    if decision not in ("keep", "drop"):
      raise ValueError(f"{where}: decision must be 'keep', 'drop' or null, got {decision!r}")
    if decision == "drop":
      out[item["id"]] = None
      counts["dropped"] += 1
      continue
    response = item.get("response")
    if not isinstance(response, str) or not response.strip():
      raise ValueError(f"{where}: a kept trace needs a non-empty 'response'")
    trace = queued[item["id"]]
    if not verify(response, prompts[trace["prompt_id"]]):
      raise ValueError(f"{where}: the edited response's answer does not verify against the reference "
                       f"{prompts[trace['prompt_id']]['answer']!r}")
    score = item.get("score")
    if score is not None and score not in (1, 2, 3, 4, 5):
      raise ValueError(f"{where}: score must be 1-5 or null, got {score!r}")
    thinking, answer = split_thinking(response)
    out[item["id"]] = {**trace, "text": response, "thinking": thinking, "answer": answer,
                       "state": thinking_state(response), "grade": "A", "answer_ok": True, "steps_ok": True,
                       "reviewed": True, "edited": response != trace["text"], "review_score": score,
                       "borderline": False}
    counts["kept"] += 1
  return out, counts
