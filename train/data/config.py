"""Data configuration: which sources, how they mix, and the fixed shapes of a packed batch.

Frozen dataclasses in the style of keye_jax/config.py; build them with `from_dict`/`load` from there:

  sources:
    - {path: demo/train.jsonl, weight: 0.5}                  # JSONL manifest, media relative to it
    - {path: demo/array_record/train, weight: 0.3}           # ArrayRecord file(s), media inline
    - {path: keye_demo, kind: tfds, data_dir: demo/tfds, split: train, weight: 0.2}
  seq_len: 8192          # S, text tokens per row
  num_patches: 16384     # P, vision patches per row
  batch_size: 8          # global rows per step (split evenly over processes)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from keye_jax.config import ConfigError, path_field


@dataclasses.dataclass(frozen=True)
class SourceConfig:
  """One source. `kind` "auto" infers it: *.jsonl -> jsonl, *.array_record* or a directory of them ->
  array_record, a TFDS dataset directory (has dataset_info.json) or `kind: tfds` -> tfds."""

  path: str = path_field(unless="data_dir")  # relative: to the YAML file (see keye_jax/config.py)
  kind: str = "auto"  # auto | jsonl | array_record | tfds
  weight: float = 1.0
  name: str = ""  # for per-source counts and loss; defaults to the file name
  split: str = "train"  # tfds only
  data_dir: str = path_field()  # tfds only: the TFDS data_dir when `path` is a dataset name

  @property
  def display_name(self) -> str:
    return self.name or os.path.basename(os.path.normpath(self.path)) or self.path


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Sources, mixing, packing shapes and failure policy of the training data pipeline."""

  sources: tuple[SourceConfig, ...] = ()
  seq_len: int = 1024  # S: text tokens per packed row
  num_patches: int = 2048  # P: vision patches per packed row (multiple of 4)
  batch_size: int = 8  # global rows; each process yields batch_size // process_count
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None  # None repeats forever (training); an int gives a finite iterator
  workers: int = 0  # decoding processes (0: decode in the main process)
  worker_buffer_size: int = 4  # examples each worker may run ahead
  packing: str = "best_fit"  # best_fit | first_fit
  packing_bins: int = 16  # rows kept open while packing; more bins, less padding
  overlong: str = "truncate"  # truncate (at a safe point, never inside a vision span) | drop
  max_bad_fraction: float = 0.05  # per source; above it (after bad_check_min_samples) the run fails
  bad_check_min_samples: int = 100
  log_first_errors: int = 5  # per source
  vision: dict[str, Any] = dataclasses.field(default_factory=dict)  # encode_example keyword arguments

  def __post_init__(self):
    if self.num_patches % 4:
      raise ConfigError(f"data.num_patches={self.num_patches} must be a multiple of 4")
    if self.seq_len <= 0 or self.batch_size <= 0 or self.packing_bins <= 0:
      raise ConfigError("data.seq_len, data.batch_size and data.packing_bins must be positive")
    if self.packing not in ("best_fit", "first_fit"):
      raise ConfigError(f"data.packing={self.packing!r} is not one of best_fit, first_fit")
    if self.overlong not in ("truncate", "drop"):
      raise ConfigError(f"data.overlong={self.overlong!r} is not one of truncate, drop")
    if not 0.0 <= self.max_bad_fraction <= 1.0:
      raise ConfigError(f"data.max_bad_fraction={self.max_bad_fraction} must be in [0, 1]")
    for i, s in enumerate(self.sources):
      if s.kind not in ("auto", "jsonl", "array_record", "tfds"):
        raise ConfigError(f"data.sources[{i}].kind={s.kind!r} is not one of auto, jsonl, array_record, tfds")
      if not s.path:
        raise ConfigError(f"data.sources[{i}].path is empty")
      if s.weight <= 0:
        raise ConfigError(f"data.sources[{i}].weight={s.weight} must be positive")
