"""`merge(ckpts, weights, out)`: weighted parameter averaging of checkpoints (the recipe merges models
trained on different data mixtures). Inputs are any checkpoint arguments (run dirs: their latest
checkpoint; converted checkpoint dirs), in any mix of layouts; the output is a converted checkpoint dir
(what `keye eval`, `keye generate` and `init_from` read) carrying the first input's config and tokenizer.
Averaging runs on the host in float64, one tensor at a time.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from keye_jax import checkpoint_io
from keye_jax.checkpoint_io import load_canonical, progress  # noqa: F401  (load_canonical: for callers of merge)


def merge(ckpts, weights, out: str) -> dict:
  t0 = time.time()
  ckpts = list(ckpts)
  weights = [float(w) for w in (weights or [1.0] * len(ckpts))]
  if len(weights) != len(ckpts):
    raise ValueError(f"{len(ckpts)} checkpoints but {len(weights)} weights")
  if not ckpts or sum(weights) <= 0:
    raise ValueError("merge needs at least one checkpoint and weights with a positive sum")
  refs = [checkpoint_io.resolve(p) for p in ckpts]  # every input checked before any is read
  out = os.path.abspath(out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise checkpoint_io.CheckpointError(f"{out}: output directory exists and is not empty")
  total = sum(weights)
  cfg, acc, dtypes = None, None, None
  for i, (path, ref, w) in enumerate(zip(ckpts, refs, weights)):
    progress(f"merge: reading {i + 1}/{len(refs)}: {ref.describe()} (weight {w / total:.3f})")
    c, flat = checkpoint_io.load_canonical(ref)
    if acc is None:
      cfg, dtypes = c, {k: v.dtype for k, v in flat.items()}
      acc = {k: np.zeros(v.shape, np.float64) for k, v in flat.items()}
    if set(flat) != set(acc):
      diff = sorted(set(flat) ^ set(acc))
      raise ValueError(f"{path}: parameters differ from {ckpts[0]} (e.g. {diff[0]})")
    for k, v in flat.items():
      if v.shape != acc[k].shape:
        raise ValueError(f"{path}: {k} has shape {v.shape}, {ckpts[0]} has {acc[k].shape}")
      acc[k] += (w / total) * np.asarray(v, np.float64)
    del flat
  merged = {k: v.astype(dtypes[k]) for k, v in acc.items()}
  del acc
  first = refs[0]
  hf_config = {}
  if first.kind == "converted":
    with open(os.path.join(first.path, "config.json")) as f:
      hf_config = json.load(f)
  tokenizer = next((r.tokenizer_dir for r in refs if r.tokenizer_dir), None)
  checkpoint_io.write_converted(out, cfg, hf_config, [("all", merged)], tokenizer_from=tokenizer, what="merge")
  progress(f"merge: wrote {out} in {time.time() - t0:.1f} s")
  return {"out": out}
