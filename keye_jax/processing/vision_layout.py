"""Host-side metadata for a packed vision sequence (numpy only).

The vision tower sees one fixed-length patch sequence per batch row: the patches of every image and
video frame of that row, concatenated in the order they occur in the text, padded to `num_patches`.
Each image or frame is a *block* with a grid of (h, w) patches, row-major. This module turns the list of
block grids into the arrays the jitted model needs, so nothing inside the model loops over images:

  patch_segment_ids (P,)    block number 1..n of each patch, 0 for padding
  patch_pos         (P, 4)  (row, col, h, w) of each patch inside its block
  merge_index       (P//4, 4) patch indices merged into each LLM token: (2i,2j), (2i,2j+1), (2i+1,2j),
                            (2i+1,2j+1), tokens row-major over (h/2, w/2); padding tokens point at 0
  merge_valid       (P//4,) True for real merged tokens

The k-th real merged token feeds the k-th `<|image_pad|>`/`<|video_pad|>` token of the row's text.
"""

from __future__ import annotations

import numpy as np


def vision_layout(grids_hw, num_patches: int, merge: int = 2) -> dict[str, np.ndarray]:
  """Metadata for blocks with grids `grids_hw` (n, 2) packed into `num_patches` slots."""
  grids_hw = np.asarray(grids_hw, dtype=np.int64).reshape(-1, 2)
  if num_patches % (merge * merge):
    raise ValueError(f"num_patches={num_patches} must be a multiple of {merge * merge}")
  if np.any(grids_hw % merge):
    raise ValueError(f"every grid must be divisible by the merge size {merge}, got {grids_hw.tolist()}")
  sizes = grids_hw[:, 0] * grids_hw[:, 1]
  total = int(sizes.sum())
  if total > num_patches:
    raise ValueError(f"{total} patches do not fit in a vision sequence of {num_patches}")

  seg = np.zeros(num_patches, np.int32)
  pos = np.zeros((num_patches, 4), np.int32)
  n_tok = num_patches // (merge * merge)
  merge_index = np.zeros((n_tok, merge * merge), np.int32)
  merge_valid = np.zeros(n_tok, bool)
  if total == 0:
    return dict(patch_segment_ids=seg, patch_pos=pos, merge_index=merge_index, merge_valid=merge_valid)

  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  block = np.repeat(np.arange(len(sizes)), sizes)            # (total,) block of each patch
  local = np.arange(total) - starts[block]                    # index inside the block
  w = grids_hw[block, 1]
  seg[:total] = block + 1
  pos[:total] = np.stack([local // w, local % w, grids_hw[block, 0], w], axis=1)

  # Merged tokens: per block (h/m)*(w/m) of them, row-major; each gathers an m x m square.
  tok_sizes = sizes // (merge * merge)
  tok_total = int(tok_sizes.sum())
  tok_block = np.repeat(np.arange(len(sizes)), tok_sizes)
  tok_local = np.arange(tok_total) - np.concatenate([[0], np.cumsum(tok_sizes)[:-1]])[tok_block]
  wm = grids_hw[tok_block, 1] // merge
  ti, tj = tok_local // wm, tok_local % wm
  dy, dx = np.divmod(np.arange(merge * merge), merge)          # (0,0), (0,1), (1,0), (1,1) for m=2
  rows = ti[:, None] * merge + dy[None]
  cols = tj[:, None] * merge + dx[None]
  merge_index[:tok_total] = starts[tok_block][:, None] + rows * grids_hw[tok_block, 1][:, None] + cols
  merge_valid[:tok_total] = True
  return dict(patch_segment_ids=seg, patch_pos=pos, merge_index=merge_index, merge_valid=merge_valid)


def split_grid_thw(grid_thw) -> np.ndarray:
  """Reference grid rows (t, h, w), where equal consecutive frames may be run-length merged (t > 1),
  -> one (h, w) row per image or frame."""
  grid_thw = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
  return np.repeat(grid_thw[:, 1:], grid_thw[:, 0], axis=0)
