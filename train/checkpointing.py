"""Orbax checkpoints of a run: train state (params, optimizer, step, RNG, counters) + data-iterator state.

Layout (keye_jax/checkpoint_io.py reads it for every other command): RUN_DIR/config.yaml (the whole
TrainConfig), RUN_DIR/tokenizer/ (a copy of the run's tokenizer), RUN_DIR/checkpoints/<step>/{state, data}.
Saves are asynchronous (training continues while the
arrays are written) and atomic: Orbax writes into a temporary directory and renames it only once every
file is complete, so a crash during a save leaves the previous checkpoint as the latest good one (the
half-written temporary directory is removed on the next start).
"""

from __future__ import annotations

import logging
import os

import orbax.checkpoint as ocp
import yaml

from keye_jax import checkpoint_io
from keye_jax.config import to_dict

log = logging.getLogger("train")
# What a resumed run must share with the run that wrote its checkpoints (the rest may change: remat,
# compute dtype, attention implementation, learning rates, data, ...).
_MUST_MATCH = ("model.text", "model.vision", "model.scan_layers", "model.param_dtype", "optimizer.trainable")


def _is_grain(it) -> bool:
  import grain
  return isinstance(it, grain.DatasetIterator)


def _data_save(it):
  if _is_grain(it):
    import grain
    return grain.checkpoint.CheckpointSave(it)  # one file per process (each reads its own shard)
  return ocp.args.JsonSave(it.get_state())


def _data_restore(it):
  if _is_grain(it):
    import grain
    return grain.checkpoint.CheckpointRestore(it)
  return ocp.args.JsonRestore()


class Checkpointer:
  """Keeps the last `keep` checkpoints, saving every `every` steps (and whenever forced)."""

  def __init__(self, run_dir: str, every: int, keep: int):
    self.dir = os.path.abspath(os.path.join(run_dir, checkpoint_io.RUN_CHECKPOINTS))
    self.every = every
    self.mngr = ocp.CheckpointManager(self.dir, options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=1, enable_async_checkpointing=True,
        cleanup_tmp_directories=True, create=True))

  def latest_step(self) -> int | None:
    return self.mngr.latest_step()

  def maybe_save(self, step: int, state: dict, data_it, *, force: bool = False) -> bool:
    if not force and (self.every <= 0 or step % self.every):
      return False
    if step in self.mngr.all_steps():
      return False
    args = {"state": ocp.args.StandardSave(state)}
    if data_it is not None:
      args["data"] = _data_save(data_it)
    self.mngr.save(step, args=ocp.args.Composite(**args), force=True)
    return True

  def restore(self, step: int, abstract_state: dict, data_it) -> dict:
    """The train state at `step` laid out like `abstract_state`; `data_it` is repositioned in place."""
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_it is not None:
      args["data"] = _data_restore(data_it)
    out = self.mngr.restore(step, args=ocp.args.Composite(**args))
    if data_it is not None and not _is_grain(data_it):
      data_it.set_state(out["data"])
    return out["state"]

  def wait(self):
    self.mngr.wait_until_finished()

  def close(self):
    self.mngr.wait_until_finished()
    self.mngr.close()


def _get(d: dict, dotted: str):
  for part in dotted.split("."):
    d = d.get(part) if isinstance(d, dict) else None
  return d


def check_run_dir(cfg, run_dir: str) -> None:
  """A run dir that already holds checkpoints must hold this model's (else: one line saying so)."""
  if not checkpoint_io.run_steps(run_dir):
    return
  path = os.path.join(run_dir, checkpoint_io.RUN_CONFIG)
  if not os.path.exists(path):
    raise ValueError(f"{run_dir}: holds checkpoints but no {checkpoint_io.RUN_CONFIG}; give another run_dir")
  with open(path) as f:
    old = yaml.safe_load(f) or {}
  new = to_dict(cfg)
  for key in _MUST_MATCH:
    a, b = _get(old, key), _get(new, key)
    if a != b:
      if isinstance(a, dict) and isinstance(b, dict):
        sub = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
        key, a, b = f"{key}.{sub}", a.get(sub), b.get(sub)
      raise ValueError(f"{run_dir}: holds checkpoints of another model or trainable set ({key} is {a} there, "
                       f"{b} in this config); give another run_dir or remove that one")


def finished_run(run_dir: str, steps: int) -> dict | None:
  """The result of a run that has nothing left to do (its last checkpoint is at `steps`, or `steps` is 0),
  read without touching anything; None otherwise."""
  done = checkpoint_io.run_steps(run_dir)
  last = done[-1] if done else 0
  if last < steps:
    return None
  from train.metrics import read_metrics
  records = [r for r in read_metrics(run_dir) if r["step"] <= last]
  loss = records[-1]["loss"] if records and records[-1]["step"] == last else None
  return {"run_dir": run_dir, "final_step": last, "final_loss": loss}


def write_run_files(cfg, run_dir: str) -> None:
  """RUN_DIR/config.yaml and a copy of the tokenizer in RUN_DIR/tokenizer (what makes the run dir a
  checkpoint every command can read)."""
  os.makedirs(run_dir, exist_ok=True)
  with open(os.path.join(run_dir, checkpoint_io.RUN_CONFIG), "w") as f:
    yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
  if cfg.tokenizer:
    checkpoint_io.copy_tokenizer(cfg.tokenizer, os.path.join(run_dir, checkpoint_io.RUN_TOKENIZER))
