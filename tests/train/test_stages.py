"""A two-stage schedule run from a temporary working directory with a relative `run_dir=` override: each
stage gets its own subdirectory, stage 2 starts from exactly stage 1's final parameters (another trainable
set, another RoPE base), the schedule dir reads as a checkpoint, and a rerun of the finished schedule
touches nothing."""

import os

import numpy as np
import yaml

from tests.train.helpers import TINY_MODEL, write_config


def _snapshot(root):
  """{relative path: (size, mtime_ns)} of every file under the schedule's stage dirs (no TensorBoard)."""
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      p = os.path.join(d, f)
      if "tensorboard" not in p and not f.endswith(".json") or f == "metrics.jsonl":
        st = os.stat(p)
        out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
  return out


def test_schedule_chains_stages_and_a_rerun_touches_nothing(tmp_path, monkeypatch):
  from keye_jax import checkpoint_io
  from train.stages import run
  cfg_dir = tmp_path / "configs"
  cfg_dir.mkdir()
  write_config(cfg_dir / "s1.yaml", "ignored", model=TINY_MODEL, steps=2, optimizer={"trainable": ["projector"]})
  # Stage 2 trains everything at learning rate 0: its final parameters are its initial ones.
  write_config(cfg_dir / "s2.yaml", "ignored", model=TINY_MODEL, steps=1,
               optimizer={"learning_rate": 0.0, "warmup_steps": 0, "weight_decay": 0.0},
               overrides=["model.text.rope_theta=80000.0"])
  with open(cfg_dir / "all.yaml", "w") as f:
    yaml.safe_dump({"stages": ["s1.yaml", "s2.yaml"], "run_dir": "runs/from-the-file"}, f)
  work = tmp_path / "work"
  work.mkdir()
  monkeypatch.chdir(work)  # the command line's relative run_dir resolves here
  out = run("../configs/all.yaml", ["run_dir=runs/sched"])
  sched = work / "runs" / "sched"
  assert out["run_dir"] == str(sched) and out["final_step"] == 1 and np.isfinite(out["final_loss"])
  assert sorted(set(os.listdir(sched)) - {"jax_cache"}) == ["s1", "s2", "schedule.json"]   # + compile cache
  assert not (cfg_dir / "runs").exists()
  with open(sched / "s2" / "config.yaml") as f:
    s2 = yaml.safe_load(f)
  assert s2["init_from"] == str(sched / "s1") and s2["model"]["text"]["rope_theta"] == 80000.0

  _, p1 = checkpoint_io.load_canonical(str(sched / "s1"))
  _, p2 = checkpoint_io.load_canonical("runs/sched/s2")  # relative, from the CWD
  assert sorted(p1) == sorted(p2)
  for k in p1:
    np.testing.assert_array_equal(p2[k], p1[k], err_msg=k)
  # Stage 1 trained the projector only (its step-1 checkpoint, picked by path, differs there only).
  _, p1_step1 = checkpoint_io.load_canonical("runs/sched/s1/checkpoints/1")
  assert all(np.array_equal(p1[k], p1_step1[k]) for k in p1 if not k.startswith("projector/"))
  assert not all(np.array_equal(p1[k], p1_step1[k]) for k in p1 if k.startswith("projector/"))
  # The schedule dir is a checkpoint argument: its last stage's latest checkpoint.
  ref = checkpoint_io.resolve("runs/sched")
  assert (ref.kind, ref.path, ref.step) == ("run", str(sched / "s2"), 1)

  before = _snapshot(sched)
  metrics = {s: (sched / s / "metrics.jsonl").read_text() for s in ("s1", "s2")}
  again = run("../configs/all.yaml", ["run_dir=runs/sched"])
  assert again["final_step"] == 1 and again["final_loss"] == out["final_loss"]
  assert _snapshot(sched) == before
  assert {s: (sched / s / "metrics.jsonl").read_text() for s in ("s1", "s2")} == metrics
