"""`merge(ckpts, weights, out)`: weighted parameter averaging of checkpoints (the recipe merges models
trained on different data mixtures). Inputs are training run dirs (their latest checkpoint) or converted
checkpoint dirs, in any mix of layouts; the output is a converted checkpoint dir (what `keye eval`,
`keye generate` and `init_from` read). Averaging runs on the host in float64, one tensor at a time.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import yaml
from jax.sharding import SingleDeviceSharding

from keye_jax.config import KeyeConfig, from_dict
from keye_jax.params import get_flat
from train.checkpointing import restore_params
from train.model_state import ModelShape


def is_run_dir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "checkpoints"))


def run_model_config(run_dir: str) -> KeyeConfig:
  with open(os.path.join(run_dir, "config.yaml")) as f:
    return from_dict(KeyeConfig, yaml.safe_load(f)["model"])


def load_run_model(run_dir: str, step: int | None = None):
  """(model config, model, step) of a run dir's checkpoint, on this process's first device."""
  cfg = run_model_config(run_dir)
  shape = ModelShape.of(cfg)
  dev = SingleDeviceSharding(jax.local_devices()[0])
  abstract = {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev) for k, s in shape.shapes().items()}
  params, step = restore_params(run_dir, abstract, step)
  return cfg, shape.build(params), step


def load_canonical(path: str) -> tuple[KeyeConfig, dict[str, np.ndarray]]:
  """(model config, canonical flat parameters) of a run dir or a converted checkpoint dir."""
  if is_run_dir(path):
    cfg, model, _ = load_run_model(path)
    return cfg, get_flat(model)
  from checkpoints_convert.convert import load_config, load_flat
  return load_config(path), load_flat(path)


def merge(ckpts, weights, out: str) -> dict:
  ckpts = list(ckpts)
  weights = [float(w) for w in (weights or [1.0] * len(ckpts))]
  if len(weights) != len(ckpts):
    raise ValueError(f"{len(ckpts)} checkpoints but {len(weights)} weights")
  if not ckpts or sum(weights) <= 0:
    raise ValueError("merge needs at least one checkpoint and weights with a positive sum")
  total = sum(weights)
  cfg, acc = None, None
  for path, w in zip(ckpts, weights):
    c, flat = load_canonical(path)
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
  from checkpoints_convert.convert import write_converted
  side = next((p for p in ckpts if not is_run_dir(p)), None)
  write_converted(out, cfg, {}, [("all", merged)], side_files_from=side)
  return {"out": os.path.abspath(out)}
