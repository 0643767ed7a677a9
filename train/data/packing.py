"""Packing whole examples into fixed-shape rows under two budgets: S text tokens and P vision patches.

Pure numpy. The online packer keeps `num_bins` rows open; each example goes to the open row it fits best
(best-fit: least text space left; first-fit: the first that fits). When it fits none, the fullest open row
is emitted and a new one opened, so only rows that could not take more are ever emitted (until the final
flush of a finite stream). The packer's state is plain JSON (sizes and example keys), which is what makes
the pipeline's iterator checkpointable: the examples themselves are re-read by key on restore.

Row layout (what the model consumes; rows are stacked into batches by keye_jax.batch_layout):
  input_ids (S,) int32            examples back to back, then the pad token
  segment_ids (S,) int32          1..k per example, 0 on padding
  position_ids (3, S) int32       each example's own 3D ids (restarting at 0), 0 on padding
  loss_mask (S,) bool             the examples' masks; False on padding and on each example's first token
                                  (its target would be predicted from the previous example)
  source_ids (S,) int32           source number of each token, -1 on padding
  pixel_values (P, 588) float32   the examples' patches in order, zero padded
  patch_segment_ids, patch_pos, merge_index, merge_valid   from keye_jax.processing.vision_layout
  <any other field>               an example's other arrays (not `_private`) are per-token fields, e.g. RL's
                                  advantages or old log-probs: tokens on the axis batch_layout.batch_axis
                                  names, laid out like input_ids, 0 on padding and for examples without it
"""

from __future__ import annotations

import numpy as np

from keye_jax import batch_layout
from keye_jax.processing.vision_layout import vision_layout
from train.data.decode import PATCH_DIM, TokenIds

PER_EXAMPLE = ("pixel_values", "grids_hw")  # an example's fields that are not per token


def token_fields(ex: dict) -> list[str]:
  """An example's per-token fields: every key but the vision ones and `_private` ones (input_ids,
  loss_mask, position_ids and whatever else the example carries)."""
  return [k for k in ex if not k.startswith("_") and k not in PER_EXAMPLE]


def _tokens(key: str, sl: slice) -> tuple:
  """Index of tokens `sl` of field `key` (tokens on its batch_layout axis)."""
  return (slice(None),) * batch_layout.batch_axis(key) + (sl,)


def example_size(ex: dict) -> tuple[int, int]:
  """(text tokens, vision patches) of an example."""
  return len(ex["input_ids"]), len(ex["pixel_values"])


def fit_example(ex: dict, seq_len: int, num_patches: int, ids: TokenIds, overlong: str) -> dict | None:
  """`ex` if it fits a row; else truncated at the last safe point (never inside a
  <|vision_start|>..<|vision_end|> span, keeping only whole vision blocks) when overlong == "truncate";
  None (drop) when it cannot be cut safely, keeps no training target, or overlong == "drop"."""
  n_text, n_patch = example_size(ex)
  if n_text <= seq_len and n_patch <= num_patches:
    return ex
  if overlong != "truncate":
    return None
  tokens = ex["input_ids"]
  # depth[c] = open vision spans before cut c (tokens [0, c) kept); a cut is safe where it is 0.
  opens = np.concatenate([[0], np.cumsum(tokens == ids.vision_start)])
  closes = np.concatenate([[0], np.cumsum(tokens == ids.vision_end)])
  pads = np.concatenate([[0], np.cumsum((tokens == ids.image_pad) | (tokens == ids.video_pad))])
  block_tokens = np.cumsum(np.prod(ex["grids_hw"], axis=1) // 4)   # merged tokens up to each block
  block_patches = np.cumsum(np.prod(ex["grids_hw"], axis=1))
  cuts = np.arange(len(tokens) + 1)
  kept_blocks = np.searchsorted(block_tokens, pads, side="right")   # whole blocks before each cut
  kept_patches = np.where(kept_blocks > 0, block_patches[np.maximum(kept_blocks - 1, 0)], 0) \
      if len(block_patches) else np.zeros_like(cuts)
  ok = (opens == closes) & (cuts <= seq_len) & (kept_patches <= num_patches)
  ok &= np.concatenate([[0], np.cumsum(ex["loss_mask"])]) > 0       # keeps at least one target
  if not ok.any():
    return None
  c = int(cuts[ok][-1])
  k = int(kept_blocks[c])
  if k and block_tokens[k - 1] != pads[c]:
    return None  # a vision block cut in half: impossible for well-formed text, refuse rather than guess
  p = int(block_patches[k - 1]) if k else 0
  cut = {f: np.asarray(ex[f])[_tokens(f, slice(0, c))] for f in token_fields(ex)}
  return {**ex, **cut, "pixel_values": ex["pixel_values"][:p], "grids_hw": ex["grids_hw"][:k], "_truncated": True}


class BinPacker:
  """Online packer over `num_bins` open rows. Keys are opaque JSON values (the pipeline uses indices)."""

  def __init__(self, seq_len: int, num_patches: int, num_bins: int, best_fit: bool = True):
    self.seq_len, self.num_patches, self.num_bins, self.best_fit = seq_len, num_patches, num_bins, best_fit
    self.bins: list[list] = []  # [text used, patches used, [keys]]

  def _fullness(self, b) -> float:
    return max(b[0] / self.seq_len, b[1] / self.num_patches)

  def add(self, key, n_text: int, n_patch: int) -> list[list]:
    """Adds one example (which must fit an empty row); returns the key lists of rows now complete."""
    if n_text > self.seq_len or n_patch > self.num_patches:
      raise ValueError(f"example of {n_text} tokens / {n_patch} patches exceeds a row "
                       f"({self.seq_len} / {self.num_patches}); fit_example it first")
    fits = [i for i, b in enumerate(self.bins)
            if b[0] + n_text <= self.seq_len and b[1] + n_patch <= self.num_patches]
    emitted = []
    if fits:
      i = min(fits, key=lambda i: (self.seq_len - self.bins[i][0], i)) if self.best_fit else fits[0]
    else:
      if len(self.bins) >= self.num_bins:
        j = max(range(len(self.bins)), key=lambda j: (self._fullness(self.bins[j]), -j))
        emitted.append(self.bins.pop(j)[2])
      self.bins.append([0, 0, []])
      i = len(self.bins) - 1
    b = self.bins[i]
    b[0] += n_text
    b[1] += n_patch
    b[2].append(key)
    if b[0] == self.seq_len or b[1] == self.num_patches:  # nothing else can enter a full row
      emitted.append(self.bins.pop(i)[2])
    return emitted

  def flush(self) -> list[list]:
    """Every open row, fullest first; the packer is empty afterwards."""
    order = sorted(range(len(self.bins)), key=lambda j: (-self._fullness(self.bins[j]), j))
    rows = [self.bins[j][2] for j in order]
    self.bins = []
    return rows

  def state(self) -> list:
    return [[int(t), int(p), list(keys)] for t, p, keys in self.bins]

  def set_state(self, bins: list):
    self.bins = [[int(t), int(p), list(keys)] for t, p, keys in bins]


def build_row(examples: list[dict], seq_len: int, num_patches: int, ids: TokenIds) -> dict[str, np.ndarray]:
  """One packed row from examples that fit together (see the module docstring for the layout)."""
  row = {"input_ids": np.full(seq_len, ids.pad, np.int32), "position_ids": np.zeros((3, seq_len), np.int32),
         "loss_mask": np.zeros(seq_len, bool)}
  for ex in examples:  # other per-token fields: zeros shaped and typed like the first example's
    for f in token_fields(ex):
      if f not in row:
        like = np.asarray(ex[f])
        shape = list(like.shape)
        shape[batch_layout.batch_axis(f)] = seq_len
        row[f] = np.zeros(shape, like.dtype)
  segment_ids = np.zeros(seq_len, np.int32)
  source_ids = np.full(seq_len, -1, np.int32)
  pixel_values = np.zeros((num_patches, PATCH_DIM), np.float32)
  grids = []
  t = p = 0
  for k, ex in enumerate(examples, start=1):
    n, m = example_size(ex)
    if t + n > seq_len or p + m > num_patches:
      raise ValueError(f"examples do not fit a row of {seq_len} tokens / {num_patches} patches")
    for f in token_fields(ex):
      row[f][_tokens(f, slice(t, t + n))] = ex[f]
    row["loss_mask"][t] = False
    segment_ids[t:t + n] = k
    source_ids[t:t + n] = ex.get("_source", 0)
    pixel_values[p:p + m] = ex["pixel_values"]
    grids.append(ex["grids_hw"])
    t, p = t + n, p + m
  grids_hw = np.concatenate(grids) if grids else np.zeros((0, 2), np.int32)
  row.update(segment_ids=segment_ids, source_ids=source_ids, pixel_values=pixel_values,
             **vision_layout(grids_hw, num_patches))
  return {k: row[k] for k in (*STANDARD, *sorted(set(row) - set(STANDARD)))}


STANDARD = ("input_ids", "segment_ids", "position_ids", "loss_mask", "source_ids", "pixel_values",
            "patch_segment_ids", "patch_pos", "merge_index", "merge_valid")


def stack_rows(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Rows -> a batch (keye_jax.batch_layout.stack: a leading batch axis, position_ids (3, B, S))."""
  return batch_layout.stack(rows)
