"""Checkpoints and faults: kill -9 and resume is bitwise identical (and metrics.jsonl has each step once),
SIGTERM and Ctrl-C save then exit, too many non-finite steps stop the run with a clear message."""

import json
import os
import random
import signal
import time

import subprocess
import sys

import pytest

from tests.train.helpers import REPO, env, losses, train_process, write_config


def _wait_for_step(run_dir, step, proc, timeout=600):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if losses(run_dir).get(step) is not None:
      return
    if proc.poll() is not None:
      raise AssertionError(f"training exited early: {proc.stderr.read()[-3000:]}")
    time.sleep(0.05)
  raise AssertionError(f"step {step} not reached")


def _finish(proc, timeout=600, want_err=False):
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-3000:]
  result = json.loads(out.strip().splitlines()[-1])
  return (result, err) if want_err else result


@pytest.mark.slow   # 27 s idle: the fast suite must stay within the CI budget; run with -m slow
def test_kill9_at_random_step_then_resume_is_bitwise_identical(tmp_path):
  steps = 10
  straight = write_config(tmp_path / "a.yaml", tmp_path / "straight", steps=steps)
  killed = write_config(tmp_path / "b.yaml", tmp_path / "killed", steps=steps)
  ref = train_process(straight)
  victim = train_process(killed)
  kill_at = random.Random(os.getpid()).randint(2, steps - 3)
  _wait_for_step(tmp_path / "killed", kill_at, victim)
  victim.send_signal(signal.SIGKILL)  # possibly in the middle of an asynchronous save
  victim.wait()
  ckpts = tmp_path / "killed" / "checkpoints"
  saved = [d for d in os.listdir(ckpts) if d.isdigit()] if ckpts.exists() else []
  _finish(ref)
  result, err = _finish(train_process(killed), want_err=True)
  assert result["final_step"] == steps
  if saved:  # under load the kill can come before the first asynchronous save finished: then it starts over
    assert "resuming from step" in err
  want, got = losses(tmp_path / "straight"), losses(tmp_path / "killed")
  assert sorted(got) == list(range(1, steps + 1))
  assert got == want  # bit for bit, steps before and after the kill
  raw = [json.loads(line)["step"] for line in open(tmp_path / "killed" / "metrics.jsonl")]
  assert raw == list(range(1, steps + 1))  # the lines after the resumed checkpoint were dropped, not repeated


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", steps=200, checkpoint={"every": 1000, "keep": 2})
  proc = train_process(cfg)
  _wait_for_step(tmp_path / "run", 3, proc)
  proc.send_signal(signal.SIGTERM)
  result = _finish(proc)
  assert result["preempted"] and 3 <= result["final_step"] < 200
  saved = sorted(int(d) for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit())
  assert saved == [result["final_step"]]


def test_ctrl_c_saves_a_checkpoint_and_exits_130_without_traceback(tmp_path):
  cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", steps=200, checkpoint={"every": 1000, "keep": 2})
  proc = subprocess.Popen([sys.executable, "-m", "keye_jax", "train", cfg], cwd=REPO, env=env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for_step(tmp_path / "run", 3, proc)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
  result = json.loads(out.strip().splitlines()[-1])
  assert result["preempted"] and result["signal"] == "SIGINT" and 3 <= result["final_step"] < 200
  saved = sorted(int(d) for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit())
  assert saved == [result["final_step"]]


def test_too_many_nonfinite_steps_stop_with_a_message(tmp_path):
  # An absurd learning rate blows the parameters up after one update; every later step is non-finite.
  cfg = write_config(tmp_path / "d.yaml", tmp_path / "run", steps=20, max_nonfinite=3,
                     optimizer={"learning_rate": 1e30, "warmup_steps": 0, "clip_norm": 0.0})
  proc = subprocess.Popen([sys.executable, "-m", "keye_jax", "train", cfg], cwd=REPO, env=env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
  assert "3 consecutive steps" in err and "non-finite" in err
  recs = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert recs[-1]["skipped_steps"] == 3
