"""The demo's step judge for `keye cot` (judge kind `command`): `python -m train.cot.demo_judge`.

A demo reasoning trace ends with its count ("... The red ones are the circle and the square, so 2.").
The steps are sound when the last number the trace states is the answer given after </think>: a trace
that counts 1 and answers 2 got its answer by luck, and training on it would teach the wrong reasoning.
JSON lines in ({"id", "question", "thinking", "answer", ...}), JSON lines out ({"id", "steps_ok"}), as
train/cot/assess.py speaks.
"""

from __future__ import annotations

import json
import re
import sys

_NUMBER = re.compile(r"\d+")


def steps_ok(question: str, thinking: str, answer: str) -> bool:
  stated = _NUMBER.findall(thinking)
  return bool(stated) and stated[-1] == answer.strip()


def main() -> int:
  for line in sys.stdin:
    if line.strip():
      t = json.loads(line)
      ok = steps_ok(t.get("question", ""), t.get("thinking", ""), t.get("answer", ""))
      print(json.dumps({"id": t["id"], "steps_ok": ok}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
