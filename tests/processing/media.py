"""Test helpers: the reference package, and small videos made with PyAV."""

from __future__ import annotations

import importlib
import os
import sys
import types

import av
import numpy as np


def load_reference():
  """keye_vl_utils.vision_process, the reference.

  It imports torchvision at import time but never uses it on the paths tested here, and torchvision cannot
  be installed beside torch 2.13.0, so an empty stand-in module is put in sys.modules for the import only
  (and removed again, so other tests that probe for torchvision are not misled).
  """
  if "keye_vl_utils.vision_process" in sys.modules:
    return sys.modules["keye_vl_utils.vision_process"]
  stub = types.ModuleType("torchvision")
  stub.io = types.ModuleType("torchvision.io")
  stub.transforms = types.ModuleType("torchvision.transforms")
  stub.transforms.InterpolationMode = None
  names = {"torchvision": stub, "torchvision.io": stub.io, "torchvision.transforms": stub.transforms}
  added = [n for n in names if n not in sys.modules]
  sys.modules.update({n: names[n] for n in added})
  try:
    return importlib.import_module("keye_vl_utils.vision_process")
  finally:
    for n in added:
      sys.modules.pop(n, None)


def texture(rng, h, w, block=8):
  """A blocky random RGB image (H, W, 3) uint8."""
  small = rng.integers(0, 256, (-(-h // block), -(-w // block), 3), dtype=np.uint8)
  return small.repeat(block, 0).repeat(block, 1)[:h, :w]


def _gray(rng, h, w, block=8):
  """Low-saturation blocks."""
  return np.repeat(texture(rng, h, w, block)[..., :1] // 2 + 100, 3, axis=2)


def _vivid(rng, h, w, block=8):
  """Saturated blocks: one strong channel per block."""
  small = rng.integers(0, 40, (-(-h // block), -(-w // block), 3), dtype=np.uint8)
  strong = rng.integers(0, 3, small.shape[:2])
  np.put_along_axis(small, strong[..., None], rng.integers(200, 256, small.shape[:2] + (1,), dtype=np.uint8), 2)
  return small.repeat(block, 0).repeat(block, 1)[:h, :w]


def scene_frames(kind: str, n: int, h: int, w: int, seed: int = 0) -> list[np.ndarray]:
  """Frames (H, W, 3) uint8 of a named kind of shot. The classifier compares HSV patches, where random
  textures all look alike, so scenes differ in saturation (gray blocks vs vivid blocks) as real cuts do."""
  rng = np.random.default_rng(seed)
  a, b = _gray(rng, h, w), _vivid(rng, h, w, block=5)
  wide = np.concatenate([_gray(rng, h, w), _vivid(rng, h, w), _gray(rng, h, w)], axis=1)
  frames = []
  for i in range(n):
    if kind == "static":
      f = a
    elif kind == "cuts":                       # a hard cut every 7 frames
      f = a if (i // 7) % 2 == 0 else b
    elif kind == "pan":                        # pan across gray, vivid, gray
      x = i * (2 * w) // max(n - 1, 1)
      f = wide[:, x:x + w]
    elif kind == "fade":                       # fade to black and back
      f = (a.astype(np.float32) * abs(1 - 2 * i / max(n - 1, 1))).astype(np.uint8)
    elif kind == "black":                      # black frames in the middle
      f = np.zeros_like(a) if n // 3 <= i < 2 * n // 3 else a
    elif kind == "noise":                      # every frame a new texture, gray or vivid
      f = (_gray if i % 2 else _vivid)(rng, h, w, block=4)
    elif kind == "mixed":                      # drift with a cut and a flash
      f = np.roll(a, i, axis=1) if i < n // 2 else np.roll(b, -i, axis=0)
      if i == 3 * n // 4:
        f = np.full_like(a, 255)
    else:
      raise ValueError(kind)
    frames.append(np.ascontiguousarray(f))
  return frames


def write_video(path: str, frames, fps: int = 10, codec: str = "libx264") -> str:
  """Encode (H, W, 3) uint8 frames; odd sizes are encoded as yuv444p (x264 needs even sizes for 4:2:0)."""
  h, w = frames[0].shape[:2]
  with av.open(path, "w") as c:
    s = c.add_stream(codec, rate=fps)
    s.width, s.height = w, h
    s.pix_fmt = "yuv420p" if h % 2 == 0 and w % 2 == 0 else "yuv444p"
    s.options = {"preset": "ultrafast", "crf": "18"}
    for f in frames:
      for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
        c.mux(p)
    for p in s.encode():
      c.mux(p)
  return path


def write_clip(path: str, kind: str, seconds: float = 20, fps: int = 30, h: int = 720, w: int = 1280,
               seed: int = 0, preset: str = "fast") -> str:
  """A panning H.264 clip (yuv420p, B-frames as real encodes have), cut to a new scene every 3 s.

  kind "heavy": blocks of 16 with fresh noise on every frame, encoded at crf 21: a high bitrate, the decoder
  does most of the work. kind "cheap": flat blocks of 64, no noise, crf 23: cheap to decode, so everything
  done besides decoding shows. Written to `path` (kept when it already exists).
  """
  if os.path.exists(path):
    return path
  if kind not in ("heavy", "cheap"):
    raise ValueError(kind)
  heavy = kind == "heavy"
  rng = np.random.default_rng(seed)
  block, crf, noise = (16, 21, 8) if heavy else (64, 23, 0)
  per_scene = max(1, int(3 * fps))
  step = 4 * max(1, w // 320)                            # pixels panned per frame
  pan_w = w + step * per_scene
  scenes = [(_gray if k % 2 else _vivid)(rng, h, pan_w, block=block) for k in range(4)]
  tmp = path + ".part"
  with av.open(tmp, "w", format="mp4") as c:
    s = c.add_stream("libx264", rate=fps)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    s.options = {"preset": preset, "crf": str(crf)}
    for i in range(int(seconds * fps)):
      base = scenes[(i // per_scene) % len(scenes)]
      x = (i % per_scene) * step
      f = base[:, x:x + w]
      if noise:
        f = np.clip(f.astype(np.int16) + rng.integers(-noise, noise + 1, (h, w, 1), dtype=np.int16), 0, 255)
      for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f, np.uint8), format="rgb24")):
        c.mux(p)
    for p in s.encode():
      c.mux(p)
  os.replace(tmp, path)
  return path
