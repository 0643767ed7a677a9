"""A reward computed by an external program speaking JSON lines.

The program is started once (on first use) and kept alive. For each response it reads one line
  {"prompt": ..., "response": ..., "reference": ..., "id": ...}
and writes one line: {"score": x} (or a bare number). Replies come in order. A program that exits,
writes something else, or takes longer than `timeout` seconds for a reply is an error naming the
command (with the end of its stderr); it is never scored silently.

Config: {name: command, cmd: "python my_reward.py", timeout: 30}
"""

from __future__ import annotations

import atexit
import collections
import json
import math
import queue
import shlex
import subprocess
import threading
from collections.abc import Mapping, Sequence

import numpy as np

from train.rewards.registry import register


class CommandError(RuntimeError):
  """The reward program failed; the message names it."""


class JsonLinesProcess:
  """A long-lived child process answering one JSON line per request line."""

  def __init__(self, cmd: str | Sequence[str], timeout: float = 30.0, what: str = "reward command"):
    self.argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    if not self.argv:
      raise ValueError(f"{what}: empty command")
    self.name = f"{what} {' '.join(self.argv)!r}"
    self.timeout = timeout
    self.proc = None
    self._lock = threading.Lock()

  def _start(self):
    try:
      self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, bufsize=1)
    except OSError as e:
      raise CommandError(f"{self.name} could not start: {e}") from None
    self._lines: queue.Queue = queue.Queue()
    self._stderr = collections.deque(maxlen=20)
    threading.Thread(target=self._pump, args=(self.proc.stdout, self._lines.put, True), daemon=True).start()
    self._stderr_thread = threading.Thread(target=self._pump, args=(self.proc.stderr, self._stderr.append, False),
                                           daemon=True)
    self._stderr_thread.start()
    atexit.register(self.close)

  @staticmethod
  def _pump(stream, put, mark_end: bool):
    for line in stream:
      put(line)
    if mark_end:
      put(None)

  def _fail(self, why: str):
    self.close(grace=0.0)
    self._stderr_thread.join(timeout=2)  # the rest of what it wrote before it ended
    tail = " | ".join(line.strip() for line in self._stderr if line.strip())
    raise CommandError(f"{self.name} {why}" + (f"; its stderr ends: {tail[-500:]}" if tail else ""))

  def request(self, messages: Sequence[Mapping]) -> list[str]:
    """Send every message as a line, return the reply lines in order."""
    with self._lock:
      if self.proc is None or self.proc.poll() is not None:
        self._start()
      try:
        self.proc.stdin.write("".join(json.dumps(m, ensure_ascii=False) + "\n" for m in messages))
        self.proc.stdin.flush()
      except (BrokenPipeError, OSError):
        self._fail(f"exited (code {self.proc.wait()}) before reading its input")
      replies = []
      for _ in messages:
        try:
          line = self._lines.get(timeout=self.timeout)
        except queue.Empty:
          self._fail(f"gave no reply within {self.timeout:g} s")
        if line is None:
          self._fail(f"exited (code {self.proc.wait()}) after {len(replies)} of {len(messages)} replies")
        replies.append(line)
      return replies

  def close(self, grace: float = 5.0):
    """End the program: its input closed, then killed if it is still running after `grace` seconds."""
    proc, self.proc = self.proc, None
    if proc is not None and proc.poll() is None:
      try:
        proc.stdin.close()
        proc.wait(timeout=grace)
      except (OSError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()


def parse_score(line: str, name: str) -> float:
  """A reply line's score: {"score": x} or a bare number; anything else is an error naming `name`."""
  try:
    value = json.loads(line)
  except ValueError:
    raise CommandError(f"{name} replied {line.strip()[:200]!r}, not JSON") from None
  if isinstance(value, Mapping):
    value = value.get("score")
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise CommandError(f"{name} replied {line.strip()[:200]!r}: no finite 'score'")
  return float(value)


@register("command")
def command_reward(cmd: str | list, timeout: float = 30.0, reference_key: str = "answer"):
  """The score an external JSON-lines program gives each response (see the module doc)."""
  process = JsonLinesProcess(cmd, timeout)

  def reward(samples: Sequence[Mapping], responses: Sequence[str]) -> np.ndarray:
    if len(samples) != len(responses):
      raise ValueError(f"rewards: {len(samples)} samples but {len(responses)} responses")
    messages = [{"id": s.get("id"), "prompt": s.get("prompt"), "response": r,
                 "reference": s.get(reference_key)} for s, r in zip(samples, responses)]
    if not messages:
      return np.zeros(0, np.float32)
    return np.asarray([parse_score(line, process.name) for line in process.request(messages)], np.float32)

  reward.process = process
  return reward
