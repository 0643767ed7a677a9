"""The demo's step judge for `keye cot` (judge kind `command`): `python -m train.cot.demo_judge`.

A demo reasoning trace ends with its count and the option it picks ("... so two. That is option B.").
The steps are sound when that last stated number is the text of the option picked and the answer after
</think> is that option: a trace that counts one and answers the option "two" got its letter by luck,
and training on it would teach the wrong reasoning. JSON lines in ({"id", "question", "thinking",
"answer", ...}), JSON lines out ({"id", "steps_ok"}), as train/cot/assess.py speaks.
"""

from __future__ import annotations

import json
import re
import sys

_OPTION = re.compile(r"^([A-D])\. (.+)$", re.M)
_PICK = re.compile(r"That is option ([A-D])\.\s*$")
_NUMBER = re.compile(r"\b(zero|one|two|three|four|five)\b")


def steps_ok(question: str, thinking: str, answer: str) -> bool:
  options = dict(_OPTION.findall(question))
  pick = _PICK.search(thinking.strip())
  if pick is None or pick.group(1) not in options or answer.strip() != pick.group(1):
    return False
  stated = _NUMBER.findall(thinking[:pick.start()])
  return bool(stated) and stated[-1] == options[pick.group(1)].strip()


def main() -> int:
  for line in sys.stdin:
    if line.strip():
      t = json.loads(line)
      ok = steps_ok(t.get("question", ""), t.get("thinking", ""), t.get("answer", ""))
      print(json.dumps({"id": t["id"], "steps_ok": ok}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
