"""`run(config_path, overrides)`: what `keye train CONFIG` runs: one stage YAML (train/loop.py), or a
schedule YAML that lists stages or phases run in order (train/schedule.py)."""

from __future__ import annotations

from keye_jax.config import read_yaml
from train.config import load_train_config
from train.loop import train
from train.schedule import ensure_demo_data, is_schedule, load_schedule, run_schedule  # noqa: F401 (API)


def run(config_path: str, overrides=()) -> dict:
  """Trains per the YAML at `config_path`: a stage returns {"run_dir", "final_step", "final_loss"}, a
  schedule its summary (see train/schedule.py)."""
  if is_schedule(read_yaml(config_path)):
    return run_schedule(config_path, overrides)
  return train(load_train_config(config_path, overrides))
