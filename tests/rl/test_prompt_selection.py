"""Global prompt selection (train/rl/prompts.py): two processes' streams, simulated in one process (threads
exchanging their round flags), take the same prompts per step as one process, also when prompts are skipped,
and resume exactly from their checkpoint states."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from train.data.config import DataConfig, SourceConfig
from train.rl.prompts import assign, make_prompt_stream

K = 4  # prompts per step
LONG = {3, 4, 9, 10, 11, 17, 30, 31, 32, 33, 34, 35}  # records whose prompt is too long (skipped)


def _encode(messages, tokenizer, base_dir=None, **kw):
  """A stand-in tokenizer: one token per character."""
  text = messages[-1]["content"]
  n = len(text)
  return {"input_ids": [ord(c) for c in text], "position_ids": [list(range(n))] * 3, "pixel_values": [],
          "grids_hw": []}


@pytest.fixture
def data(tmp_path):
  path = tmp_path / "prompts.jsonl"
  with open(path, "w") as f:
    for i in range(40):
      text = f"question {i} " + ("x" * 80 if i in LONG else "")
      f.write(json.dumps({"id": f"q{i}", "messages": [{"role": "user", "content": text}], "reference": "1"}) + "\n")
  return DataConfig(sources=(SourceConfig(path=str(path)),), seed=1)


class _Exchange:
  """process_allgather among threads: every thread's (L,) flags -> (n, L)."""

  def __init__(self, n: int):
    self.barrier, self.slots = threading.Barrier(n), [None] * n

  def of(self, j: int):
    def gather(flags):
      self.slots[j] = np.array(flags)
      self.barrier.wait()
      out = np.stack(self.slots)
      self.barrier.wait()
      return out
    return gather


def _streams(cfg, n: int, states=None):
  ex = _Exchange(n)
  out = [make_prompt_stream(cfg, None, max_len=50, max_patches=64, encode=_encode, process_index=j, process_count=n,
                            allgather=ex.of(j)) for j in range(n)]
  for s, st in zip(out, states or []):
    s.set_state(json.loads(json.dumps(st)))  # as the checkpoint stores it
  return out


def _steps(streams, steps: int) -> list[list[list[dict]]]:
  """Per step, per process, the prompts it took (every process's `take` at once, as collectives run)."""
  with ThreadPoolExecutor(len(streams)) as pool:
    return [[f.result(timeout=60) for f in [pool.submit(s.take, K) for s in streams]] for _ in range(steps)]


def _keys(step) -> list[list[int]]:
  return [[p["key"] for p in proc] for proc in step]


def test_assign_keeps_own_prompts_and_moves_only_the_surplus():
  assert assign([0, 1, 2, 3], 2) == [[0, 2], [1, 3]]
  assert assign([1, 3, 5, 6], 2) == [[5, 6], [1, 3]]  # process 1 had 3 of 4: its highest moves
  assert assign([0, 3, 6, 7, 8, 11], 3) == [[0, 3], [6, 7], [8, 11]]
  assert assign([2, 5, 8, 11, 14, 17], 3) == [[8, 11], [14, 17], [2, 5]]  # all process 2's
  assert assign([7, 9], 1) == [[7, 9]]


def test_two_processes_take_the_prompts_one_process_takes_and_resume_exactly(data):
  one, two = _steps(_streams(data, 1), 8), _steps(_streams(data, 2), 8)
  for a, b in zip(one, two):
    assert [len(p) for p in b] == [K // 2] * 2
    assert sorted(k for p in _keys(b) for k in p) == _keys(a)[0]  # the same set; each process's in key order
    assert all(ks == sorted(ks) for ks in _keys(b))
    by_key = {p["key"]: p for p in a[0]}
    for p in b[0] + b[1]:
      np.testing.assert_array_equal(p["input_ids"], by_key[p["key"]]["input_ids"])
      assert p["meta"]["id"] == by_key[p["key"]]["meta"]["id"]
  ids = [p["meta"]["id"] for step in one[:7] for p in step[0]]  # the first epoch: the 28 short prompts once each
  assert len(set(ids)) == len(ids) == 7 * K and not set(ids) & {f"q{i}" for i in LONG}
  # Prompts were skipped (the per-process streams alone would have drifted apart) and some moved.
  streams = _streams(data, 2)
  _steps(streams, 8)
  stats = [s.stats() for s in streams]
  assert sum(sum(s["skipped"].values()) for s in stats) > 0 and sum(s["moved_in"] for s in stats) > 0
  # Resume: states after 3 steps, restored into fresh streams, continue as the uninterrupted streams do.
  for n, straight in ((1, one), (2, two)):
    streams = _streams(data, n)
    _steps(streams, 3)
    resumed = _streams(data, n, [s.get_state() for s in streams])
    assert [_keys(s) for s in _steps(resumed, 5)] == [_keys(s) for s in straight[3:]]


def test_the_end_of_the_data_stops_every_process_at_the_same_step(data):
  import dataclasses
  cfg = dataclasses.replace(data, num_epochs=1)  # 40 records, 12 too long: 28 prompts, 7 steps of 4
  for n in (1, 2):
    streams = _streams(cfg, n)
    assert len(_steps(streams, 7)) == 7
    with ThreadPoolExecutor(n) as pool:
      futures = [pool.submit(s.take, K) for s in streams]
      for f in futures:
        with pytest.raises(StopIteration):
          f.result(timeout=60)


def test_prompts_that_do_not_fit_are_counted_and_named_once(data, caplog):
  """A prompt over rl.max_prompt_len is left out, not an error: counted per reason (the loop writes the
  counts to metrics.jsonl as prompts_skipped/too_long), and the first one is named in one warning."""
  import dataclasses
  import logging
  cfg = dataclasses.replace(data, num_epochs=1)
  (stream,) = _streams(cfg, 1)
  with caplog.at_level(logging.WARNING, logger="train.rl"):
    _steps([stream], 7)
    with pytest.raises(StopIteration):  # reads to the end: every long record seen
      stream.take(K)
  assert stream.stats()["skipped"] == {"prompt too long": len(LONG)}
  told = [r.getMessage() for r in caplog.records if "skipping prompts" in r.getMessage()]
  assert len(told) == 1, told
  assert "rl.max_prompt_len" in told[0] and "prompts.jsonl:" in told[0] and "> 50" in told[0], told[0]
