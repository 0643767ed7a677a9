"""Model-side processor: resized uint8 images and video frames -> normalised 14x14 patches for the ViT.

Output layout (spec model.md section 1): `pixel_values` (P, 588) float32, the patches of each image or frame
row-major over its (h, w) patch grid, each patch flattened in (channel, y, x) order; one grid row (h, w) per
image or frame, in prompt order. Video frames are resized with torch's uint8 antialiased bilinear filter
(`resize.py`), slow frames to (height, width) and fast frames to (fast_height, fast_width).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from PIL import Image

from keye_jax.processing.resize import resize_planes
from keye_jax.processing.sizing import MAX_PIXELS, MIN_PIXELS, smart_resize

PATCH = 14
MERGE = 2


def patchify(planes: np.ndarray, patch: int = PATCH) -> np.ndarray:
  """(3, H, W) -> (H/p * W/p, 3*p*p): patches row-major over the grid, each in (c, y, x) order."""
  c, h, w = planes.shape
  x = planes.reshape(c, h // patch, patch, w // patch, patch).transpose(1, 3, 0, 2, 4)
  return x.reshape((h // patch) * (w // patch), c * patch * patch)


@dataclasses.dataclass(frozen=True)
class Processor:
  """Normalisation constants and image bounds, as in a checkpoint's preprocessor_config.json."""

  image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
  image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
  rescale_factor: float = 1 / 255
  min_pixels: int = MIN_PIXELS
  max_pixels: int = MAX_PIXELS
  patch_size: int = PATCH
  merge_size: int = MERGE

  @classmethod
  def from_pretrained(cls, checkpoint_dir: str | None) -> "Processor":
    """Read preprocessor_config.json from the directory when it exists; defaults otherwise."""
    path = os.path.join(checkpoint_dir, "preprocessor_config.json") if checkpoint_dir else None
    if not path or not os.path.exists(path):
      return cls()
    try:
      with open(path) as f:
        cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"{path}: not a readable JSON file ({e})") from None
    kwargs = {}
    for key in ("image_mean", "image_std"):
      if key in cfg:
        value = cfg[key]
        if not (isinstance(value, (list, tuple)) and len(value) == 3):
          raise ValueError(f"{path}: field {key!r} must be a list of 3 numbers, got {value!r}")
        kwargs[key] = tuple(float(v) for v in value)
    for key in ("rescale_factor", "min_pixels", "max_pixels", "patch_size", "merge_size"):
      if cfg.get(key) is not None:
        kwargs[key] = type(getattr(cls, key))(cfg[key])
    return cls(**kwargs)

  def normalize(self, planes: np.ndarray) -> np.ndarray:
    """(..., 3, H, W) uint8 -> float32 (x * rescale - mean) / std."""
    mean = np.asarray(self.image_mean, np.float32)[:, None, None]
    std = np.asarray(self.image_std, np.float32)[:, None, None]
    return (planes.astype(np.float32) * np.float32(self.rescale_factor) - mean) / std

  def image(self, image) -> tuple[np.ndarray, np.ndarray]:
    """A PIL image or (3, H, W) uint8 planes -> (pixel_values (h*w, 588), grid (h, w)).

    Images from `fetch_image` already have their final size; others are brought to it here.
    """
    if isinstance(image, Image.Image):
      image = np.stack([np.asarray(band) for band in image.convert("RGB").split()])
    factor = self.patch_size * self.merge_size
    height, width = smart_resize(image.shape[1], image.shape[2], factor, self.min_pixels, self.max_pixels)
    planes = resize_planes(image, height, width)
    return patchify(self.normalize(planes), self.patch_size), np.array([height, width]) // self.patch_size

  def video(self, frames: np.ndarray, height: int, width: int, fast_height: int, fast_width: int,
            frame_types=None, **_) -> tuple[np.ndarray, np.ndarray]:
    """(T, 3, H, W) uint8 frames + `fetch_video` sizes -> (pixel_values (P, 588), grids (T, 2)).

    Extra keyword arguments (timestamps) are accepted so `fetch_video`'s dict can be passed as it is.
    """
    types = np.zeros(len(frames), np.int32) if frame_types is None else np.asarray(frame_types)
    sizes = {0: (height, width), 1: (fast_height, fast_width)}
    per_frame = [None] * len(frames)
    grids = np.zeros((len(frames), 2), np.int32)
    for kind, (h, w) in sizes.items():
      idx = np.flatnonzero(types == kind)
      if len(idx) == 0:
        continue
      planes = self.normalize(resize_planes(frames[idx], h, w))
      for k, i in enumerate(idx):
        per_frame[i] = patchify(planes[k], self.patch_size)
        grids[i] = (h // self.patch_size, w // self.patch_size)
    if not per_frame:
      return np.zeros((0, 3 * self.patch_size ** 2), np.float32), grids
    return np.concatenate(per_frame), grids


def grid_thw(grids_hw: np.ndarray) -> np.ndarray:
  """(n, 2) per-block grids -> reference-style (n, 3) rows [1, h, w]."""
  grids_hw = np.asarray(grids_hw, np.int64).reshape(-1, 2)
  return np.concatenate([np.ones((len(grids_hw), 1), np.int64), grids_hw], axis=1)
