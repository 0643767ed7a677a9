"""A flat, layout-independent view of a model's parameters.

Canonical paths are '/'-joined nnx state paths in the per-layer spelling
(`decoder/layers/layers/3/attn/q_proj/kernel`), whatever the model's layout: a scanned model's stacked
tensors are split per layer on the way out and stacked on the way in. Checkpoints, conversion and
merging all speak this view, so scanned and unscanned models read and write the same files.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_STACK = "layers/layers"


def _model_paths(model) -> dict[str, nnx.Variable]:
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {"/".join(str(k) for k in path): var for path, var in flat}


def _is_stacked(path: str) -> bool:
  # A scanned stack's params follow "layers/layers/" directly with a name, not a layer index.
  m = re.search(rf"{_STACK}/([^/]+)", path)
  return m is not None and not m.group(1).isdigit()


def canonical_shapes(model) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Canonical path -> (shape, dtype) for every parameter, without touching values."""
  out = {}
  for path, var in _model_paths(model).items():
    x = var.get_value()
    if _is_stacked(path):
      for i in range(x.shape[0]):
        out[path.replace(f"{_STACK}/", f"{_STACK}/{i}/", 1)] = (tuple(x.shape[1:]), x.dtype)
    else:
      out[path] = (tuple(x.shape), x.dtype)
  return out


def get_flat(model) -> dict[str, np.ndarray]:
  """Canonical path -> host numpy array."""
  out = {}
  for path, var in _model_paths(model).items():
    x = np.asarray(jax.device_get(var.get_value()))
    if _is_stacked(path):
      for i in range(x.shape[0]):
        out[path.replace(f"{_STACK}/", f"{_STACK}/{i}/", 1)] = x[i]
    else:
      out[path] = x
  return out


def set_flat(model, flat: dict[str, np.ndarray], *, strict: bool = True) -> None:
  """Writes canonical-path arrays into `model` (in place), casting to each parameter's dtype and
  keeping its sharding. With strict, a missing or extra path, or a wrong shape, raises KeyError/ValueError
  naming it."""
  used = set()
  for path, var in _model_paths(model).items():
    old = var.get_value()
    if _is_stacked(path):
      keys = [path.replace(f"{_STACK}/", f"{_STACK}/{i}/", 1) for i in range(old.shape[0])]
      missing = [k for k in keys if k not in flat]
      if missing:
        if strict:
          raise KeyError(f"missing parameter {missing[0]}")
        continue
      new = np.stack([np.asarray(flat[k]) for k in keys])
      used.update(keys)
    else:
      if path not in flat:
        if strict:
          raise KeyError(f"missing parameter {path}")
        continue
      new = np.asarray(flat[path])
      used.add(path)
    if tuple(new.shape) != tuple(old.shape):
      raise ValueError(f"parameter {path}: checkpoint shape {tuple(new.shape)} != model shape {tuple(old.shape)}")
    arr = jnp.asarray(new, dtype=old.dtype)
    sharding = getattr(old, "sharding", None)
    var.set_value(jax.device_put(arr, sharding) if sharding is not None else arr)
  extra = sorted(set(flat) - used)
  if extra and strict:
    raise KeyError(f"unexpected parameter {extra[0]} (not in the model)")
