"""The demo's reviewer for `keye cot` (`reviewer: python -m train.cot.demo_reviewer`).

Step 4 sends fixable (B) and borderline traces to "a person or a stronger model" to repair. On the demo,
the stronger model is this script: it knows each demo question's worked solution (the record's `solution`,
carried in the queue line) and rewrites the trace into it, thinking then the answer. A queued
trace without a solution is dropped. Queue lines in (train/cot/review.py), reviewed lines out.
"""

from __future__ import annotations

import json
import sys


def review(item: dict) -> dict:
  solution = item.get("solution")
  if not solution:
    return {**item, "decision": "drop"}
  return {**item, "response": f"<think>\n{solution}\n</think>\n\n{item['reference']}", "decision": "keep",
          "score": 4}


def main() -> int:
  for line in sys.stdin:
    if line.strip():
      print(json.dumps(review(json.loads(line))))
  return 0


if __name__ == "__main__":
  sys.exit(main())
