"""Sampled responses -> packed training rows, laid out like SFT rows plus the RL per-token fields.

One response is one packed example: its prompt's tokens, 3D positions and patches, then the response
tokens at positions max(prompt positions) + 1, + 2, ... on all three rows (what the sampler used, model.md
section 5). Several examples share a row back to back (first fit, in the order given), each its own
segment, so the GSPO loss sums per packed segment, never per row.

Per row, on top of train/data/packing.py's layout (input_ids, segment_ids, position_ids (3, S),
loss_mask, source_ids, pixel_values and the vision layout):
  loss_mask      (S,) bool     True on the response tokens only (prompt and padding False)
  old_logprobs   (S,) float32  the rollout policy's log-prob of each response token (0 elsewhere)
  advantages     (S,) float32  the response's advantage on each of its tokens (0 elsewhere)
  ref_logprobs   (S,) float32  only when asked for: filled later, once per rollout batch
Every per-token field sits on the token itself (not on the position that predicts it).

With `vision_dim` (the vision tower is frozen, so its output for a prompt is what the rollout already
computed), a row carries vision_features (P, Dv) float32 in place of pixel_values: each response's prompt
features (`Response.vision_features`, the rollout's tower output) at the patches where build_row puts its
pixels, examples back to back, zeros after. The tower attends within each image/frame only, so a patch's
features do not depend on what else shares the row; merge_index and the rest of the layout are unchanged.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from train.data.decode import PATCH_DIM, TokenIds
from train.data.packing import build_row, stack_rows

PER_TOKEN = ("old_logprobs", "advantages")


@dataclasses.dataclass
class Response:
  """One sampled response to one prompt, ready to pack. Prompt arrays as the prompt stream yields them."""

  prompt_ids: np.ndarray  # (Sp,) int32
  prompt_positions: np.ndarray  # (3, Sp) int32
  pixel_values: np.ndarray | None  # (Pp, 588) float32 or None
  grids_hw: np.ndarray | None  # (n, 2) int32 or None
  tokens: np.ndarray  # (T,) int32 sampled ids (the stop token included when one ended it)
  logprobs: np.ndarray  # (T,) float32 the sampler's log-probs of `tokens`
  advantage: float
  vision_features: np.ndarray | None = None  # (Pp, Dv) the tower's output for pixel_values (the rollout's)

  def example(self) -> dict:
    """The packing example (train/data/packing.py's keys) plus the per-token RL fields."""
    n, t = len(self.prompt_ids), len(self.tokens)
    if t == 0:
      raise ValueError("an empty response cannot be packed")
    start = int(np.max(self.prompt_positions)) + 1 if n else 0
    after = np.broadcast_to(start + np.arange(t, dtype=np.int32), (3, t))
    pixels = self.pixel_values if self.pixel_values is not None else np.zeros((0, PATCH_DIM), np.float32)
    grids = self.grids_hw if self.grids_hw is not None else np.zeros((0, 2), np.int32)
    return {"input_ids": np.concatenate([self.prompt_ids, self.tokens]).astype(np.int32),
            "position_ids": np.concatenate([self.prompt_positions, after], axis=1).astype(np.int32),
            "loss_mask": np.concatenate([np.zeros(n, bool), np.ones(t, bool)]),
            "pixel_values": np.asarray(pixels, np.float32), "grids_hw": np.asarray(grids, np.int32).reshape(-1, 2),
            "old_logprobs": np.concatenate([np.zeros(n, np.float32), np.asarray(self.logprobs, np.float32)]),
            "advantages": np.concatenate([np.zeros(n, np.float32), np.full(t, self.advantage, np.float32)])}


def pack_responses(responses: list[Response], seq_len: int, num_patches: int, rows: int, ids: TokenIds,
                   *, with_ref: bool = False, vision_dim: int = 0) -> dict[str, np.ndarray]:
  """`rows` packed rows (a fixed-shape batch; unused rows are padding) holding every response, first fit.
  vision_dim > 0: vision_features (rows, P, vision_dim) replace pixel_values (see the module docstring).
  Raises ValueError when they do not fit (the config check makes that impossible for valid prompts)."""
  examples = [r.example() for r in responses]
  bins: list[list[int]] = []  # example indices per row
  used: list[list[int]] = []  # [tokens, patches] per row
  for i, ex in enumerate(examples):
    t, p = len(ex["input_ids"]), len(ex["pixel_values"])
    if t > seq_len or p > num_patches:
      raise ValueError(f"a response of {t} tokens / {p} patches (prompt included) exceeds a row of "
                       f"{seq_len} tokens / {num_patches} patches")
    j = next((j for j, (a, b) in enumerate(used) if a + t <= seq_len and b + p <= num_patches), None)
    if j is None:
      if len(bins) == rows:
        raise ValueError(f"{len(responses)} responses do not fit {rows} rows of {seq_len} tokens / "
                         f"{num_patches} patches")
      bins.append([])
      used.append([0, 0])
      j = len(bins) - 1
    bins[j].append(i)
    used[j][0] += t
    used[j][1] += p
  bins += [[] for _ in range(rows - len(bins))]
  out = []
  for row in bins:
    exs = [examples[i] for i in row]
    r = build_row(exs, seq_len, num_patches, ids)
    # The per-token RL fields, laid out as build_row lays out input_ids: examples back to back.
    fields = PER_TOKEN + (("ref_logprobs",) if with_ref else ())
    extra = {k: np.zeros(seq_len, np.float32) for k in fields}
    mask = np.zeros(seq_len, bool)
    t = 0
    for ex in exs:
      n = len(ex["input_ids"])
      for k in PER_TOKEN:
        extra[k][t:t + n] = ex[k]
      mask[t:t + n] = ex["loss_mask"]
      t += n
    r.update(extra)
    r["loss_mask"] = mask
    if vision_dim:
      del r["pixel_values"]
      r["vision_features"] = _row_features([responses[i] for i in row], num_patches, vision_dim)
    out.append(r)
  return stack_rows(out)


def reused_vision_dim(model_cfg, trainable) -> int:
  """The `vision_dim` of the run's rows: the tower's width when the model has one and it is frozen (not in
  optimizer.trainable), so the rollout's features stand for it in the log-prob passes; else 0 (re-encode)."""
  return model_cfg.vision.hidden_size if model_cfg.vision is not None and "vision" not in trainable else 0


def _row_features(responses: list[Response], num_patches: int, dim: int) -> np.ndarray:
  """(P, dim) float32: the responses' prompt features back to back, as build_row lays out their pixels."""
  out = np.zeros((num_patches, dim), np.float32)
  p = 0
  for r in responses:
    m = 0 if r.pixel_values is None else len(r.pixel_values)
    if not m:
      continue
    f = r.vision_features
    if f is None or f.shape != (m, dim):
      raise ValueError(f"a response whose prompt has {m} patches carries vision features of shape "
                       f"{None if f is None else f.shape}, not ({m}, {dim})")
    out[p:p + m] = f
    p += m
  return out


def responses_in(batch: dict) -> int:
  """Number of responses (segments with at least one loss token) in a packed numpy batch."""
  seg, mask = batch["segment_ids"], batch["loss_mask"].astype(bool)
  return int(sum(len(np.unique(seg[b][mask[b]])) for b in range(seg.shape[0])))
