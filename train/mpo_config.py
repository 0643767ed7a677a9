"""The `mpo:` section of a preference-optimisation (MPO) training config (`loss: mpo`).

  loss: mpo
  mpo:
    beta: 0.1                               # DPO / BCO temperature
    dpo_weight: 0.8                         # the MPO paper's mix (TRL's MPO preset); 0 drops a term
    bco_weight: 0.2
    sft_weight: 1.0
    label_smoothing: 0.0                    # conservative DPO
    bco_delta: 0.0                          # BCO's reward shift (TRL 1.16 uses 0)

The data sources of such a config hold preference pairs (train/preference_data.py), not conversations.
"""

from __future__ import annotations

import dataclasses

from keye_jax.config import ConfigError

TERMS = ("dpo", "bco", "sft")


@dataclasses.dataclass(frozen=True)
class MPOConfig:
  beta: float = 0.1
  dpo_weight: float = 0.8
  bco_weight: float = 0.2
  sft_weight: float = 1.0
  label_smoothing: float = 0.0
  bco_delta: float = 0.0

  def __post_init__(self):
    if min(self.weights.values()) < 0 or not any(self.weights.values()):
      raise ConfigError(f"mpo: the weights {self.weights} must be >= 0 and not all 0")
    if self.beta <= 0:
      raise ConfigError(f"mpo.beta={self.beta} must be positive")
    if not 0.0 <= self.label_smoothing < 0.5:
      raise ConfigError(f"mpo.label_smoothing={self.label_smoothing} must be in [0, 0.5)")

  @property
  def weights(self) -> dict[str, float]:
    """{term: weight} as train.losses.preference.mpo_loss takes them."""
    return {t: getattr(self, f"{t}_weight") for t in TERMS}
