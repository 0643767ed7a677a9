"""Rewards by name, and their weighted combination.

A reward is a callable `(samples, responses) -> (N,) float32`: `samples` are the prompts' records
(mappings with at least the fields that reward reads: "prompt", "answer", "options", ...),
`responses` the sampled texts, one per sample. Rewards are batch callables so that judges and external
programs can work on a whole rollout batch; `per_item` lifts a function of one (sample, response).

A config names rewards with their weights and options:

  rewards:
    - {name: answer, weight: 1.0}
    - {name: think_format, weight: 0.2}
    - {name: length_penalty, weight: 1.0, max_tokens: 2048}
    - {name: pairwise, ckpt: runs/rm, ckpt_options: {max_new_tokens: 64}}   # judge = our checkpoint

and `combine(config)` returns one callable giving the weighted sum and each reward's own values.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

Reward = Callable[[Sequence[Mapping], Sequence[str]], np.ndarray]

_FACTORIES: dict[str, Callable[..., Reward]] = {}
# Modules that register rewards on import; `build` imports them on first use.
_MODULES = ("train.rewards.rule", "train.rewards.format", "train.rewards.command",
            "train.rewards.instructions", "train.rewards.judge", "train.rewards.pairwise",
            "train.rewards.grounded")


def register(name: str):
  """Decorator: `factory(**options) -> Reward` becomes available as `name` in configs."""
  def wrap(factory):
    if name in _FACTORIES and _FACTORIES[name] is not factory:
      raise ValueError(f"reward {name!r} registered twice")
    _FACTORIES[name] = factory
    return factory
  return wrap


def per_item(fn: Callable[[Mapping, str], float]) -> Reward:
  """A batch reward from a function of one (sample, response)."""
  def reward(samples: Sequence[Mapping], responses: Sequence[str]) -> np.ndarray:
    _check_lengths(samples, responses)
    return np.asarray([fn(s, r) for s, r in zip(samples, responses)], np.float32)
  reward.__name__ = getattr(fn, "__name__", "reward")
  return reward


def _check_lengths(samples, responses):
  if len(samples) != len(responses):
    raise ValueError(f"rewards: {len(samples)} samples but {len(responses)} responses")


def _load_all():
  for module in _MODULES:
    try:
      importlib.import_module(module)
    except ModuleNotFoundError as e:
      if e.name != module:  # a missing dependency of a module that exists is a real error
        raise


def names() -> list[str]:
  """Every registered reward name."""
  _load_all()
  return sorted(_FACTORIES)


def build(name: str, **options: Any) -> Reward:
  """The reward registered as `name`, made with `options`."""
  _load_all()
  if name not in _FACTORIES:
    raise ValueError(f"unknown reward {name!r} (known: {', '.join(sorted(_FACTORIES))})")
  if "ckpt" in options:  # a judge that is one of our checkpoints (train/rewards/model_judge.py)
    from train.rewards.model_judge import with_checkpoint_judge
    options = with_checkpoint_judge(options)
  try:
    return _FACTORIES[name](**options)
  except TypeError as e:
    raise ValueError(f"reward {name!r}: bad options {sorted(options)}: {e}") from None


class Combined:
  """Weighted sum of named rewards. Calling it gives (total (N,), {name: (N,)})."""

  def __init__(self, parts: Sequence[tuple[str, float, Reward]]):
    if not parts:
      raise ValueError("rewards: the config names no reward")
    self.parts = list(parts)

  def __call__(self, samples: Sequence[Mapping], responses: Sequence[str]):
    _check_lengths(samples, responses)
    total = np.zeros(len(responses), np.float32)
    values = {}
    for name, weight, fn in self.parts:
      v = np.asarray(fn(samples, responses), np.float32)
      if v.shape != (len(responses),):
        raise ValueError(f"reward {name!r} returned shape {v.shape}, expected ({len(responses)},)")
      values[name] = v
      total += np.float32(weight) * v
    return total, values


def combine(config: Sequence[Mapping] | Mapping[str, float]) -> Combined:
  """Rewards of a config: a list of {name, weight (default 1), key (default name), ...options}, or a
  mapping name -> weight. `key` names the part in the returned values when one reward appears twice."""
  if isinstance(config, Mapping):
    config = [{"name": n, "weight": w} for n, w in config.items()]
  parts, seen = [], set()
  for i, spec in enumerate(config):
    spec = dict(spec)
    if "name" not in spec:
      raise ValueError(f"rewards[{i}]: no 'name' (known: {', '.join(names())})")
    name = spec.pop("name")
    weight = float(spec.pop("weight", 1.0))
    key = spec.pop("key", name)
    if key in seen:
      raise ValueError(f"rewards[{i}]: {key!r} appears twice; give one a distinct 'key'")
    seen.add(key)
    parts.append((key, weight, build(name, **spec)))
  return Combined(parts)
