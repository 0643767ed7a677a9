"""Responses packed into RL training rows: SFT's row layout (3D positions, segment ids, patches) plus the
per-token RL fields on exactly the response tokens, several responses per row, none split."""

from __future__ import annotations

import numpy as np
import pytest

from train.data.decode import TokenIds
from train.rl.batch import Response, pack_responses, responses_in

IDS = TokenIds(pad=0, vision_start=3, vision_end=4, image_pad=5, video_pad=6)


def _response(n_prompt, n_resp, adv, *, patches=0, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(10, 100, n_prompt).astype(np.int32)
  pos = np.broadcast_to(np.arange(n_prompt), (3, n_prompt)).copy()
  pixels = grids = None
  if patches:  # one 2x(patches/2) image: patches/4 image pad tokens at the start
    k = patches // 4
    ids[1:1 + k] = IDS.image_pad
    ids[0], ids[1 + k] = IDS.vision_start, IDS.vision_end
    pos[1:, 1:1 + k] = 7  # 3D ids inside the image; max(pos) stays below n_prompt
    pixels = rng.normal(size=(patches, 588)).astype(np.float32)
    grids = np.array([[2, patches // 2]], np.int32)
  return Response(ids, pos, pixels, grids, rng.integers(10, 100, n_resp).astype(np.int32),
                  -rng.random(n_resp).astype(np.float32), adv)


def test_packed_rows_hold_each_response_with_its_fields():
  rs = [_response(5, 3, 1.5, seed=1), _response(4, 6, -0.5, patches=8, seed=2), _response(6, 2, 0.25, seed=3)]
  b = pack_responses(rs, seq_len=16, num_patches=16, rows=3, ids=IDS)
  assert b["input_ids"].shape == (3, 16) and b["position_ids"].shape == (3, 3, 16)
  assert b["old_logprobs"].dtype == np.float32 and b["advantages"].shape == (3, 16)
  assert responses_in(b) == 3
  # first fit: 8 + 10 tokens > 16, so rows [r0], [r1, r2]... r0 (8) + r2 (8) = 16 fits row 0
  seg, mask = b["segment_ids"], b["loss_mask"]
  found = []
  for r in rs:
    n, t = len(r.prompt_ids), len(r.tokens)
    full = np.concatenate([r.prompt_ids, r.tokens])
    for row in range(3):
      for s in range(1, seg[row].max() + 1):
        where = np.flatnonzero(seg[row] == s)
        if len(where) == n + t and np.array_equal(b["input_ids"][row, where], full):
          found.append((row, s))
          np.testing.assert_array_equal(mask[row, where], [False] * n + [True] * t)
          np.testing.assert_array_equal(b["old_logprobs"][row, where[n:]], r.logprobs)
          np.testing.assert_array_equal(b["advantages"][row, where[n:]], np.float32(r.advantage))
          assert not b["advantages"][row, where[:n]].any() and not b["old_logprobs"][row, where[:n]].any()
          # positions: the prompt's own, then max + 1, + 2, ... on all three rows
          pos = b["position_ids"][:, row, where]
          np.testing.assert_array_equal(pos[:, :n], r.prompt_positions)
          after = r.prompt_positions.max() + 1 + np.arange(t)
          np.testing.assert_array_equal(pos[:, n:], np.broadcast_to(after, (3, t)))
  assert len(found) == 3
  # nothing outside responses is a loss token or carries RL values; padding is segment 0
  assert not mask[seg == 0].any() and not b["advantages"][~mask].any() and not b["old_logprobs"][~mask].any()
  # the image's patches are in the row holding r1, with its vision layout
  row_img = next(r for r, s in found if r == found[1][0])
  np.testing.assert_array_equal(b["pixel_values"][row_img, :8], rs[1].pixel_values)
  assert (b["patch_segment_ids"][row_img] > 0).sum() == 8


def test_fixed_row_count_padding_and_overflow():
  b = pack_responses([_response(4, 4, 1.0)], seq_len=8, num_patches=4, rows=4, ids=IDS)
  assert b["input_ids"].shape == (4, 8) and (b["segment_ids"][1:] == 0).all()
  with pytest.raises(ValueError, match="do not fit 1 rows"):
    pack_responses([_response(4, 4, 1.0), _response(4, 4, 1.0, seed=1)], seq_len=8, num_patches=4, rows=1, ids=IDS)
  with pytest.raises(ValueError, match="exceeds a row"):
    pack_responses([_response(6, 4, 1.0)], seq_len=8, num_patches=4, rows=1, ids=IDS)
  b = pack_responses([_response(4, 4, 1.0)], seq_len=8, num_patches=4, rows=1, ids=IDS, with_ref=True)
  assert b["ref_logprobs"].shape == (1, 8)
