"""Orbax checkpoints of a run: train state (params, optimizer, step, RNG, counters) + data-iterator state.

Layout: RUN_DIR/checkpoints/<step>/{state, data}. Saves are asynchronous (training continues while the
arrays are written) and atomic: Orbax writes into a temporary directory and renames it only once every
file is complete, so a crash during a save leaves the previous checkpoint as the latest good one (the
half-written temporary directory is removed on the next start).
"""

from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp

log = logging.getLogger("train")


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
    self.dir = os.path.abspath(os.path.join(run_dir, "checkpoints"))
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


def restore_params(run_dir: str, abstract_params: dict, step: int | None = None) -> tuple[dict, int]:
  """Only the parameters of a run's checkpoint (latest unless `step`), laid out like `abstract_params`
  (another stage's trainable set or mesh is fine: optimizer state is not read)."""
  directory = os.path.abspath(os.path.join(run_dir, "checkpoints"))
  mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  # Read the parameters only (partial restore): the optimizer state may belong to another trainable set.
  target = {"params": abstract_params}
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(target, restore_args=_restore_args(target), partial_restore=True)))
  mngr.close()
  return restored["state"]["params"], step


def _restore_args(target):
  return jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype),
                      target)
