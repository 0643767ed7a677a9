"""`train(cfg)`: one training stage (`keye train` dispatches stage and schedule files in stages.py).

  distributed init -> mesh -> data iterator -> jitted step -> resume (or init_from) -> loop:
    step, metrics (console, metrics.jsonl, TensorBoard), checkpoint every N steps, SIGTERM or Ctrl-C ->
    save + exit, non-finite loss/gradient -> update skipped, too many in a row -> stop with a message.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

import jax
import numpy as np

from keye_jax import checkpoint_io
from keye_jax.sharding import make_mesh
from train import distributed
from train.checkpointing import Checkpointer, check_run_dir, finished_run, write_run_files
from train.config import TrainConfig
from train.data.pipeline import GlobalBatchIterator, make_iterator
from train.metrics import MetricsWriter, flops_per_step, peak_flops_per_device
from train.model_state import ModelShape
from train.step import abstract_state, init_state, make_step
from train.synthetic import SyntheticBatches

log = logging.getLogger("train")


class NonFiniteError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient."""


def _host(x):
  """A replicated (possibly multi-process) array as numpy."""
  return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def make_data(cfg: TrainConfig, mesh):
  """(iterator of global batches, source names). No sources configured: synthetic batches."""
  d = cfg.data
  if cfg.loss == "mpo":  # preference pairs with their reference log-probs (train/mpo.py)
    from train import mpo
    return mpo.make_data(cfg, mesh)
  if not d.sources:
    log.warning("data.sources is empty: training on synthetic batches")
    local = SyntheticBatches(cfg.model, seq_len=d.seq_len, num_patches=d.num_patches, batch_size=d.batch_size,
                             seed=d.seed, process_index=jax.process_index(), process_count=jax.process_count())
    return GlobalBatchIterator(local, mesh), ["synthetic"]
  from keye_jax.processing.tokenizer import load_tokenizer
  tokenizer = load_tokenizer(cfg.tokenizer)
  return make_iterator(d, tokenizer, mesh), [s.display_name for s in d.sources]


def _init_params(cfg: TrainConfig, fns, shape: ModelShape):
  """Parameters from `init_from` (any checkpoint argument: run dir or converted dir), else None."""
  if not cfg.init_from:
    return None
  ref = checkpoint_io.resolve(cfg.init_from)
  shardings = fns.state_shardings["params"]
  print(f"initialising from {ref.describe()}", file=sys.stderr, flush=True)
  if ref.kind == "run":
    abstract = {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shardings[k]) for k, s in shape.shapes().items()}
    return checkpoint_io.restore_run_params(ref.path, abstract, ref.step)[0]
  from flax import nnx

  from keye_jax.model import KeyeVL
  from keye_jax.params import set_flat
  model = KeyeVL(cfg.model, rngs=nnx.Rngs(cfg.seed))
  set_flat(model, checkpoint_io.load_flat(ref.path))
  return jax.device_put(shape.flatten(model), shardings)


class _Preemption:
  """SIGTERM or Ctrl-C (SIGINT) sets a flag the loop checks after each step (then: save, exit); a second
  Ctrl-C interrupts at once."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = None  # the signal's name once one arrived
    self._old = {}

  def __enter__(self):
    for sig in self.SIGNALS:
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    if self.requested == "SIGINT" and signum == signal.SIGINT:
      raise KeyboardInterrupt
    print(f"{name}: saving a checkpoint after this step, then exiting", file=sys.stderr, flush=True)
    self.requested = name

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def train(cfg: TrainConfig) -> dict:
  distributed.initialize(cfg.distributed)
  primary = jax.process_index() == 0
  run_dir = os.path.abspath(cfg.run_dir)
  check_run_dir(cfg, run_dir)
  done = finished_run(run_dir, cfg.steps)
  if done is not None:
    print(f"{run_dir}: at step {done['final_step']} of {cfg.steps}, nothing to train", file=sys.stderr, flush=True)
    return done
  if cfg.data.sources and not cfg.tokenizer:
    raise ValueError("tokenizer: empty; training on data sources needs a tokenizer directory")
  if cfg.tokenizer and not os.path.exists(os.path.join(cfg.tokenizer, "tokenizer.json")) \
      and not cfg.tokenizer.endswith(".json"):
    raise FileNotFoundError(f"tokenizer: {cfg.tokenizer} holds no tokenizer.json (`keye data demo DIR` writes "
                            "the demo's into DIR/tokenizer)")
  if primary:
    write_run_files(cfg, run_dir)
  mesh = make_mesh(cfg.mesh)
  data, sources = make_data(cfg, mesh)
  shape = ModelShape.of(cfg.model)
  first = next(data)  # the step needs the batch's keys; this batch is the first one trained on
  loss_fn = None
  if cfg.loss == "mpo":
    from train.mpo import mpo_loss_fn
    loss_fn = mpo_loss_fn(cfg)
  fns = make_step(cfg, shape, mesh, len(sources), list(first), loss_fn=loss_fn)
  ckpt = Checkpointer(run_dir, cfg.checkpoint.every, cfg.checkpoint.keep)
  start = ckpt.latest_step()
  if start is not None:
    print(f"resuming from step {start} ({run_dir})", file=sys.stderr, flush=True)
    state = ckpt.restore(start, abstract_state(fns), data)
    first = next(data)  # the batch after the restored position
  else:
    state = init_state(fns, cfg.seed, _init_params(cfg, fns, shape))
    start = 0

  d = cfg.data
  peak = peak_flops_per_device(jax.devices()[0], cfg.peak_tflops)  # None: unknown (CPU), no MFU
  peak = peak * jax.device_count() if peak else None
  writer = MetricsWriter(run_dir, cfg.steps, primary, resume_step=start)
  step, loss, batch = start, None, first
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
          flops = real_flops(cfg, m, batch) if peak else 0.0
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
          print(f"checkpoint of step {step} saved; exiting after {preempt.requested}", file=sys.stderr, flush=True)
          return {"run_dir": run_dir, "final_step": step, "final_loss": loss, "preempted": True,
                  "signal": preempt.requested}
        if step < cfg.steps:
          batch = next(data)
  finally:
    ckpt.close()
    writer.close()
    if hasattr(data, "close"):
      data.close()
  return {"run_dir": run_dir, "final_step": step, "final_loss": loss}


def real_flops(cfg: TrainConfig, m: dict, batch: dict) -> float:
  """Analytic FLOPs of the step's real (non-padding) tokens and patches."""
  import jax.numpy as jnp
  patches = float(jnp.sum(batch["patch_segment_ids"] > 0)) if "patch_segment_ids" in batch else 0.0
  return flops_per_step(cfg.model, 1, cfg.data.seq_len, 0) * float(m["tokens"]) / cfg.data.seq_len \
      + (flops_per_step(cfg.model, 1, 0, 1) * patches if cfg.model.vision is not None else 0.0)


def _record(step, m, seconds, flops, peak, sources, skipped) -> dict:
  """One metrics line: the step's time, throughput and MFU, then whatever the step and its loss returned:
  per-source sums `source_<x>_sum` (K,) over `source_tokens` (K,) as `<x>/<source>` (sources without
  tokens in this batch left out), every other scalar as it is."""
  rec = {"step": step, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
         "tokens_per_second": float(m["tokens"]) / seconds, "step_seconds": seconds,
         "mfu": flops / seconds / peak if peak else None, "skipped_steps": skipped}
  counts = np.asarray(m.get("source_tokens", np.zeros(0)))
  for k, v in m.items():
    v = np.asarray(v)
    if k in rec or k in ("skipped_step", "source_tokens"):
      continue
    if k.startswith("source_") and k.endswith("_sum") and v.shape == counts.shape:
      for i, name in enumerate(sources[:len(counts)]):
        if counts[i] > 0:
          rec[f"{k[len('source_'):-len('_sum')]}/{name}"] = float(v[i]) / float(counts[i])
    elif v.ndim == 0:
      rec[k] = float(v)
  return rec
