"""Streaming access to HF safetensors checkpoints: one tensor at a time, never the whole checkpoint."""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from keye_jax.checkpoint_io import CheckpointError  # noqa: F401  (defined with the checkpoint IO)

INDEX = "model.safetensors.index.json"
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}




class SafetensorsReader:
  """Name -> file map of a single-file or sharded (index.json) checkpoint; `get(name)` reads one tensor."""

  def __init__(self, hf_dir: str):
    self.dir = hf_dir
    if not os.path.isdir(hf_dir):
      raise CheckpointError(f"{hf_dir}: not a directory")
    index = os.path.join(hf_dir, INDEX)
    if os.path.exists(index):
      with open(index) as f:
        try:
          weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
          raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(n for n in os.listdir(hf_dir) if n.endswith(".safetensors"))
      if not files:
        raise CheckpointError(f"{hf_dir}: no *.safetensors files and no {INDEX}")
      weight_map = None
    self.files = {}
    for name in files:
      path = os.path.join(hf_dir, name)
      if not os.path.exists(path):
        raise CheckpointError(f"{path}: listed in {INDEX} but missing")
      try:
        with safe_open(path, framework="numpy") as f:
          for key in f.keys():
            self.files[key] = path
      except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: cannot read safetensors header ({e})") from e
    if weight_map is not None:
      missing = sorted(k for k in weight_map if k not in self.files)
      if missing:
        raise CheckpointError(f"{missing[0]}: listed in {INDEX} under {weight_map[missing[0]]} but not in that file")

  def keys(self) -> list[str]:
    return sorted(self.files)

  def shape(self, name: str) -> tuple[int, ...]:
    with safe_open(self.files[name], framework="numpy") as f:
      return tuple(f.get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    """Reads one tensor straight into its own buffer (one copy in memory, not two)."""
    path = self.files[name]
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      info = json.loads(f.read(n))[name]
      if info["dtype"] not in _DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
      start, end = info["data_offsets"]
      x = np.empty(info["shape"], _DTYPES[info["dtype"]])
      if x.nbytes != end - start:
        raise CheckpointError(f"{path}: tensor {name} holds {end - start} bytes, its shape needs {x.nbytes}")
      f.seek(8 + n + start)
      if f.readinto(memoryview(x.reshape(-1)).cast("B")) != x.nbytes:
        raise CheckpointError(f"{path}: file ends inside tensor {name}")
    return x


class ShardedWriter:
  """Writes tensors into shards of at most `max_shard_bytes` plus an index, holding one shard at a time."""

  def __init__(self, out_dir: str, max_shard_bytes: int = 2 << 30):
    self.out_dir, self.max_bytes = out_dir, max_shard_bytes
    self.pending: dict[str, np.ndarray] = {}
    self.pending_bytes = 0
    self.shards: list[dict[str, np.ndarray] | list[str]] = []
    self.weight_map: dict[str, str] = {}
    self.total_bytes = 0

  def add(self, name: str, x: np.ndarray) -> None:
    if self.pending and self.pending_bytes + x.nbytes > self.max_bytes:
      self._flush()
    self.pending[name] = np.ascontiguousarray(x)
    self.pending_bytes += x.nbytes
    self.total_bytes += x.nbytes

  def _flush(self) -> None:
    name = f"model-{len(self.shards) + 1:05d}.safetensors"
    save_file(self.pending, os.path.join(self.out_dir, name), metadata={"format": "pt"})
    self.shards.append(list(self.pending))
    for k in self.pending:
      self.weight_map[k] = name
    self.pending, self.pending_bytes = {}, 0

  def close(self) -> None:
    if self.pending:
      self._flush()
    n = len(self.shards)
    if n == 1:  # a single shard keeps the plain single-file name
      os.rename(os.path.join(self.out_dir, "model-00001.safetensors"),
                os.path.join(self.out_dir, "model.safetensors"))
      return
    renamed = {}
    for i in range(n):
      old = f"model-{i + 1:05d}.safetensors"
      new = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
      os.rename(os.path.join(self.out_dir, old), os.path.join(self.out_dir, new))
      renamed[old] = new
    index = {"metadata": {"total_size": self.total_bytes},
             "weight_map": {k: renamed[v] for k, v in sorted(self.weight_map.items())}}
    with open(os.path.join(self.out_dir, INDEX), "w") as f:
      json.dump(index, f, indent=2)
