"""The demo's video questions: frames drawn on the merged-token grid, uniform answer letters, and labels
that agree with the frames (fast: records are built in memory, no files)."""

from __future__ import annotations

import collections
import random

import numpy as np
import pytest

from keye_jax.processing.sizing import IMAGE_FACTOR, video_frame_sizes
from keye_jax.processing.slowfast import classify, frame_features
from train.data.demo import COLORS, FPS, LETTERS, POSITIONS, VIDEO_FRAME, _Builder

N = 400


@pytest.fixture(scope="module")
def records():
  b = _Builder(random.Random(0))
  return {c: [b.video_record(c) for _ in range(N)] for c in ("video_event", "video_time")}


def test_frames_are_token_aligned():
  """Slow and fast frames keep their drawn size under the reference sizing (no resampling), and every
  cell edge falls on the 28 px merged-token grid, so a cell is exactly 2x2 tokens."""
  width, height = VIDEO_FRAME["size"]
  for types in ([0, 1, 1, 1, 1], [0, 0, 0, 0, 0], [0] + [1] * 31):
    sizes = video_frame_sizes(height, width, np.array(types), {})
    assert sizes == {"height": height, "width": width, "fast_height": height, "fast_width": width}
  cell, left = VIDEO_FRAME["cell_px"], VIDEO_FRAME["left"]
  assert cell % IMAGE_FACTOR == 0 and left % IMAGE_FACTOR == 0
  assert left + 3 * cell <= width and 3 * cell <= height


@pytest.mark.parametrize("category", ["video_event", "video_time"])
def test_answer_letters_are_uniform(records, category):
  counts = collections.Counter(letter for *_, letter in records[category])
  assert set(counts) == set(LETTERS)
  assert all(0.19 * N <= n <= 0.31 * N for n in counts.values()), counts


def _cell_colour(frame: np.ndarray, cell: int):
  """The colour name drawn in a grid cell of a frame, or None for background."""
  r, c = divmod(cell, 3)
  size, left = VIDEO_FRAME["cell_px"], VIDEO_FRAME["left"]
  patch = frame[r * size:(r + 1) * size, left + c * size:left + (c + 1) * size].reshape(-1, 3).astype(int)
  fg = patch[np.abs(patch - VIDEO_FRAME["background"]).sum(-1) > 60]
  if len(fg) < 100:
    return None
  med = np.median(fg, axis=0)
  return min(COLORS, key=lambda n: np.abs(np.array(COLORS[n]) - med).sum())


def test_labels_agree_with_frames(records):
  """video_time: the correct time is the first changed frame's. video_event: the correct outcome is in the
  last frame, and no distractor colour or position is seen in any frame."""
  for frames, _, letter, options, _ in records["video_time"]:
    arrays = [np.asarray(f) for f in frames]
    change = next(i for i, f in enumerate(arrays) if not np.array_equal(f, arrays[0]))
    assert options[LETTERS.index(letter)] == f"{change / FPS:.1f} seconds"
    assert options == sorted(options, key=lambda o: float(o.split()[0]))
  kinds = collections.Counter()
  for frames, question, letter, options, _ in records["video_event"][:100]:
    first, last = np.asarray(frames[0]), np.asarray(frames[-1])
    correct = options[LETTERS.index(letter)]
    distractors = [o for o in options if o != correct]
    if correct in POSITIONS:
      kinds["move"] += 1
      assert _cell_colour(last, POSITIONS.index(correct)) is not None
      assert _cell_colour(first, POSITIONS.index(correct)) is None
      assert all(_cell_colour(f, POSITIONS.index(d)) is None for d in distractors for f in (first, last))
    else:
      kinds["colour"] += 1
      seen_last = {_cell_colour(last, c) for c in range(9)}
      seen_any = seen_last | {_cell_colour(first, c) for c in range(9)}
      assert correct in seen_last and not set(distractors) & seen_any, question
  assert kinds["move"] >= 10 and kinds["colour"] >= 10, kinds


def test_the_event_frame_is_a_slow_frame(records):
  """The reference's slow/fast classification marks the event: when a shape appears or moves, frame 0 and
  the first changed frame are the slow frames. A colour change keeps the shape's brightness and saturation,
  so its patches stay similar (HSV cosine > 0.7) and its frame may stay fast."""
  kinds = collections.Counter()
  for frames, question, *_ in records["video_time"][:100]:
    arrays = np.stack([np.asarray(f).transpose(2, 0, 1) for f in frames])
    change = next(i for i, f in enumerate(arrays) if not np.array_equal(f, arrays[0]))
    slow = set(np.flatnonzero(classify(*frame_features(arrays)) == 0).tolist())
    if "change colour" in question:
      assert slow <= {0, change}
    else:
      assert slow == {0, change}, (question, slow, change)
      kinds["marked"] += 1
  assert kinds["marked"] >= 50, kinds
