"""Slow/fast frame classification (spec preprocessing.md "Slow/fast classification").

Frame 0 is slow and is the key frame. A later frame is compared with the current key frame at a small size
(<= 256 tokens): both in HSV, cut into 28x28 patches (2352-vectors), a patch is similar when its cosine is
> 0.7 (patches black in both frames are left out); if the share of similar patches is below the threshold
(0.9) the frame is slow and becomes the key frame, otherwise it is fast.

The work is split so nothing loops over frames in Python except to walk key-frame changes:
`frame_features` (resize + HSV + per-patch squared norms) runs on each frame as soon as it exists, on
whichever thread has it (`FrameTyper`, e.g. while a video is still decoding), and `classify` compares the key
frame with a whole run of following frames at once, as far as the frames so far allow.
Dot products and norms are exact integers (in floats); only the final cosine is rounded (the reference works in
float32, so a patch whose cosine is within ~1e-6 of 0.7 could in principle be judged differently).
"""

from __future__ import annotations

import concurrent.futures
import os
import threading

import numpy as np

from keye_jax.processing import buffer_pool
from keye_jax.processing.hsv import rgb_to_hsv
from keye_jax.processing.resize import resize_planes
from keye_jax.processing.sizing import (CLASSIFY_MAX_PIXELS, IMAGE_FACTOR, MIN_FRAME_SIMILARITY,
                                        VIDEO_MIN_PIXELS, smart_resize)

PATCH = 28
COSINE_THRESHOLD = 0.7
_EPS = 1e-8


def classification_size(height: int, width: int) -> tuple[int, int]:
  """The size frames of a (height, width) video are compared at."""
  return smart_resize(height, width, IMAGE_FACTOR, VIDEO_MIN_PIXELS, CLASSIFY_MAX_PIXELS)


def _patch_sums(x: np.ndarray) -> np.ndarray:
  """(m, 3, H, W) float32 products of uint8 values -> (m, H/28, W/28) exact float64 sums over each 28x28
  patch and the 3 channels. Summing the 28 rows of a patch first adds whole contiguous rows (fast), and
  28 products stay under 2^24, exact in float32; the remaining sums run in float64."""
  m, c, h, w = x.shape
  rows = x.reshape(m, c, h // PATCH, PATCH, w).sum(axis=3)                  # (m, c, nh, W)
  return rows.astype(np.float64).reshape(m, c, h // PATCH, w // PATCH, PATCH).sum(axis=(1, 4))


def frame_features(frames: np.ndarray, out: tuple[np.ndarray, np.ndarray] | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(m, 3, H, W) uint8 RGB -> HSV at the classification size (m, 3, h, w) uint8 and per-patch squared
  norms (m, h/28, w/28) float64 (exact integers), written into `out` when given. One frame at a time keeps
  the temporaries in cache."""
  h, w = classification_size(*frames.shape[-2:])
  if out is None:
    out = (np.empty((len(frames), 3, h, w), np.uint8), np.empty((len(frames), h // PATCH, w // PATCH)))
  hsv, sq = out
  for i, frame in enumerate(frames):
    hsv[i] = rgb_to_hsv(resize_planes(frame, h, w))
    v = hsv[i].astype(np.float32)
    sq[i] = _patch_sums((v * v)[None])[0]
  return hsv, sq


def _similarities(key: np.ndarray, key_sq: np.ndarray, run: np.ndarray, run_sq: np.ndarray) -> np.ndarray:
  """Share of similar patches between the key frame and each frame of a run: (m,) float32, NaN when every
  patch is black in both frames (the reference's mean over nothing)."""
  key32 = key.astype(np.float32)
  dot = np.empty(run_sq.shape)
  for i, frame in enumerate(run):                 # one frame at a time: temporaries stay small and in cache
    dot[i] = _patch_sums((key32 * frame)[None])[0]
  cos = dot / ((np.sqrt(key_sq)[None] + _EPS) * (np.sqrt(run_sq) + _EPS))
  valid = ~((key_sq[None] == 0) & (run_sq == 0))
  similar = (cos > COSINE_THRESHOLD) & valid
  count = similar.sum(axis=(1, 2)).astype(np.float32)
  n_valid = valid.sum(axis=(1, 2)).astype(np.float32)
  with np.errstate(invalid="ignore", divide="ignore"):
    return count / n_valid                        # float32 division, as torch's mean


class Classifier:
  """Frame types (T,) int32, 0 = slow, 1 = fast, from `frame_features` of all frames in order, worked out
  while the features still arrive: `advance(n)` once the features of frames [0, n) are in `hsv` / `sq_norms`
  (preallocated, filled by the caller), `advance(T, final=True)` at the end; then `types` holds the result.

  The key frame is compared with a run of following frames at once; the run grows while frames stay fast
  and shrinks after a cut, so the work stays near one comparison per frame. A run waits until all its
  frames are there, so the work is the same however the features arrive.
  """

  def __init__(self, hsv: np.ndarray, sq_norms: np.ndarray, threshold: float = MIN_FRAME_SIMILARITY):
    self.hsv, self.sq_norms, self.threshold = hsv, sq_norms, threshold
    self.types = np.ones(len(hsv), np.int32)
    if len(hsv):
      self.types[0] = 0
    self.key, self.pos, self.run = 0, 1, 4

  def advance(self, available: int, final: bool = False) -> None:
    n = len(self.hsv)
    while self.pos < min(available, n):
      end = min(self.pos + self.run, n)
      if end > available and not final:
        return
      end = min(end, available)
      key, pos = self.key, self.pos
      sim = _similarities(self.hsv[key], self.sq_norms[key], self.hsv[pos:end], self.sq_norms[pos:end])
      slow = np.flatnonzero(sim.astype(np.float64) < self.threshold)     # NaN compares False: fast
      if len(slow):
        self.key = pos + int(slow[0])
        self.types[self.key] = 0
        self.pos = self.key + 1
        self.run = max(2, min(self.run, 2 * (int(slow[0]) + 1)))
      else:
        self.pos = end
        self.run = min(2 * self.run, 16)


class FrameTyper:
  """Frame types of `n` frames of one size, worked out while the frames arrive, in any order, from any
  number of threads: `add(k, frame)` computes frame k's features on the calling thread and then classifies
  as far as the frames so far allow (one thread at a time, the others go back to their work); `types()`
  once every frame is added.
  """

  def __init__(self, n: int, height: int, width: int, threshold: float = MIN_FRAME_SIMILARITY):
    h, w = classification_size(height, width)
    self.hsv = buffer_pool.empty((n, 3, h, w), np.uint8)
    self.sq_norms = np.empty((n, h // PATCH, w // PATCH))
    self._ready = np.zeros(n + 1, bool)             # a False sentinel at n
    self._prefix = 0                                # frames [0, prefix) have their features
    self._classifier = Classifier(self.hsv, self.sq_norms, threshold)
    self._state = threading.Lock()
    self._classifying = threading.Lock()

  def add(self, k: int, frame: np.ndarray) -> None:
    """Frame k, (3, H, W) uint8 RGB."""
    frame_features(frame[None], out=(self.hsv[k:k + 1], self.sq_norms[k:k + 1]))
    with self._state:
      self._ready[k] = True
      while self._ready[self._prefix]:
        self._prefix += 1
    while self._classifying.acquire(blocking=False):
      try:
        done = self._prefix
        self._classifier.advance(done)
      finally:
        self._classifying.release()
      if self._prefix == done:                      # nothing new arrived meanwhile
        return

  def types(self) -> np.ndarray:
    """(n,) int32, 0 = slow, 1 = fast; every frame must have been added."""
    if self._prefix < len(self.hsv):
      raise RuntimeError(f"frame {self._prefix} was never added")
    with self._classifying:
      self._classifier.advance(len(self.hsv), final=True)
    return self._classifier.types


def classify(hsv: np.ndarray, sq_norms: np.ndarray, threshold: float = MIN_FRAME_SIMILARITY) -> np.ndarray:
  """Frame types (T,) int32, 0 = slow, 1 = fast, from `frame_features` of all frames in order."""
  c = Classifier(hsv, sq_norms, threshold)
  c.advance(len(hsv), final=True)
  return c.types


def frame_threads() -> int:
  """Threads for per-frame work (resize, HSV, Pillow): one per core, at most 8."""
  return max(1, min(8, os.cpu_count() or 1))


def extract_slow_fast_frames(frames: np.ndarray, threshold: float = MIN_FRAME_SIMILARITY) -> np.ndarray:
  """(T, 3, H, W) uint8 RGB frames -> frame types (T,) int32 (the reference function of the same name).
  Frames get their features on `frame_threads()` threads, classified as they come."""
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[1] != 3 or frames.dtype != np.uint8:
    raise ValueError(f"frames must be (T, 3, H, W) uint8, got {frames.shape} {frames.dtype}")
  if not len(frames):
    return np.zeros(0, np.int32)
  typer = FrameTyper(len(frames), frames.shape[2], frames.shape[3], threshold)
  with concurrent.futures.ThreadPoolExecutor(frame_threads()) as pool:
    for f in [pool.submit(typer.add, k, frames[k]) for k in range(len(frames))]:
      f.result()
  return typer.types()
