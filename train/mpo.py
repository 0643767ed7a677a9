"""MPO through `keye train` (`loss: mpo`): the packed-pair loss and the reference log-probs, computed once.

Data: preference pairs (train/preference_data.py), a pair's chosen and rejected sequences packed as two
adjacent segments of one row. Loss: train.losses.preference's MPO, w_dpo DPO-sigmoid + w_bco BCO-pair +
w_sft SFT over the sequences' summed log-probabilities (token_logprobs, summed per segment), written as the
training step's (sum, denominator) with denominator = pairs so that microbatching changes nothing:

  sum = sum_pairs (w_dpo dpo_i + w_bco bco_i) + w_sft (P / T) sum_pairs -logp(chosen_i)

with P, T the global batch's pairs and chosen target tokens (per-row fields the data carries), so
sum / denominator over the global batch is exactly mpo_loss of the batch.

Reference log-probs: one pass of the frozen initial model (the `init_from` checkpoint, or the seeded
random initialisation the trainer itself would make) over every pair of every source, before the first
step, stored in RUN_DIR/mpo_reference.npz (keys, (chosen, rejected) log-probs, and a fingerprint of the
data and the initial model); training batches carry them (`ref_logps`). A resumed run, or another epoch,
reads the file and never runs the reference model again: each pair's reference is computed exactly once
per run, and no second copy of the model lives beside the policy during training.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from keye_jax import batch_layout
from train.config import TrainConfig
from train.losses.cross_entropy import next_token_targets, token_logprobs
from train.losses.preference import bco_pair, dpo_sigmoid

log = logging.getLogger("train")
REFERENCE_FILE = "mpo_reference.npz"
# Reference passes run in this process and the pairs they scored (tests count them).
REFERENCE_STATS = {"passes": 0, "pairs": 0}


def pair_sums(values_bs, batch, reduce=jax.ops.segment_sum):
  """(B, M, 2) per pair and side (0 chosen, 1 rejected) of `values_bs` (B, S) reduced over each sequence's
  tokens, M = S // 2 pairs at most per row; padding tokens are left out."""
  b, s = values_bs.shape
  m = s // 2
  pid, side = batch["pair_ids"], batch["pair_side"]
  slot = (pid - 1) * 2 + side - 1
  seg = jnp.where(side > 0, jnp.arange(b)[:, None] * 2 * m + slot, b * 2 * m)  # padding -> a dump segment
  out = reduce(values_bs.reshape(-1), seg.reshape(-1), num_segments=b * 2 * m + 1)
  return out[:-1].reshape(b, m, 2)


def sequence_logps(model, batch, *, chunk: int):
  """(summed target log-probs (B, M, 2), target tokens (B, M, 2), pair present (B, M) bool)."""
  lp = token_logprobs(model, batch, chunk=chunk)
  _, w = next_token_targets(batch)  # position t counts when token t+1 is a target of t's segment
  present = pair_sums((batch["segment_ids"] > 0).astype(jnp.float32), batch)[..., 0] > 0
  return pair_sums(lp * w, batch), pair_sums(w, batch), present


def mpo_loss_fn(cfg: TrainConfig):
  """loss_fn(model, batch) -> (sum, pairs, metrics) for train.step.make_step (module doc)."""
  m = cfg.mpo
  weights = m.weights

  def loss_fn(model, batch):
    logps, tokens, valid = sequence_logps(model, batch, chunk=cfg.loss_chunk)
    ref = pair_sums(batch["ref_logps"].astype(jnp.float32), batch)
    valid = valid.reshape(-1).astype(jnp.float32)
    c, r = logps[..., 0].reshape(-1), logps[..., 1].reshape(-1)
    rc, rr = ref[..., 0].reshape(-1), ref[..., 1].reshape(-1)
    total_pairs = jnp.maximum(jnp.max(batch["mpo_pairs"]), 1.0)
    total_tokens = jnp.maximum(jnp.max(batch["mpo_chosen_tokens"]), 1.0)
    dpo = jnp.sum(valid * dpo_sigmoid(c, r, rc, rr, beta=m.beta, label_smoothing=m.label_smoothing))
    bco = jnp.sum(valid * bco_pair(c, r, rc, rr, beta=m.beta, delta=m.bco_delta))
    nll = -jnp.sum(valid * c)
    total = weights["dpo"] * dpo + weights["bco"] * bco + weights["sft"] * nll * (total_pairs / total_tokens)
    rew_c = jax.lax.stop_gradient(m.beta * (c - rc))
    rew_r = jax.lax.stop_gradient(m.beta * (r - rr))
    sg = jax.lax.stop_gradient
    # Metrics are this microbatch's share of the global batch's mean (the step sums them).
    metrics = {"loss_dpo": sg(dpo) / total_pairs, "loss_bco": sg(bco) / total_pairs,
               "loss_sft": sg(nll) / total_tokens, "pairs": jnp.sum(valid),
               "reward_chosen": jnp.sum(valid * rew_c) / total_pairs,
               "reward_rejected": jnp.sum(valid * rew_r) / total_pairs,
               "reward_accuracy": jnp.sum(valid * (rew_c > rew_r)) / total_pairs,
               "reward_margin": jnp.sum(valid * (rew_c - rew_r)) / total_pairs,
               "chosen_tokens": jnp.sum(valid * tokens[..., 0].reshape(-1))}
    return total, jnp.sum(valid), metrics

  return loss_fn


# ---- the reference pass -------------------------------------------------------------------------------


def fingerprint(cfg: TrainConfig) -> dict:
  """What the stored reference log-probs depend on: the pairs' files, their encoding and the initial model."""
  files = []
  for s in cfg.data.sources:
    path = os.path.abspath(s.path)
    files.append([path, os.path.getsize(path) if os.path.isfile(path) else None])
  return {"sources": files, "seq_len": cfg.data.seq_len, "num_patches": cfg.data.num_patches,
          "vision": cfg.data.vision, "init_from": os.path.abspath(cfg.init_from) if cfg.init_from else None,
          "seed": None if cfg.init_from else cfg.seed, "model": repr(cfg.model)}


def read_reference(path: str) -> tuple[dict, dict]:
  """(fingerprint, {key: (chosen, rejected)}) from a stored reference file."""
  with np.load(path) as z:
    keys, logps, fp = z["keys"], z["logps"], json.loads(str(z["fingerprint"]))
  return fp, {int(k): (float(a), float(b)) for k, (a, b) in zip(keys, logps)}


def _write_reference(path: str, fp: dict, table: dict) -> None:
  keys = np.asarray(sorted(table), np.int64)
  logps = np.asarray([table[k] for k in keys], np.float32).reshape(-1, 2)
  tmp = path + ".tmp.npz"
  np.savez(tmp, keys=keys, logps=logps, fingerprint=np.asarray(json.dumps(fp)))
  os.replace(tmp, path)


def initial_params(cfg: TrainConfig, shape, mesh) -> dict:
  """The parameters the trainer starts from: `init_from`, else its seeded initialisation (train.step)."""
  from train.loop import _init_params
  from train.model_state import init_params
  shardings = shape.shardings(mesh)
  if cfg.init_from:
    return _init_params(cfg, types.SimpleNamespace(state_shardings={"params": shardings}), shape)
  return init_params(shape, cfg.seed, shardings)


def reference_function(cfg: TrainConfig, shape, mesh, batch_keys):
  """Jitted (params, batch) -> (summed log-probs (B, M, 2), pair keys (B, M), present (B, M)), replicated."""
  from jax.sharding import NamedSharding, PartitionSpec

  compute = jnp.dtype(cfg.model.dtype)

  def run(params, batch):
    # as train.step casts them, so that the reference is the step's own forward at step 0
    params = {k: v.astype(compute) if (k.endswith("kernel") or k == "decoder/embed/embedding")
              and compute.itemsize < v.dtype.itemsize else v for k, v in params.items()}
    logps, _, present = sequence_logps(shape.build(params), batch, chunk=cfg.loss_chunk)
    keys = pair_sums(batch["pair_keys"], batch, reduce=jax.ops.segment_max)[..., 0]
    return logps, keys, present

  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(run, in_shardings=(shape.shardings(mesh), batch_layout.shardings(batch_keys, mesh)),
                 out_shardings=replicated)


def compute_reference(cfg: TrainConfig, mesh, tokenizer, params=None) -> dict:
  """{pair key: (chosen, rejected) summed log-probs} of every pair under the initial model: one pass."""
  from train.model_state import ModelShape
  from train.preference_data import pair_row, reference_pass_iterator
  from train.data.decode import token_ids
  from train.data.packing import stack_rows
  shape = ModelShape.of(cfg.model)
  if params is None:
    params = initial_params(cfg, shape, mesh)
  it = reference_pass_iterator(cfg.data, tokenizer)
  pc = jax.process_count()
  local = cfg.data.batch_size // pc
  empty = stack_rows([pair_row([], cfg.data, token_ids(tokenizer), None, True)] * local)
  empty.update(mpo_pairs=np.zeros(local, np.float32), mpo_chosen_tokens=np.zeros(local, np.float32))
  fn, table, t0 = None, {}, time.perf_counter()
  REFERENCE_STATS["passes"] += 1
  while True:
    try:
      batch, more = next(it), 1
    except StopIteration:
      batch, more = empty, 0
    if pc > 1:  # every process runs every batch of the pass; one that ran out feeds empty rows
      from jax.experimental import multihost_utils
      more = int(np.max(multihost_utils.process_allgather(np.asarray(more))))
    if not more:
      break
    batch = batch_layout.to_global(batch, mesh)
    if fn is None:
      fn = reference_function(cfg, shape, mesh, list(batch))
    with jax.set_mesh(mesh):
      logps, keys, present = jax.device_get(fn(params, batch))
    for lp, k in zip(logps[present], keys[present]):
      if int(k) in table:
        raise RuntimeError(f"reference pass: pair key {int(k)} scored twice")
      table[int(k)] = (float(lp[0]), float(lp[1]))
  REFERENCE_STATS["pairs"] += len(table)
  print(f"reference log-probs of {len(table)} pairs in {time.perf_counter() - t0:.1f} s "
        f"(stats {it.stats()['sources']})", file=sys.stderr, flush=True)
  return table


def reference_logps(cfg: TrainConfig, mesh, tokenizer) -> dict:
  """The run's reference table: RUN_DIR/mpo_reference.npz when it matches this config, else computed now
  (module doc) and written there."""
  run_dir = os.path.abspath(cfg.run_dir)
  path = os.path.join(run_dir, REFERENCE_FILE)
  fp = fingerprint(cfg)
  if os.path.exists(path):
    stored, table = read_reference(path)
    if stored == fp:
      print(f"reference log-probs of {len(table)} pairs read from {path}", file=sys.stderr, flush=True)
      return table
    from keye_jax import checkpoint_io
    if checkpoint_io.run_steps(run_dir):
      raise ValueError(f"{path}: computed for other data or another initial model than this config's, and "
                       "the run has checkpoints; use a new run_dir")
    log.warning("%s: stale (data or initial model changed); recomputing", path)
  table = compute_reference(cfg, mesh, tokenizer)
  if jax.process_index() == 0:
    os.makedirs(run_dir, exist_ok=True)
    _write_reference(path, fp, table)
  return table


def make_data(cfg: TrainConfig, mesh):
  """(iterator of global pair batches carrying reference log-probs, source names) for train.loop."""
  if not cfg.data.sources:
    raise ValueError("loss: mpo needs data.sources holding preference pairs (train/preference_data.py)")
  from keye_jax.processing.tokenizer import load_tokenizer
  from train.preference_data import make_pair_iterator
  tokenizer = load_tokenizer(cfg.tokenizer)
  reference = reference_logps(cfg, mesh, tokenizer)
  return make_pair_iterator(cfg.data, tokenizer, reference, mesh), [s.display_name for s in cfg.data.sources]
