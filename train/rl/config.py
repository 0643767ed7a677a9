"""The RL run's configuration: a stage config (model, data, optimizer, mesh, checkpoints, ...) plus `rl:`.

An RL YAML is a stage YAML with one more section, composed and overridden the same way:

  model: ../model/keye-vl-1.5-8b.yaml
  init_from: runs/keye-8b/sft          # an SFT run dir or a converted checkpoint
  tokenizer: checkpoints/keye-init
  data:                                # the prompts: a Grain mixture of conversation manifests
    sources: [{path: data/rl/prompts.jsonl}]
    seq_len: 8192                      # S of a packed training row (prompt + response)
    num_patches: 16384                 # P of a packed training row
    batch_size: 64                     # global rows per optimizer step (one minibatch)
  steps: 200                           # RL steps (rollout batches); optimizer steps = steps * minibatches
  rl:
    prompts_per_step: 32               # global prompts per rollout batch
    group_size: 8                      # G responses per prompt
    minibatches: 4                     # optimizer steps per rollout batch
    rewards: [{name: answer, weight: 1.0}, {name: think_format, weight: 0.2}]

Data fields of an RL config mean the training rows; `data.batch_size` rows must hold one minibatch's
responses in the worst case (every prompt `rl.max_prompt_len` tokens, every response
`rl.max_new_tokens`), which is checked when the config loads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from keye_jax.config import ConfigError, path_field, read_yaml
from train.config import TrainConfig, load_train_config

VARIANTS = ("gspo", "gspo_token", "grpo")
# (eps_low, eps_high) per variant when the config leaves them at 0: the GSPO paper's and PPO's.
DEFAULT_EPS = {"gspo": (3e-4, 4e-4), "gspo_token": (3e-4, 4e-4), "grpo": (0.2, 0.2)}


@dataclasses.dataclass(frozen=True)
class HintConfig:
  """Progressive hint sampling: a prompt whose whole group fails and that has a reference solution is
  re-sampled with hints L1..`max_level` appended after the query (train/rl/hints.py)."""

  enabled: bool = True
  max_level: int = 5
  # How hints are cut from a record's `solution` when it has no `hints` field (train/rl/hints.CutRule):
  # the solution split into steps, level k keeping the first ceil(fractions[k-1] * steps) of them.
  split: str = "lines"  # lines | sentences | paragraphs
  fractions: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 1.0)
  template: str = "\n\nHint: {hint}"  # appended to the last user turn's text (before a /think suffix)


@dataclasses.dataclass(frozen=True)
class RLConfig:
  prompts_per_step: int = 8  # global prompts per rollout batch (split evenly over processes)
  group_size: int = 8  # G responses per prompt
  minibatches: int = 4  # optimizer steps per rollout batch, the rollout policy being the old policy
  variant: str = "gspo"  # gspo | gspo_token | grpo
  eps_low: float = 0.0  # 0: the variant's default (gspo 3e-4, grpo 0.2)
  eps_high: float = 0.0  # 0: the variant's default (gspo 4e-4, grpo 0.2)
  kl_coef: float = 0.0  # > 0: KL to the frozen initial policy, its log-probs computed once per batch
  advantage_eps: float = 1e-6  # A_i = (r_i - mean) / (std + eps)
  # Sampling. The policy trained is softmax(logits / temperature), the distribution the rollouts draw from
  # (as in TRL and verl), so the sampler's log-probs are the old policy's and the first ratio is 1. No
  # top-k/top-p: the sampled distribution would then differ from the one the trainer's log-probs measure.
  max_new_tokens: int = 512
  max_prompt_len: int = 1024  # longer prompts (text tokens) are skipped, counted in the metrics
  max_prompt_patches: int = 4096  # prompts with more vision patches are skipped
  categories: tuple[str, ...] = ()  # only prompts whose record `category` is one of these (empty: all)
  temperature: float = 1.0
  slots: int = 64  # global decode slots: each process's rollout engine runs rl.slots / processes
  # Rewards (train/rewards): a list of {name, weight, ...options}; `correct_threshold` on the rule
  # verifier's score decides a response's correctness (pass rates, hints, the no-signal share).
  rewards: tuple[dict[str, Any], ...] = ({"name": "answer", "weight": 1.0},)
  correct_threshold: float = 0.5
  hints: HintConfig = HintConfig()
  # A new round: keep only prompts whose pass rate recorded in this previous RL run dir is in (0, 1).
  pass_rates_from: str = path_field()
  keep_unmeasured: bool = False  # with pass_rates_from: also keep prompts that run never sampled

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ConfigError(f"rl.variant={self.variant!r} is not one of {', '.join(VARIANTS)}")
    for name in ("prompts_per_step", "group_size", "minibatches", "max_new_tokens", "max_prompt_len", "slots"):
      if getattr(self, name) < 1:
        raise ConfigError(f"rl.{name} must be positive")
    if not self.temperature > 0:
      raise ConfigError(f"rl.temperature={self.temperature} must be > 0 (RL samples; greedy responses give no signal)")
    if self.kl_coef < 0:
      raise ConfigError("rl.kl_coef must be >= 0")
    if not 1 <= self.hints.max_level <= 5:
      raise ConfigError(f"rl.hints.max_level={self.hints.max_level} must be in 1..5")

  @property
  def eps(self) -> tuple[float, float]:
    low, high = DEFAULT_EPS[self.variant]
    return (self.eps_low or low, self.eps_high or high)


@dataclasses.dataclass(frozen=True)
class RLRunConfig(TrainConfig):
  """A stage config plus the `rl:` section; `steps` counts RL steps (rollout batches)."""

  rl: RLConfig = RLConfig()

  def __post_init__(self):
    super().__post_init__()
    if self.rl.prompts_per_step * self.rl.group_size % self.rl.minibatches:
      raise ConfigError(f"rl.minibatches={self.rl.minibatches} must divide the rollout batch's "
                        f"{self.rl.prompts_per_step} x {self.rl.group_size} responses")
    need = rows_needed(self)
    if need > self.data.batch_size:
      raise ConfigError(
          f"data.batch_size={self.data.batch_size} rows cannot hold a minibatch in the worst case ({need} rows of "
          f"{self.data.seq_len} tokens / {self.data.num_patches} patches for "
          f"{self.rl.prompts_per_step * self.rl.group_size // self.rl.minibatches} responses of up to "
          f"rl.max_prompt_len + rl.max_new_tokens = {self.rl.max_prompt_len + self.rl.max_new_tokens} tokens); "
          f"raise data.batch_size or data.seq_len, or lower rl.max_new_tokens / rl.max_prompt_len")

  def optimizer_steps(self) -> int:
    return self.steps * self.rl.minibatches


def rows_needed(cfg: RLRunConfig) -> int:
  """Global rows one minibatch needs when every prompt and response is as long as allowed."""
  r, d = cfg.rl, cfg.data
  per_mb = r.prompts_per_step * r.group_size // r.minibatches
  tokens = r.max_prompt_len + r.max_new_tokens
  if tokens > d.seq_len:
    raise ConfigError(f"rl.max_prompt_len + rl.max_new_tokens = {tokens} exceeds data.seq_len={d.seq_len}")
  patches = min(r.max_prompt_patches, d.num_patches) if cfg.model.vision is not None else 0
  per_row = d.seq_len // tokens
  if patches:
    per_row = min(per_row, d.num_patches // patches)
  return -(-per_mb // max(per_row, 1))


def is_rl_config(path: str) -> bool:
  """True when the YAML at `path` has an `rl:` section."""
  return "rl" in read_yaml(path)


def load_rl_config(path: str, overrides=()) -> RLRunConfig:
  """RLRunConfig from an RL YAML: the file's own `overrides:`, then `overrides`."""
  return load_train_config(path, overrides, cls=RLRunConfig)
