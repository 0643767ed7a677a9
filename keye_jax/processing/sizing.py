"""Sizes, frame counts and token budgets of Keye-VL 1.5 preprocessing (spec preprocessing.md).

Everything here reproduces `keye_vl_utils` 1.5.2 to the last bit, including its float32 quirks:
frame indices come from torch's float32 `linspace` and its round-half-to-even.
"""

from __future__ import annotations

import math

import numpy as np

from keye_jax.processing.errors import MediaError

IMAGE_FACTOR = 28                       # one LLM token covers 28x28 pixels (2x2 patches of 14)
MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 20480 * 28 * 28
MAX_RATIO = 200
VIDEO_MIN_PIXELS = 48 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = 65536 * 28 * 28
FPS = 2.0
FAST_TOKEN_RATIO = 0.3
MIN_FRAME_SIMILARITY = 0.9
CLASSIFY_MAX_PIXELS = 256 * 28 * 28     # frames are compared at this size


def smart_resize(height: int, width: int, factor: int = IMAGE_FACTOR, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
  """(height, width) -> the nearest (h, w), both multiples of `factor`, with h*w in [min_pixels, max_pixels]."""
  if max(height, width) / min(height, width) > MAX_RATIO:
    raise ValueError(
        f"absolute aspect ratio must be smaller than {MAX_RATIO}, got {max(height, width) / min(height, width)}")
  h_bar = max(factor, round(height / factor) * factor)
  w_bar = max(factor, round(width / factor) * factor)
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = math.floor(height / beta / factor) * factor
    w_bar = math.floor(width / beta / factor) * factor
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return max(h_bar, factor), max(w_bar, factor)


def checked_resize(source, height: int, width: int, **kwargs) -> tuple[int, int]:
  """`smart_resize` whose aspect-ratio error names the media it came from."""
  if height < 1 or width < 1:
    raise MediaError(source, f"empty image of {height}x{width} pixels")
  try:
    return smart_resize(height, width, **kwargs)
  except ValueError as e:
    raise MediaError(source, str(e)) from None


def smart_nframes(ele: dict, total_frames: int, video_fps: float) -> int:
  """How many frames to sample from `total_frames` frames at `video_fps` (reference `smart_nframes`)."""
  fps = min(ele.get("fps", FPS), video_fps)
  max_frames = int(ele.get("video_total_pixels", VIDEO_TOTAL_PIXELS) / ele.get("min_pixels", VIDEO_MIN_PIXELS))
  max_frames = min(ele.get("max_frames", max_frames), max_frames)
  return min(int(total_frames / video_fps * fps), max_frames)


def sample_indices(total_frames: int, nframes: int) -> np.ndarray:
  """round(torch.linspace(0, total_frames - 1, nframes)) exactly as torch computes it on CPU.

  torch works in float32: step = (end - start) / (steps - 1); the first half is `start + step * i`, the
  second `end - step * (steps - 1 - i)`, each a fused multiply-add (one rounding); then round-half-to-even.
  Long videos (>~10k frames) pick different frames than float64 arithmetic would, so this is replayed.
  """
  if nframes <= 0:
    return np.zeros(0, np.int64)
  if nframes == 1:
    return np.zeros(1, np.int64)
  end = np.float32(total_frames - 1)
  step = np.float64(np.float32(end / np.float32(nframes - 1)))
  i = np.arange(nframes)
  # float32 x int < 2^53, so the float64 product and difference are exact: one rounding, like an FMA.
  first = (step * i).astype(np.float32)
  second = (np.float64(end) - step * (nframes - 1 - i)).astype(np.float32)
  return np.rint(np.where(i < nframes // 2, first, second)).astype(np.int64)


def video_frame_sizes(height: int, width: int, frame_types, ele: dict) -> dict[str, int]:
  """Slow and fast frame sizes of a video under its token budget (reference `fetch_video` tail).

  The binary search returns the first tokens-per-frame over budget, so the total may overshoot by one step;
  that is what the released model saw, so it is kept.
  """
  frame_types = np.asarray(frame_types)
  n_fast = int(frame_types.sum())
  n_slow = len(frame_types) - n_fast
  min_pixels = max(int(ele.get("min_pixels", VIDEO_MIN_PIXELS)), VIDEO_MIN_PIXELS)
  min_tokens = int(min_pixels / IMAGE_FACTOR / IMAGE_FACTOR)
  total_pixels = ele.get("video_total_pixels", VIDEO_TOTAL_PIXELS)
  tok = IMAGE_FACTOR * IMAGE_FACTOR

  def estimate(t):
    return n_slow * t * tok + n_fast * max(int(FAST_TOKEN_RATIO * t), min_tokens) * tok

  left = min_pixels / tok
  right = ele.get("max_pixels", VIDEO_MAX_PIXELS) / tok
  while left < right:
    mid = int(left + right) // 2
    if estimate(mid) > total_pixels:
      right = mid
    else:
      left = mid + 1
  slow_h, slow_w = smart_resize(height, width, IMAGE_FACTOR, min_pixels, left * tok)
  slow_tokens = slow_h * slow_w / tok
  fast_max = max(int(slow_tokens * FAST_TOKEN_RATIO) * tok, VIDEO_MIN_PIXELS)
  fast_h, fast_w = smart_resize(height, width, IMAGE_FACTOR, min_pixels, fast_max)
  return {"height": slow_h, "width": slow_w, "fast_height": fast_h, "fast_width": fast_w}
