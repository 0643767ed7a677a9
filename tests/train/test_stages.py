"""A two-stage schedule: stage 2 starts from stage 1's parameters (another trainable set, another RoPE
base), and a finished schedule run again does nothing."""

import numpy as np
import yaml

from tests.train.helpers import TINY_MODEL, write_config


def test_schedule_chains_stages_through_init_from(tmp_path):
  from train.loop import run
  from train.merge import load_run_model
  write_config(tmp_path / "s1.yaml", "unused", model=TINY_MODEL, steps=2, optimizer={"trainable": ["projector"]})
  write_config(tmp_path / "s2.yaml", "unused", model=TINY_MODEL, steps=2, overrides=["model.text.rope_theta=80000.0"])
  with open(tmp_path / "all.yaml", "w") as f:
    yaml.safe_dump({"stages": ["s1.yaml", "s2.yaml"], "run_dir": str(tmp_path / "runs")}, f)
  out = run(str(tmp_path / "all.yaml"))
  assert out["final_step"] == 2 and np.isfinite(out["final_loss"])
  with open(tmp_path / "runs" / "s2" / "config.yaml") as f:
    s2 = yaml.safe_load(f)
  assert s2["init_from"] == str(tmp_path / "runs" / "s1") and s2["model"]["text"]["rope_theta"] == 80000.0
  # Stage 1 trained only the projector; stage 2 started from exactly those parameters.
  _, m1, _ = load_run_model(str(tmp_path / "runs" / "s1"))
  import jax
  from flax import nnx
  from keye_jax.model import KeyeVL
  fresh = KeyeVL(m1.cfg, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(np.asarray(m1.decoder.norm.scale[...]), np.asarray(fresh.decoder.norm.scale[...]))
  assert not np.array_equal(np.asarray(m1.projector.linear_2.kernel[...]), np.asarray(fresh.projector.linear_2.kernel[...]))
  again = run(str(tmp_path / "all.yaml"))  # everything finished: resumes at the final step of each stage
  assert again["final_step"] == 2
