"""`run(config_path, overrides)`: one training stage, or a whole schedule (`stages:` files, see stages.py).

  distributed init -> mesh -> data iterator -> jitted step -> resume (or init_from) -> loop:
    step, metrics (console, metrics.jsonl, TensorBoard), checkpoint every N steps, SIGTERM -> save + exit,
    non-finite loss/gradient -> update skipped, too many in a row -> stop with a message.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import jax
import numpy as np
import yaml

from keye_jax.config import to_dict
from keye_jax.sharding import make_mesh
from train import distributed
from train.checkpointing import Checkpointer, restore_params
from train.config import TrainConfig, load_train_config
from train.metrics import MetricsWriter, flops_per_step, peak_flops_per_device
from train.model_state import ModelShape, batch_shardings
from train.step import abstract_state, init_state, make_step
from train.synthetic import SyntheticBatches

log = logging.getLogger("train")


class NonFiniteError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient."""


def run(config_path: str, overrides=()) -> dict:
  """Trains per the YAML at `config_path`; returns {"run_dir", "final_step", "final_loss"} (a schedule
  YAML returns the schedule's summary, see stages.run_schedule)."""
  with open(config_path) as f:
    raw = yaml.safe_load(f) or {}
  if "stages" in raw:
    from train.stages import run_schedule
    return run_schedule(config_path, overrides)
  return train(load_train_config(config_path, overrides))


def _host(x):
  """A replicated (possibly multi-process) array as numpy."""
  return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


class _GlobalBatches:
  """Per-process numpy batches -> global jax.Arrays on the mesh (what make_iterator does given a mesh)."""

  def __init__(self, local, mesh):
    self.local, self.mesh, self.shardings = local, mesh, None

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self.local)
    if self.shardings is None:
      self.shardings = batch_shardings(list(batch), self.mesh)
    n = jax.process_count()
    out = {}
    for k, v in batch.items():
      shape = list(v.shape)
      shape[1 if k == "position_ids" else 0] *= n
      out[k] = jax.make_array_from_process_local_data(self.shardings[k], v, tuple(shape))
    return out

  def get_state(self):
    return self.local.get_state()

  def set_state(self, state):
    self.local.set_state(state)


def make_data(cfg: TrainConfig, mesh):
  """(iterator of global batches, source names). No sources configured: synthetic batches."""
  d = cfg.data
  if not d.sources:
    log.warning("data.sources is empty: training on synthetic batches")
    local = SyntheticBatches(cfg.model, seq_len=d.seq_len, num_patches=d.num_patches, batch_size=d.batch_size,
                             seed=d.seed, process_index=jax.process_index(), process_count=jax.process_count())
    return _GlobalBatches(local, mesh), ["synthetic"]
  from keye_jax.processing.tokenizer import load_tokenizer
  from train.data.pipeline import make_iterator
  tokenizer = load_tokenizer(cfg.tokenizer)
  return make_iterator(d, tokenizer, mesh), [s.display_name for s in d.sources]


def _init_params(cfg: TrainConfig, fns, shape: ModelShape):
  """Parameters from `init_from` (a run dir of ours, or a converted checkpoint dir), else None."""
  src = cfg.init_from
  if not src:
    return None
  shardings = fns.state_shardings["params"]
  if os.path.isdir(os.path.join(src, "checkpoints")):
    abstract = {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shardings[k]) for k, s in shape.shapes().items()}
    params, step = restore_params(src, abstract)
    log.info("initialised from %s (step %d)", src, step)
    return params
  from checkpoints_convert.convert import load_flat
  from flax import nnx

  from keye_jax.model import KeyeVL
  from keye_jax.params import set_flat
  model = KeyeVL(cfg.model, rngs=nnx.Rngs(cfg.seed))
  set_flat(model, load_flat(src))
  log.info("initialised from converted checkpoint %s", src)
  return jax.device_put(shape.flatten(model), shardings)


class _Preemption:
  """SIGTERM sets a flag the loop checks after each step (then: save, exit cleanly)."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._old = None
    return self

  def _handle(self, signum, frame):
    log.warning("SIGTERM: saving a checkpoint after this step, then exiting")
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def train(cfg: TrainConfig) -> dict:
  distributed.initialize(cfg.distributed)
  primary = jax.process_index() == 0
  run_dir = os.path.abspath(cfg.run_dir)
  if primary:
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
      yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
  mesh = make_mesh(cfg.mesh)
  data, sources = make_data(cfg, mesh)
  shape = ModelShape.of(cfg.model)
  first = next(data)  # the step needs the batch's keys; this batch is the first one trained on
  fns = make_step(cfg, shape, mesh, len(sources), list(first))
  ckpt = Checkpointer(run_dir, cfg.checkpoint.every, cfg.checkpoint.keep)
  start = ckpt.latest_step()
  if start is not None:
    state = ckpt.restore(start, abstract_state(fns), data)
    first = next(data)  # the batch after the restored position
    log.info("resumed %s at step %d", run_dir, start)
  else:
    state = init_state(fns, cfg.seed, _init_params(cfg, fns, shape))
    start = 0

  d = cfg.data
  flops = flops_per_step(cfg.model, d.batch_size, d.seq_len, d.num_patches if cfg.model.vision else 0)
  peak = peak_flops_per_device(jax.devices()[0], cfg.peak_tflops) * jax.device_count()
  writer = MetricsWriter(run_dir, cfg.steps, primary)
  step, loss, batch = start, float("nan"), first
  try:
    with _Preemption() as preempt:
      while step < cfg.steps:
        t0 = time.perf_counter()
        state, m = fns.step(state, batch)
        m = jax.tree.map(_host, m)
        seconds = time.perf_counter() - t0
        step += 1
        loss = float(m["loss"])
        if step % cfg.log_every == 0 or step == cfg.steps or bool(m["skipped_step"]):
          writer.write(_record(step, m, seconds, flops, peak, sources, int(_host(state["skipped"]))))
        if bool(m["skipped_step"]):
          log.warning("step %d: non-finite loss %s or grad norm %s; update skipped", step, m["loss"],
                      m["grad_norm"])
          nonfinite = int(_host(state["nonfinite"]))
          if nonfinite >= cfg.max_nonfinite:
            raise NonFiniteError(
                f"{nonfinite} consecutive steps (up to step {step}) had a non-finite loss or gradient; stopping "
                f"(max_nonfinite={cfg.max_nonfinite}). The last good checkpoint is step "
                f"{ckpt.latest_step()} in {ckpt.dir}. Lower the learning rate or check the data.")
        ckpt.maybe_save(step, state, data, force=step == cfg.steps or preempt.requested)
        if preempt.requested:
          ckpt.wait()
          log.warning("checkpoint of step %d saved; exiting after SIGTERM", step)
          return {"run_dir": run_dir, "final_step": step, "final_loss": loss, "preempted": True}
        if step < cfg.steps:
          batch = next(data)
  finally:
    ckpt.close()
    writer.close()
    if hasattr(data, "close"):
      data.close()
  return {"run_dir": run_dir, "final_step": step, "final_loss": loss}


def _record(step, m, seconds, flops, peak, sources, skipped) -> dict:
  tokens = float(m["tokens"])
  rec = {"step": step, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
         "tokens_per_second": tokens / seconds, "step_seconds": seconds, "loss_tokens": float(m["loss_tokens"]),
         "mfu": flops / seconds / peak, "skipped_steps": skipped}
  for k, v in m.items():
    if k.startswith("lr/"):
      rec[k] = float(v)
  for i, name in enumerate(sources):
    n = float(m["source_tokens"][i])
    if n > 0:
      rec[f"loss/{name}"] = float(m["source_loss_sum"][i]) / n
  return rec
