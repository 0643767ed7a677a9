"""Synthetic packed batches with the full batch contract, for tests, benchmarks and runs without data
sources. Deterministic in (seed, batch index) and resumable: the iterator state is the next index.

Each row packs random-length examples; an example is text with, when the model has a vision tower, one
small image (`<|vision_start|>` + pads + `<|vision_end|>`) with M-RoPE positions as in model.md §5.
"""

from __future__ import annotations

import grain
import numpy as np

from keye_jax import batch_layout
from keye_jax.config import KeyeConfig
from keye_jax.processing.vision_layout import vision_layout

FIRST_TEXT_ID = 16  # below it: special tokens of the demo vocabulary


def _example(rng, cfg: KeyeConfig, max_len: int, room_patches: int):
  """(ids, positions (3, n), loss_mask, grids) of one example of at most max_len tokens."""
  n_text = int(rng.integers(4, max(5, max_len // 2)))
  ids, pos, grids, cur = [], [], [], 0
  if cfg.vision is not None and room_patches >= 16 and n_text + 6 <= max_len:
    h = w = 4  # patches; 4 merged tokens
    ids += [cfg.vision_start_token_id]
    pos += [(cur, cur, cur)]
    cur += 1
    s = cur
    for r in range(h // 2):
      for c in range(w // 2):
        ids.append(cfg.image_token_id)
        pos.append((s, s + r, s + c))
    cur = s + max(h // 2, w // 2)
    ids.append(cfg.vision_end_token_id)
    pos.append((cur, cur, cur))
    cur += 1
    grids.append((h, w))
  n_text = min(n_text, max_len - len(ids))
  ids += list(rng.integers(FIRST_TEXT_ID, cfg.text.vocab_size, n_text))
  pos += [(cur + i, cur + i, cur + i) for i in range(n_text)]
  mask = np.zeros(len(ids), bool)
  mask[len(ids) - n_text // 2:] = True  # the second half of the text is the "answer"
  return np.asarray(ids, np.int32), np.asarray(pos, np.int32).T, mask, grids


def synthetic_row(rng, cfg: KeyeConfig, seq_len: int, num_patches: int, patch_dim: int) -> dict:
  ids = np.zeros(seq_len, np.int32)
  seg = np.zeros(seq_len, np.int32)
  pos = np.ones((3, seq_len), np.int32)
  mask = np.zeros(seq_len, bool)
  grids, t, n = [], 0, 0
  while seq_len - t >= 8:
    e_ids, e_pos, e_mask, e_grids = _example(rng, cfg, seq_len - t, num_patches - 16 * len(grids))
    k = len(e_ids)
    n += 1
    ids[t:t + k], seg[t:t + k], pos[:, t:t + k], mask[t:t + k] = e_ids, n, e_pos, e_mask
    grids += e_grids
    t += k
  layout = vision_layout(np.asarray(grids, np.int64).reshape(-1, 2), num_patches)
  pixels = rng.standard_normal((num_patches, patch_dim)).astype(np.float32) * (layout["patch_segment_ids"] > 0)[:, None]
  return dict(input_ids=ids, segment_ids=seg, position_ids=pos, loss_mask=mask,
              source_ids=np.where(seg > 0, 0, -1).astype(np.int32), pixel_values=pixels, **layout)


class SyntheticBatches(grain.DatasetIterator):
  """Iterator of numpy batches (this process's rows of each global batch); get_state/set_state resume.
  A Grain iterator, so the pipeline's GlobalBatchIterator assembles its global batches and checkpoints
  save its state like the pipeline's."""

  def __init__(self, cfg: KeyeConfig, *, seq_len: int, num_patches: int, batch_size: int, seed: int = 0,
               process_index: int = 0, process_count: int = 1):
    super().__init__()
    self.cfg, self.seq_len, self.num_patches, self.seed = cfg, seq_len, num_patches, seed
    rows = batch_size // process_count
    self.rows = slice(process_index * rows, (process_index + 1) * rows)
    self.batch_size = batch_size
    v = cfg.vision
    self.patch_dim = (v.num_channels * v.patch_size ** 2) if v is not None else 588
    self.index = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    rng = np.random.default_rng([self.seed, self.index])
    self.index += 1
    rows = [synthetic_row(rng, self.cfg, self.seq_len, self.num_patches, self.patch_dim)
            for _ in range(self.batch_size)][self.rows]
    batch = batch_layout.stack(rows)
    if self.cfg.vision is None:
      batch = {k: v for k, v in batch.items() if k in TEXT_KEYS}
    return batch

  def get_state(self) -> dict:
    return {"index": self.index}

  def set_state(self, state: dict):
    self.index = int(state["index"])


TEXT_KEYS = ("input_ids", "segment_ids", "position_ids", "loss_mask", "source_ids")
