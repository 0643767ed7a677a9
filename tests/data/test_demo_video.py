"""The demo's video questions: frames drawn on the merged-token grid, uniform answer letters, options in
the pool's order, and labels that agree with the frames (fast: records are built in memory, no files)."""

from __future__ import annotations

import collections
import random

import numpy as np
import pytest

from keye_jax.processing.sizing import IMAGE_FACTOR, video_frame_sizes
from keye_jax.processing.slowfast import classify, frame_features
from train.data.demo import (COLORS, FPS, LETTERS, QUADRANT_BOX, QUADRANT_XY, QUADRANTS, VIDEO_FRAME,
                             _Builder)

N = 400


@pytest.fixture(scope="module")
def records():
  b = _Builder(random.Random(0))
  return {c: [b.video_record(c) for _ in range(N)] for c in ("video_event", "video_time")}


def test_frames_are_token_aligned():
  """Slow and fast frames keep their drawn size under the reference sizing (no resampling), and each
  quadrant's shape box lies on the 28 px merged-token grid (3x3 tokens), inside the frame, the boxes apart."""
  width, height = VIDEO_FRAME["size"]
  for types in ([0, 1, 1, 1, 1], [0, 0, 0, 0, 0], [0] + [1] * 31):
    sizes = video_frame_sizes(height, width, np.array(types), {})
    assert sizes == {"height": height, "width": width, "fast_height": height, "fast_width": width}
  assert QUADRANT_BOX % IMAGE_FACTOR == 0 and set(QUADRANT_XY) == set(QUADRANTS)
  boxes = [(x, y, x + QUADRANT_BOX, y + QUADRANT_BOX) for x, y in QUADRANT_XY.values()]
  for x0, y0, x1, y1 in boxes:
    assert x0 % IMAGE_FACTOR == 0 and y0 % IMAGE_FACTOR == 0 and x1 <= width and y1 <= height
  for i, a in enumerate(boxes):
    for b in boxes[i + 1:]:
      assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


@pytest.mark.parametrize("category", ["video_event", "video_time"])
def test_answer_letters_are_uniform(records, category):
  counts = collections.Counter(letter for *_, letter in records[category])
  assert set(counts) == set(LETTERS)
  assert all(0.19 * N <= n <= 0.31 * N for n in counts.values()), counts


def test_event_options_are_in_the_pools_order(records):
  """Like the image questions, the event options are listed in a fixed order (colours, quadrants): a
  model that sees the outcome reads its letter without matching words across the prompt."""
  for _, _, _, options, _ in records["video_event"]:
    pool = list(COLORS) if options[0] in COLORS else list(QUADRANTS)
    assert options == sorted(options, key=pool.index) and len(set(options)) == 4


def _quadrant_colour(frame: np.ndarray, quadrant: str):
  """The colour name drawn in a quadrant's box of a frame, or None for background."""
  x, y = QUADRANT_XY[quadrant]
  patch = frame[y:y + QUADRANT_BOX, x:x + QUADRANT_BOX].reshape(-1, 3).astype(int)
  fg = patch[patch.sum(-1) > 60]
  if len(fg) < 100:
    return None
  med = np.median(fg, axis=0)
  return min(COLORS, key=lambda n: np.abs(np.array(COLORS[n]) - med).sum())


def test_labels_agree_with_frames(records):
  """video_time: the correct time is the first changed frame's. video_event: the correct outcome is in the
  last frame, and no distractor colour or quadrant is seen there (nor a distractor colour anywhere)."""
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
    if correct in QUADRANTS:
      kinds["move"] += 1
      assert _quadrant_colour(last, correct) is not None and _quadrant_colour(first, correct) is None
      assert all(_quadrant_colour(last, d) is None for d in distractors)
    else:
      kinds["colour"] += 1
      seen_last = {_quadrant_colour(last, q) for q in QUADRANTS}
      seen_any = seen_last | {_quadrant_colour(first, q) for q in QUADRANTS}
      assert correct in seen_last and not set(distractors) & seen_any, question
  assert kinds["move"] >= 10 and kinds["colour"] >= 10, kinds


def test_the_event_frame_is_a_slow_frame(records):
  """The reference's slow/fast classification marks the event: when a shape appears or moves, frame 0 and
  the first changed frame are the slow frames (patches black in both frames are left out). A colour change
  keeps the shape's brightness and saturation, so its patches stay similar (HSV cosine > 0.7) and its frame
  may stay fast."""
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
