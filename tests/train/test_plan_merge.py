"""The TPU fit planner on a small topology, multi-process training, and checkpoint merging."""

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.train.helpers import REPO, env, losses, run_python, train_process, write_config


def test_plan_small_topology(tmp_path):
  cfg = write_config(tmp_path / "p.yaml", tmp_path / "run", mesh={"fsdp": -1},
                     data={"seq_len": 64, "num_patches": 32, "batch_size": 8})
  out = run_python(f"import json; from train.plan import plan; print(json.dumps(plan({cfg!r}, 'v5p:2x2x1')))")
  assert out["chips"] == 4 and out["fits"] and out["hbm_gib"] == 95.0
  assert 0 < out["params_gib"] < out["per_chip_gib"] and out["optimizer_gib"] == pytest.approx(2 * out["params_gib"], rel=1e-3)  # + step counts
  assert out["flops_per_step"] > 0


def test_two_processes_of_four_devices_match_one_process_of_eight(tmp_path):
  one = write_config(tmp_path / "one.yaml", tmp_path / "one", steps=3, mesh={"fsdp": -1},
                     data={"seq_len": 64, "num_patches": 32, "batch_size": 8})
  two = write_config(tmp_path / "two.yaml", tmp_path / "two", steps=3, mesh={"fsdp": -1},
                     data={"seq_len": 64, "num_patches": 32, "batch_size": 8})
  port = 20000 + os.getpid() % 20000
  procs = [train_process(two, f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
                         f"distributed.process_id={i}", devices=4) for i in range(2)]
  ref = train_process(one, devices=8)
  for p in [*procs, ref]:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  want, got = losses(tmp_path / "one"), losses(tmp_path / "two")
  assert sorted(got) == [1, 2, 3]
  np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=1e-6)


@pytest.mark.slow  # two training runs and a merge: ~1 min
def test_merge_is_the_weighted_average(tmp_path):
  runs = []
  for i, lr in enumerate((1e-2, 3e-2)):
    cfg = write_config(tmp_path / f"m{i}.yaml", tmp_path / f"m{i}", steps=2, optimizer={"learning_rate": lr})
    p = train_process(cfg)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    runs.append(str(tmp_path / f"m{i}"))
  out = str(tmp_path / "merged")
  code = f"""
import json, numpy as np
from train.merge import load_canonical, merge
merge({runs!r}, [0.25, 0.75], {out!r})
_, a = load_canonical({runs[0]!r}); _, b = load_canonical({runs[1]!r}); _, m = load_canonical({out!r})
err = max(float(np.abs(m[k] - (0.25 * a[k] + 0.75 * b[k])).max()) for k in m)
print(json.dumps({{"err": err, "n": len(m), "same_keys": sorted(m) == sorted(a)}}))
"""
  res = run_python(code)
  assert res["same_keys"] and res["n"] > 0 and res["err"] < 1e-6
