"""3D M-RoPE position ids (spec model.md section 5), vectorised.

Walking the sequence with `cur` = 1 + the largest id so far: a text token gets (cur, cur, cur) and
advances cur by 1; a vision block (one image or one video frame, grid h' x w' in merged tokens) starting at
s = cur gives its token (r, c) the ids (s, s + r, s + c) and advances cur to s + max(h', w').
As a prefix sum: every text token adds 1, the last token of a block adds max(h', w'), other vision tokens
add 0, so each token's temporal id is the sum of the increments before it.
"""

from __future__ import annotations

import numpy as np

from keye_jax.processing.vision_layout import split_grid_thw


def position_ids(input_ids, grids_hw, vision_token_ids, spatial_merge_size: int = 2) -> tuple[np.ndarray, int]:
  """(S,) token ids + block grids in occurrence order -> ((3, S) int32 ids, rope_delta).

  `grids_hw` (n, 2) are in patch units (merged = grid // spatial_merge_size; pass 1 for merged units).
  The k-th vision token (any id in `vision_token_ids`) is the k-th merged token of the blocks in order.
  """
  ids = np.asarray(input_ids).reshape(-1)
  grids = np.asarray(grids_hw, np.int64).reshape(-1, 2) // spatial_merge_size
  is_vis = np.isin(ids, np.asarray(vision_token_ids))
  sizes = grids[:, 0] * grids[:, 1]
  n_vis = int(is_vis.sum())
  if n_vis != int(sizes.sum()):
    raise ValueError(f"{n_vis} vision tokens in the text but the grids {grids.tolist()} hold {int(sizes.sum())}")
  vis_pos = np.flatnonzero(is_vis)
  block = np.repeat(np.arange(len(sizes)), sizes)                        # block of each vision token
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
  local = np.arange(n_vis) - starts[block]
  if np.any(vis_pos - vis_pos[starts[block]] != local):
    raise ValueError("the tokens of a vision block are not contiguous in the text")
  last_pos = vis_pos[(starts + sizes - 1)[sizes > 0]]
  inc = np.where(is_vis, 0, 1).astype(np.int64)
  inc[last_pos] = np.maximum(grids[sizes > 0, 0], grids[sizes > 0, 1])
  t = np.concatenate([[0], np.cumsum(inc)[:-1]])
  rows = np.zeros(len(ids), np.int64)
  cols = np.zeros(len(ids), np.int64)
  w = grids[block, 1]
  rows[vis_pos] = local // np.maximum(w, 1)
  cols[vis_pos] = local % np.maximum(w, 1)
  pos = np.stack([t, t + rows, t + cols]).astype(np.int32)
  delta = int(pos.max()) + 1 - len(ids) if len(ids) else 0
  return pos, delta


def batch_position_ids(input_ids, attention_mask, grids_per_row, vision_token_ids,
                       spatial_merge_size: int = 2) -> tuple[np.ndarray, np.ndarray]:
  """(B, S) ids with left or right padding -> ((3, B, S) int32 ids, (B,) rope_deltas).

  Ids count only tokens with attention_mask 1; padding slots get 1. rope_delta = max + 1 - S (padded S),
  so decoding continues at cache position + delta.
  """
  ids = np.asarray(input_ids)
  mask = np.asarray(attention_mask).astype(bool)
  b, s = ids.shape
  out = np.ones((3, b, s), np.int32)
  deltas = np.zeros(b, np.int64)
  for i in range(b):
    pos, _ = position_ids(ids[i][mask[i]], grids_per_row[i], vision_token_ids, spatial_merge_size)
    out[:, i, mask[i]] = pos
    deltas[i] = (int(pos.max()) + 1 - s) if pos.size else 1 - s
  return out, deltas


def reference_position_ids(input_ids, image_token_id: int, video_token_id: int, image_grid_thw=None,
                           video_grid_thw=None, attention_mask=None,
                           spatial_merge_size: int = 2) -> tuple[np.ndarray, np.ndarray]:
  """Reference-processor inputs (grid rows [t, h, w] in patches; a video's equal consecutive frames may be
  run-length merged with t > 1) -> ((3, B, S) ids, (B,) rope_deltas). (S,) input is treated as B = 1."""
  ids = np.asarray(input_ids)
  ids = ids[None] if ids.ndim == 1 else ids
  mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).reshape(ids.shape)
  image_blocks = list(split_grid_thw(image_grid_thw)) if image_grid_thw is not None else []
  video_blocks = list(split_grid_thw(video_grid_thw)) if video_grid_thw is not None else []
  rows = []
  for i in range(len(ids)):
    real = ids[i][mask[i].astype(bool)]
    order, image_blocks, video_blocks = _blocks_in_order(real, image_token_id, video_token_id, image_blocks,
                                                         video_blocks, spatial_merge_size)
    rows.append(order)
  return batch_position_ids(ids, mask, rows, (image_token_id, video_token_id), spatial_merge_size)


def _blocks_in_order(ids, image_token_id, video_token_id, image_blocks, video_blocks, merge):
  """Consume this row's image and video blocks (each kind in its own order) and interleave them by where
  their first token sits. Returns (grids in occurrence order, remaining image blocks, remaining videos)."""
  placed = []
  for token, blocks in ((image_token_id, image_blocks), (video_token_id, video_blocks)):
    where = np.flatnonzero(ids == token)
    used, k = 0, 0
    while used < len(where):
      if k >= len(blocks):
        raise ValueError(f"more tokens {token} in the text than the grids hold")
      placed.append((int(where[used]), blocks[k]))
      used += int(blocks[k][0] * blocks[k][1]) // (merge * merge)
      k += 1
    if token == image_token_id:
      image_blocks = blocks[k:]
    else:
      video_blocks = blocks[k:]
  placed.sort(key=lambda x: x[0])
  grids = np.array([g for _, g in placed], np.int64).reshape(-1, 2)
  return grids, image_blocks, video_blocks
