"""The training run's configuration: one stage = model + data + optimizer + mesh + run settings.

A stage YAML composes the model and data files by path and may carry `overrides:` (`key.sub=value`
strings applied after loading, e.g. stage 4's `model.text.rope_theta=8e6`); command-line overrides are
applied after those. A schedule YAML (`configs/*/all.yaml`) lists stage files instead (see stages.py).
Paths (tokenizer, init_from, run_dir, data sources) written in a file, its `overrides:` included, resolve
against that file's directory; command-line overrides resolve against the current directory.
"""

from __future__ import annotations

import dataclasses
import os

from keye_jax.config import ConfigError, KeyeConfig, apply_overrides, from_dict, path_field, read_yaml
from train.data.config import DataConfig
from train.mpo_config import MPOConfig

MODULES = ("vision", "projector", "language")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with a warmup + decay schedule, global-norm clipping and per-module learning rates."""

  learning_rate: float = 1e-4  # peak learning rate of every trainable module without its own entry
  module_learning_rates: dict[str, float] = dataclasses.field(default_factory=dict)  # vision/projector/language
  trainable: tuple[str, ...] = MODULES  # modules that train; the others are frozen (no optimizer state)
  schedule: str = "cosine"  # cosine | linear | constant (each after `warmup_steps` of linear warmup)
  warmup_steps: int = 0
  min_lr_ratio: float = 0.1  # final learning rate / peak for cosine and linear
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0  # global gradient norm over all trainable parameters; 0 disables

  def __post_init__(self):
    for name in (*self.trainable, *self.module_learning_rates):
      if name not in MODULES:
        raise ConfigError(f"optimizer: unknown module {name!r} (modules: {', '.join(MODULES)})")
    if self.schedule not in ("cosine", "linear", "constant"):
      raise ConfigError(f"optimizer.schedule={self.schedule!r} is not one of cosine, linear, constant")

  def lr(self, module: str) -> float:
    return self.module_learning_rates.get(module, self.learning_rate)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 100  # steps between (asynchronous) saves; the final step is always saved
  keep: int = 3  # most recent checkpoints kept


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """Multi-process (multi-host) setup. Empty fields fall back to JAX's own detection (TPU pods, SLURM)
  or the environment variables KEYE_COORDINATOR, KEYE_NUM_PROCESSES, KEYE_PROCESS_ID."""

  coordinator_address: str = ""
  num_processes: int = 0
  process_id: int = -1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  model: KeyeConfig = KeyeConfig()
  data: DataConfig = DataConfig()  # no sources: synthetic packed batches of the configured shapes
  tokenizer: str = path_field()  # tokenizer directory (or tokenizer.json) for the data pipeline
  optimizer: OptimizerConfig = OptimizerConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  distributed: DistributedConfig = DistributedConfig()
  mesh: dict[str, int] = dataclasses.field(default_factory=lambda: {"data": 1, "fsdp": -1, "tensor": 1, "context": 1})
  steps: int = 100
  grad_accum: int = 1  # microbatches per step (data.batch_size rows split evenly)
  z_loss: float = 0.0
  loss_chunk: int = 512  # sequence positions whose logits exist at once (vocabulary-chunked loss)
  max_nonfinite: int = 10  # consecutive skipped (non-finite) steps before the run stops
  seed: int = 0
  init_from: str = path_field()  # any checkpoint argument: a previous stage's run dir, a converted dir
  run_dir: str = path_field("runs/default")
  log_every: int = 1
  peak_tflops: float = 0.0  # per device, for MFU; 0 = the TPU table (no MFU where the peak is unknown)
  loss: str = "cross_entropy"  # cross_entropy (next-token) | mpo (preference pairs; train/mpo.py)
  mpo: MPOConfig = MPOConfig()  # the `mpo` loss's settings (train/mpo_config.py)

  def __post_init__(self):
    if self.grad_accum < 1 or self.data.batch_size % self.grad_accum:
      raise ConfigError(f"grad_accum={self.grad_accum} must divide data.batch_size={self.data.batch_size}")
    if self.loss_chunk < 1:
      raise ConfigError("loss_chunk must be positive")
    if self.steps < 0:
      raise ConfigError(f"steps={self.steps} must be >= 0")
    if self.loss not in ("cross_entropy", "mpo"):
      raise ConfigError(f"loss={self.loss!r} is not one of cross_entropy, mpo")


def load_train_config(path: str, overrides=(), cls: type = TrainConfig):
  """`cls` (TrainConfig, or a subclass such as the RL run config) from a stage YAML: the file's own
  `overrides:`, then `overrides`."""
  data = read_yaml(path)
  own = data.pop("overrides", ()) or ()
  base = os.path.dirname(os.path.abspath(path))
  try:
    if not isinstance(own, (list, tuple)):
      raise ConfigError("overrides: expected a list of key.sub=value strings")
    cfg = apply_overrides(from_dict(cls, data, base_dir=base), list(own), base_dir=base)
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}") from None
  return apply_overrides(cfg, list(overrides))
