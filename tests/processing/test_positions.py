"""3D M-RoPE ids: hand-computed cases from the spec, a naive walker, padding, reference-style grids."""

import numpy as np
import pytest

from keye_jax.processing import batch_position_ids, position_ids, reference_position_ids

T, VS, VE, IMG, VID, FRAME, FS, FE = 100, 3, 4, 5, 6, 7, 8, 9


def walk(ids, grids_merged, pads=(IMG, VID)):
  """The spec's rule, one token at a time."""
  out, cur, k, b = [], 0, 0, 0
  i = 0
  while i < len(ids):
    if ids[i] in pads:
      h, w = grids_merged[b]
      for r in range(h):
        for c in range(w):
          out.append((cur, cur + r, cur + c))
      cur += max(h, w)
      i += h * w
      b += 1
    else:
      out.append((cur, cur, cur))
      cur += 1
      i += 1
  return np.array(out).T


IMAGE_SEQ = [T, T, VS] + [IMG] * 35 + [VE, T, T, T]                     # image 10x14 patches = 5x7 merged
VIDEO_SEQ = ([T, T, T, VS, FRAME, 50, 51, 50] + [VID] * 24             # slow 8x12 patches, "0.0"
             + [FRAME, 50, 51, 52, FS] + [VID] * 6 + [FE, VE, T, T])   # fast 4x6 patches, "0.5"


def test_image_block_by_hand():
  pos, delta = position_ids(IMAGE_SEQ, [[10, 14]], (IMG, VID))
  assert pos[:, :3].T.tolist() == [[0, 0, 0], [1, 1, 1], [2, 2, 2]]
  assert pos[:, 3].tolist() == [3, 3, 3] and pos[:, 9].tolist() == [3, 3, 9]
  assert pos[:, 10].tolist() == [3, 4, 3] and pos[:, 37].tolist() == [3, 7, 9]
  assert pos[:, 38:].T.tolist() == [[10, 10, 10], [11, 11, 11], [12, 12, 12], [13, 13, 13]]
  assert delta == 14 - len(IMAGE_SEQ)


def test_video_slow_and_fast_frames_by_hand():
  pos, delta = position_ids(VIDEO_SEQ, [[8, 12], [4, 6]], (IMG, VID))
  assert pos[0, :8].tolist() == list(range(8))
  blk = pos[:, 8:32]
  assert set(blk[0]) == {8} and (blk[1].min(), blk[1].max()) == (8, 11) and (blk[2].min(), blk[2].max()) == (8, 13)
  assert pos[:, 32].tolist() == [14, 14, 14] and pos[0, 36] == 18                    # <|frame|>, <|fast_start|>
  fast = pos[:, 37:43]
  assert fast.T.tolist() == [[19, 19, 19], [19, 19, 20], [19, 19, 21], [19, 20, 19], [19, 20, 20], [19, 20, 21]]
  assert pos[0, 43:].tolist() == [22, 23, 24, 25]
  assert delta == 26 - len(VIDEO_SEQ)


def test_text_before_between_after_matches_naive_walk():
  ids = IMAGE_SEQ + VIDEO_SEQ + IMAGE_SEQ
  grids = [[10, 14], [8, 12], [4, 6], [10, 14]]
  pos, delta = position_ids(ids, grids, (IMG, VID))
  want = walk(ids, [[h // 2, w // 2] for h, w in grids])
  np.testing.assert_array_equal(pos, want)
  assert delta == want.max() + 1 - len(ids)
  np.testing.assert_array_equal(position_ids(ids, np.array(grids) // 2, (IMG, VID), spatial_merge_size=1)[0], want)


def test_count_mismatch_is_an_error():
  with pytest.raises(ValueError, match="vision tokens"):
    position_ids(IMAGE_SEQ, [[10, 12]], (IMG, VID))


def test_left_and_right_padding():
  a, b = IMAGE_SEQ, VIDEO_SEQ
  s = max(len(a), len(b)) + 3
  ids = np.zeros((2, s), np.int64)
  mask = np.zeros((2, s), np.int64)
  ids[0, s - len(a):], mask[0, s - len(a):] = a, 1          # left padded
  ids[1, :len(b)], mask[1, :len(b)] = b, 1                  # right padded
  pos, deltas = batch_position_ids(ids, mask, [[[10, 14]], [[8, 12], [4, 6]]], (IMG, VID))
  assert pos.shape == (3, 2, s)
  np.testing.assert_array_equal(pos[:, 0, s - len(a):], position_ids(a, [[10, 14]], (IMG, VID))[0])
  np.testing.assert_array_equal(pos[:, 1, :len(b)], position_ids(b, [[8, 12], [4, 6]], (IMG, VID))[0])
  assert (pos[:, 0, :s - len(a)] == 1).all() and (pos[:, 1, len(b):] == 1).all()
  assert deltas.tolist() == [14 - s, 26 - s]


def test_reference_style_grids_with_run_length_frames():
  slow, fast = [VID] * 24, [VID] * 6
  ids = (IMAGE_SEQ + [VS, FRAME] + slow + [FRAME, FS] + fast + [FE, FRAME, FS] + fast + [FE, VE])
  pos, deltas = reference_position_ids(ids, IMG, VID, image_grid_thw=[[1, 10, 14]],
                                       video_grid_thw=[[1, 8, 12], [2, 4, 6]])
  want, d = position_ids(ids, [[10, 14], [8, 12], [4, 6], [4, 6]], (IMG, VID))
  np.testing.assert_array_equal(pos[:, 0], want)
  assert deltas.tolist() == [d]
