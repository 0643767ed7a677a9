"""Group-normalised advantages and the per-group statistics of a rollout batch (pure numpy).

A group is the responses sampled for one prompt; `group_ids` (N,) names each response's group (any
hashable-as-int labels, groups need not be contiguous nor of equal size). Per group:

  A_i = (r_i - mean(r)) / (std(r) + eps)

with the unbiased sample standard deviation (torch.std, as verl's `compute_grpo_outcome_advantage` and
TRL's GRPOTrainer use) and eps = 1e-6 (verl's; TRL adds 1e-4). A group of one response gets advantage
0: it has no baseline to compare with (verl gives it mean 0 and std 1, i.e. its raw reward).
`scale=False` leaves out the division (Dr. GRPO).
"""

from __future__ import annotations

import numpy as np


def _groups(group_ids) -> tuple[np.ndarray, int]:
  """Dense group numbers (N,) in [0, G) and G."""
  _, inverse = np.unique(np.asarray(group_ids), return_inverse=True)
  return inverse.reshape(-1), int(inverse.max()) + 1 if inverse.size else 0


def group_advantages(rewards, group_ids, *, eps: float = 1e-6, scale: bool = True) -> np.ndarray:
  """(N,) rewards, (N,) group ids -> (N,) float32 advantages."""
  r = np.asarray(rewards, np.float64).reshape(-1)
  g, n = _groups(group_ids)
  if len(g) != len(r):
    raise ValueError(f"advantages: {len(r)} rewards but {len(g)} group ids")
  count = np.bincount(g, minlength=n).astype(np.float64)
  mean = np.bincount(g, r, minlength=n) / count
  centred = r - mean[g]
  if not scale:
    return np.where(count[g] > 1, centred, 0.0).astype(np.float32)
  var = np.bincount(g, centred ** 2, minlength=n) / np.maximum(count - 1, 1)
  adv = centred / (np.sqrt(var)[g] + eps)
  return np.where(count[g] > 1, adv, 0.0).astype(np.float32)


def group_stats(rewards, group_ids, correct=None) -> dict:
  """Metrics of a rollout batch: reward_mean / reward_std (over responses), pass_rate (share of correct
  responses, when `correct` (N,) bool is given), no_signal_share (share of groups whose rewards are all
  equal, so every advantage is 0) and groups (count)."""
  r = np.asarray(rewards, np.float64).reshape(-1)
  g, n = _groups(group_ids)
  lo = np.full(n, np.inf)
  hi = np.full(n, -np.inf)
  np.minimum.at(lo, g, r)
  np.maximum.at(hi, g, r)
  out = {"reward_mean": float(r.mean()) if r.size else 0.0,
         "reward_std": float(r.std()) if r.size else 0.0,
         "no_signal_share": float(np.mean(lo == hi)) if n else 0.0,
         "groups": n}
  if correct is not None:
    out["pass_rate"] = float(np.mean(np.asarray(correct, bool))) if r.size else 0.0
  return out


def group_pass_rates(correct, group_ids) -> dict:
  """{group id: share of its responses that are correct}."""
  ids = np.asarray(group_ids).reshape(-1)
  c = np.asarray(correct, np.float64).reshape(-1)
  labels, g = np.unique(ids, return_inverse=True)
  rates = np.bincount(g, c, minlength=len(labels)) / np.bincount(g, minlength=len(labels))
  return {label.item() if hasattr(label, "item") else label: float(rate) for label, rate in zip(labels, rates)}
