"""The TPU fit planner on a small topology (and a batch that does not fit), multi-process training, and
checkpoint merging on small trees (converted and run-dir inputs, relative paths, tokenizer carried)."""

import os

import numpy as np
import pytest

from tests.cli.helpers import converted_text_model, demo_tokenizer
from tests.train.helpers import losses, run_python, train_process, write_config


@pytest.mark.slow   # AOT compile through libtpu (the not-fit test compiles too); ~9 s idle
def test_plan_small_topology(tmp_path):
  cfg = write_config(tmp_path / "p.yaml", tmp_path / "run", mesh={"fsdp": -1},
                     data={"seq_len": 64, "num_patches": 32, "batch_size": 8})
  out = run_python(f"import json; from train.plan import plan; print(json.dumps(plan({cfg!r}, 'v5p:2x2x1')))")
  assert out["chips"] == 4 and out["fits"] and out["hbm_gib"] == 95.0
  assert 0 < out["params_gib"] < out["per_chip_gib"] and out["optimizer_gib"] == pytest.approx(2 * out["params_gib"], rel=1e-3)  # + step counts
  assert out["flops_per_step"] > 0


def test_plan_reports_what_does_not_fit(tmp_path):
  # A 64k-token row per chip with 64k-position logits chunks of a 256k vocabulary: far over a v5e chip.
  model = {"text": {"vocab_size": 262144, "hidden_size": 1024, "intermediate_size": 4096, "num_layers": 2,
                    "num_heads": 8, "num_kv_heads": 8, "head_dim": 128, "mrope_section": [16, 24, 24]},
           "vision": None}
  cfg = write_config(tmp_path / "big.yaml", tmp_path / "run", model=model, loss_chunk=65536, mesh={"fsdp": -1},
                     data={"seq_len": 65536, "num_patches": 32, "batch_size": 4})
  out = run_python(f"import json; from train.plan import plan; print(json.dumps(plan({cfg!r}, 'v5e:2x2')))")
  assert out["fits"] is False and out["chips"] == 4 and out["hbm_gib"] == 16.0
  assert out["per_chip_gib"] is not None and out["per_chip_gib"] > 16.0, out["error"]  # the compiler's figure


@pytest.mark.slow   # 39 s idle: the fast suite must stay within the CI budget; run with -m slow
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


def test_merge_is_the_weighted_average(tmp_path, monkeypatch):
  from keye_jax import checkpoint_io
  from train.merge import merge
  monkeypatch.chdir(tmp_path)
  a = converted_text_model("a", seed=1)  # no tokenizer
  b = converted_text_model("b", seed=2, tokenizer=demo_tokenizer("tok"))
  out = merge(["a", "b"], [1.0, 3.0], "m")  # relative inputs and output
  assert out == {"out": str(tmp_path / "m")}
  cfg, m = checkpoint_io.load_canonical("m")
  assert sorted(m) == sorted(a) and cfg == checkpoint_io.model_config("a")
  for k in m:  # float64 average, cast back: exact
    want = (0.25 * a[k].astype(np.float64) + 0.75 * b[k].astype(np.float64)).astype(a[k].dtype)
    np.testing.assert_array_equal(m[k], want, err_msg=k)
  assert checkpoint_io.resolve("m").tokenizer_dir == str(tmp_path / "m")  # carried from b
  with pytest.raises(ValueError, match="2 checkpoints but 1 weights"):
    merge(["a", "b"], [1.0], "x")
  with pytest.raises(checkpoint_io.CheckpointError, match="m: output directory exists"):
    merge(["a", "b"], [1.0, 1.0], "m")
  converted_text_model("c", seed=3, hidden_size=32, num_heads=2, head_dim=16)
  with pytest.raises(ValueError, match="c: .* has shape"):
    merge(["a", "c"], [1.0, 1.0], "y")
  assert not os.path.exists("y") and not os.path.exists("y.partial")


def test_merge_of_run_dirs(tmp_path):
  """A training run dir as merge input (its latest checkpoint) equals the same run's canonical parameters."""
  cfg = write_config(tmp_path / "r.yaml", tmp_path / "r", steps=2)
  p = train_process(cfg)
  _, err = p.communicate(timeout=600)
  assert p.returncode == 0, err[-3000:]
  code = f"""
import json, numpy as np
from keye_jax import checkpoint_io
from train.merge import merge
merge([{str(tmp_path / 'r')!r}, {str(tmp_path / 'r' / 'checkpoints' / '1')!r}], [0.5, 0.5], {str(tmp_path / 'm')!r})
_, a = checkpoint_io.load_canonical({str(tmp_path / 'r')!r})
_, b = checkpoint_io.load_canonical({str(tmp_path / 'r' / 'checkpoints' / '1')!r})
_, m = checkpoint_io.load_canonical({str(tmp_path / 'm')!r})
err = max(float(np.abs(m[k] - (0.5 * a[k].astype(np.float64) + 0.5 * b[k])).max()) for k in m)
print(json.dumps({{"err": err, "n": len(m), "same_keys": sorted(m) == sorted(a), "differ": any(not np.array_equal(a[k], b[k]) for k in a)}}))
"""
  res = run_python(code)
  assert res["same_keys"] and res["n"] > 0 and res["err"] < 1e-6 and res["differ"]
