"""Pixel-level pieces against torch and OpenCV: uint8 antialiased bilinear resize, RGB->HSV, patches."""

import json

import cv2
import numpy as np
import pytest
import torch

from keye_jax.processing import Processor, patchify
from keye_jax.processing.hsv import rgb_to_hsv
from keye_jax.processing.resize import resize_planes


def _torch_resize(x, h, w):
  return torch.nn.functional.interpolate(torch.from_numpy(x), [h, w], mode="bilinear", antialias=True).numpy()


def test_resize_equals_torch_uint8_antialias():
  rng = np.random.default_rng(0)
  cases = [(720, 1280, 336, 588), (560, 1008, 308, 588), (37, 101, 60, 90), (300, 500, 300, 280),
           (300, 500, 280, 500), (1, 7, 3, 2), (2400, 2000, 28, 56), (195, 194, 196, 196)]
  cases += [tuple(int(v) for v in rng.integers(1, 300, 4)) for _ in range(40)]
  for h, w, oh, ow in cases:
    x = rng.integers(0, 256, (2, 3, h, w), dtype=np.uint8)
    if h * w > 10**6:
      x = x[:1]
    np.testing.assert_array_equal(resize_planes(x, oh, ow), _torch_resize(x, oh, ow), err_msg=str((h, w, oh, ow)))


def test_resize_saturates_like_torch():
  x = np.zeros((1, 3, 40, 40), np.uint8)
  x[..., ::2, :] = 255
  np.testing.assert_array_equal(resize_planes(x, 17, 23), _torch_resize(x, 17, 23))


def test_hsv_equals_opencv():
  rng = np.random.default_rng(1)
  colors = rng.integers(0, 256, (3, 1 << 20), dtype=np.uint8)
  edges = np.array(np.meshgrid(*[[0, 1, 127, 128, 254, 255]] * 3)).reshape(3, -1).astype(np.uint8)
  grays = np.repeat(np.arange(256, dtype=np.uint8)[None], 3, 0)
  rgb = np.concatenate([colors, edges, grays], axis=1)[:, None, :]          # (3, 1, N)
  want = cv2.cvtColor(np.ascontiguousarray(rgb.transpose(1, 2, 0)), cv2.COLOR_RGB2HSV).transpose(2, 0, 1)
  np.testing.assert_array_equal(rgb_to_hsv(rgb), want)


@pytest.mark.slow
def test_hsv_equals_opencv_on_every_color():
  c = np.arange(1 << 24, dtype=np.uint32)
  rgb = np.stack([(c >> 16) & 255, (c >> 8) & 255, c & 255]).astype(np.uint8).reshape(3, 4096, 4096)
  want = cv2.cvtColor(np.ascontiguousarray(rgb.transpose(1, 2, 0)), cv2.COLOR_RGB2HSV).transpose(2, 0, 1)
  np.testing.assert_array_equal(rgb_to_hsv(rgb), want)


def test_patchify_layout_is_row_major_grid_channel_first():
  x = np.random.default_rng(2).random((3, 28, 42)).astype(np.float32)
  p = patchify(x)
  assert p.shape == (2 * 3, 588)
  for k in range(6):
    r, c = divmod(k, 3)
    np.testing.assert_array_equal(p[k], x[:, r * 14:(r + 1) * 14, c * 14:(c + 1) * 14].reshape(-1))


def test_processor_normalisation_and_config(tmp_path):
  x = np.random.default_rng(3).integers(0, 256, (3, 56, 84), dtype=np.uint8)
  pv, grid = Processor().image(x)
  assert grid.tolist() == [4, 6]
  np.testing.assert_allclose(pv, patchify(x / 127.5 - 1.0), atol=1e-6)
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(
      {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
  proc = Processor.from_pretrained(str(tmp_path))
  mean, std = np.array(proc.image_mean)[:, None, None], np.array(proc.image_std)[:, None, None]
  np.testing.assert_allclose(proc.image(x)[0], patchify((x / 255.0 - mean) / std), atol=2e-6)
  (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5]}))
  with pytest.raises(ValueError, match="image_mean"):
    Processor.from_pretrained(str(tmp_path))


def test_processor_video_resizes_slow_and_fast_frames_like_torch():
  rng = np.random.default_rng(4)
  frames = rng.integers(0, 256, (5, 3, 90, 160), dtype=np.uint8)
  types = np.array([0, 1, 1, 0, 1])
  proc = Processor()
  pv, grids = proc.video(frames, height=112, width=196, fast_height=56, fast_width=112, frame_types=types)
  assert grids.tolist() == [[8, 14], [4, 8], [4, 8], [8, 14], [4, 8]]
  start = 0
  for i, t in enumerate(types):
    h, w = (112, 196) if t == 0 else (56, 112)
    want = patchify(_torch_resize(frames[i:i + 1], h, w)[0] / 127.5 - 1.0)
    np.testing.assert_allclose(pv[start:start + len(want)], want, atol=1e-6)
    start += len(want)
  assert start == len(pv)
