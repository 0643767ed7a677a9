"""Sizes, frame indices and budgets against keye_vl_utils and torch."""

import numpy as np
import pytest
import torch
from PIL import Image

from keye_jax.processing import smart_resize
from keye_jax.processing.sizing import sample_indices, smart_nframes, video_frame_sizes


def _call(f, *args, **kwargs):
  try:
    return f(*args, **kwargs)
  except Exception as e:  # noqa: BLE001 - the error itself is what is compared
    return type(e), str(e)


def test_smart_resize_identical_on_10000_random_cases(ref):
  rng = np.random.default_rng(0)
  for i in range(10000):
    scale = [30, 300, 3000, 30000][i % 4]
    h, w = (int(v) for v in rng.integers(1, scale, 2))
    if i % 50 == 0:
      h = int(w * rng.uniform(150, 260)) + 1          # around the aspect-ratio limit
    lo = int(rng.integers(1, 200_000))
    hi = lo + int(rng.integers(0, 20_000_000))
    factor = [28, 28, 28, 14, 32][i % 5]
    args = (h, w, factor, lo, hi)
    assert _call(smart_resize, *args) == _call(ref.smart_resize, *args), args


def test_sample_indices_equal_torch_linspace():
  rng = np.random.default_rng(1)
  for _ in range(3000):
    n = int(rng.integers(1, 300_000))
    m = int(rng.integers(0, min(n, 1365) + 1))
    want = torch.linspace(0, n - 1, m).round().long().numpy()
    np.testing.assert_array_equal(sample_indices(n, m), want, err_msg=f"n={n} m={m}")


def test_smart_nframes_matches_reference(ref):
  rng = np.random.default_rng(2)
  for _ in range(2000):
    ele = {}
    if rng.random() < 0.5:
      ele["fps"] = float(rng.choice([0.5, 1.0, 2.0, 3.0, 29.97]))
    if rng.random() < 0.3:
      ele["max_frames"] = int(rng.integers(1, 2000))
    if rng.random() < 0.3:
      ele["video_total_pixels"] = int(rng.integers(10**6, 10**8))
    if rng.random() < 0.3:
      ele["min_pixels"] = int(rng.integers(10**4, 10**6))
    total, fps = int(rng.integers(1, 100_000)), float(rng.choice([23.976, 25.0, 30.0, 59.94, 1.0]))
    assert smart_nframes(ele, total, fps) == ref.smart_nframes(ele, total, fps)


class _Shape:
  """Stands in for the frame tensor: the budget code reads only its shape."""

  def __init__(self, shape):
    self.shape = shape

  def __getitem__(self, index):
    return self


@pytest.mark.parametrize("h,w", [(720, 1280), (1080, 1920), (480, 270), (97, 333), (2000, 30)])
def test_token_budget_matches_reference(ref, monkeypatch, h, w):
  """The budget search runs inside the reference fetch_video; feed it frames with known types."""
  rng = np.random.default_rng(3)
  for trial in range(12):
    n = int(rng.integers(1, 1400))
    types = torch.from_numpy((rng.random(n) < rng.random()).astype(np.int32))
    ele = {"video": [None] * n}
    if trial % 3 == 1:
      ele.update(max_pixels=int(rng.integers(40_000, 700_000)), min_pixels=int(rng.integers(30_000, 60_000)))
    if trial % 3 == 2:
      ele["video_total_pixels"] = int(rng.integers(10**6, 10**8))
    frames = _Shape((n, 3, h, w))
    monkeypatch.setattr(ref, "fetch_image", lambda *a, **k: Image.new("RGB", (1, 1)))
    monkeypatch.setattr(ref.torch, "stack", lambda *a, **k: frames)
    monkeypatch.setattr(ref, "extract_slow_fast_frames", lambda *a, **k: types)
    monkeypatch.setattr(ref, "smart_nframes", lambda *a, **k: n)
    _, want = ref.fetch_video(dict(ele))
    monkeypatch.undo()
    got = video_frame_sizes(h, w, types.numpy(), ele)
    assert got == {k: want[k] for k in ("height", "width", "fast_height", "fast_width")}, (n, ele)


def test_budget_example_from_spec():
  sizes = video_frame_sizes(720, 1280, [0, 1, 1, 1], {})
  assert sizes == {"height": 560, "width": 1008, "fast_height": 308, "fast_width": 532}
