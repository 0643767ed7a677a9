"""The command reward: a JSON-lines program started once, kept alive, failures named."""

from __future__ import annotations

import sys
import textwrap

import pytest

from train.rewards import registry
from train.rewards.command import CommandError

PROGRAM = textwrap.dedent("""
  import json, os, sys
  print("started", os.getpid(), file=sys.stderr, flush=True)
  for line in sys.stdin:
    m = json.loads(line)
    if m["response"] == "crash":
      print("boom: cannot score", file=sys.stderr, flush=True)
      sys.exit(3)
    if m["response"] == "hang":
      import time; time.sleep(60)
    if m["response"] == "garbage":
      print("not json", flush=True); continue
    if m["response"] == "pid":
      print(json.dumps({"score": os.getpid()}), flush=True); continue
    print(json.dumps({"score": float(m["response"].strip() == m["reference"])}), flush=True)
""")


@pytest.fixture
def program(tmp_path):
  path = tmp_path / "judge.py"
  path.write_text(PROGRAM)
  return [sys.executable, str(path)]


def test_scores_in_order_and_process_is_kept(program):
  fn = registry.build("command", cmd=program, timeout=20)
  try:
    samples = [{"prompt": "2+2?", "answer": "4"}, {"prompt": "3+3?", "answer": "6"}]
    assert fn(samples, ["4", "5"]).tolist() == [1.0, 0.0]
    pid = fn(samples[:1], ["pid"])[0]
    assert fn(samples[:1], ["pid"])[0] == pid  # the same process answers every call
  finally:
    fn.process.close()


@pytest.mark.parametrize("response,message", [("crash", r"exited \(code 3\).*boom: cannot score"),
                                              ("garbage", "replied 'not json', not JSON"),
                                              ("hang", "gave no reply within 1 s")])
def test_failures_are_errors_naming_the_command(program, response, message):
  fn = registry.build("command", cmd=program, timeout=1)
  try:
    with pytest.raises(CommandError, match=f"reward command .*judge.py.* {message}"):
      fn([{"answer": "4"}], [response])
    assert fn([{"answer": "4"}], ["4"]).tolist() == [1.0]  # restarted on the next call
  finally:
    fn.process.close()


def test_missing_program():
  fn = registry.build("command", cmd="/nonexistent/reward-program --x")
  with pytest.raises(CommandError, match="'/nonexistent/reward-program --x' could not start"):
    fn([{"answer": "1"}], ["1"])
