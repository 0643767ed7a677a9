"""AdamW over the trainable modules: warmup + decay schedules, per-module rates. Global-norm clipping
(`clip_norm`) is applied by the step (train/step.py), which computes the norm anyway.

Parameters are handled as a flat dict {"decoder/layers/layers/mlp/up_proj/kernel": array, ...}. Frozen
modules are split off before differentiation (see step.py), so they get neither gradients nor optimizer
state; the optimizer only ever sees the trainable dict.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from train.config import OptimizerConfig


def module_of(path: str) -> str:
  """Which module a parameter belongs to: vision, projector or language."""
  head = path.split("/", 1)[0]
  return {"vision": "vision", "projector": "projector"}.get(head, "language")


def trainable_keys(params: dict, cfg: OptimizerConfig) -> list[str]:
  return sorted(k for k in params if module_of(k) in cfg.trainable)


def schedule(cfg: OptimizerConfig, peak: float, total_steps: int) -> optax.Schedule:
  """Linear warmup to `peak`, then cosine or linear decay to peak * min_lr_ratio, or constant."""
  warmup = max(cfg.warmup_steps, 0)
  decay_steps = max(total_steps - warmup, 1)
  end = peak * cfg.min_lr_ratio
  if cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr_ratio)
  elif cfg.schedule == "linear":
    after = optax.linear_schedule(peak, end, decay_steps)
  else:
    after = optax.constant_schedule(peak)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(cfg: OptimizerConfig, trainable: list[str], total_steps: int):
  """(optax transform over the trainable dict, {module: schedule}) ."""
  present = sorted({module_of(k) for k in trainable})
  schedules = {m: schedule(cfg, cfg.lr(m), total_steps) for m in present}

  def adamw(m):
    # Only matrices and embedding tables are decayed, never norms and biases.
    return optax.adamw(schedules[m], b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                       mask=lambda p: {k: _decayed(k) for k in p})

  labels = {k: module_of(k) for k in trainable}
  return optax.multi_transform({m: adamw(m) for m in present}, labels), schedules


def clip_by_global_norm(grads: dict, norm, max_norm: float) -> dict:
  """Scales the gradients down to global norm `max_norm` when `norm` (theirs, already computed) is larger.
  optax.clip_by_global_norm computes the norm again and divides, which XLA CPU writes out as a pass of its
  own over the gradients; a multiply by one factor fuses into AdamW's update."""
  factor = jnp.minimum(1.0, max_norm / norm)
  return jax.tree.map(lambda g: g * factor.astype(g.dtype), grads)


def _decayed(path: str) -> bool:
  name = path.rsplit("/", 1)[-1]
  return name in ("kernel", "embedding") or name.endswith("embedding")
