"""Videos made here with PyAV, read by us and by keye_vl_utils: same frames, frame types, timestamps, sizes."""

import numpy as np
import pytest
import torch
from PIL import Image

from keye_jax.processing import Processor, fetch_video, process_vision_info, slowfast, video_reader
from tests.processing.media import scene_frames, write_clip, write_video

# (kind, height, width, frames, fps, element extras)
CLIPS = [
    ("static", 64, 112, 24, 10, {"fps": 10}),
    ("cuts", 112, 64, 42, 12, {"fps": 6}),                # portrait
    ("pan", 90, 161, 30, 12, {"fps": 12}),                # odd size, 4:4:4
    ("fade", 72, 128, 25, 8, {"fps": 8}),
    ("black", 64, 64, 24, 10, {"fps": 10}),
    ("noise", 48, 80, 20, 10, {}),                        # default 2 fps
    ("mixed", 120, 90, 40, 25, {"fps": 25, "max_frames": 17}),
]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
  d = tmp_path_factory.mktemp("clips")
  out = {}
  for i, (kind, h, w, n, fps, extra) in enumerate(CLIPS):
    frames = scene_frames(kind, n, h, w, seed=i)
    out[kind] = (write_video(str(d / f"{kind}.mp4"), frames, fps), frames, extra)
  return out


def _same_result(ours, theirs):
  frames, kw = ours
  ref_frames, ref_kw = theirs
  np.testing.assert_array_equal(frames, ref_frames.numpy())
  for key in ("height", "width", "fast_height", "fast_width"):
    assert kw[key] == ref_kw[key], key
  np.testing.assert_array_equal(kw["frame_types"], ref_kw["frame_types"].numpy())
  if "timestamps" in ref_kw:
    assert kw["timestamps"].dtype == np.float32
    np.testing.assert_array_equal(kw["timestamps"], ref_kw["timestamps"].numpy())
  else:
    assert "timestamps" not in kw


def test_decord_is_installed():
  """The reference reads video files with decord, a test requirement: missing, the file tests must fail."""
  import decord  # noqa: F401


@pytest.mark.parametrize("kind", [c[0] for c in CLIPS])
def test_video_file_matches_reference(ref, clips, kind):
  path, _, extra = clips[kind]
  ours = fetch_video({"video": path, **extra})
  _same_result(ours, ref.fetch_video({"video": path, **extra}))
  types = ours[1]["frame_types"]
  if kind == "static":
    assert types.tolist() == [0] + [1] * (len(types) - 1)
  if kind in ("cuts", "pan"):                           # the clips exercise both kinds of frame
    assert (types == 0).sum() >= 3 and (types == 1).sum() >= 3


def test_video_bytes_and_file_url_match_path(clips):
  path, _, extra = clips["cuts"]
  a = fetch_video({"video": path, **extra})
  for source in (open(path, "rb").read(), "file://" + path):
    b = fetch_video({"video": source, **extra})
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1]["frame_types"], b[1]["frame_types"])


@pytest.mark.parametrize("kind", ["cuts", "pan", "black"])
def test_frame_list_matches_reference(ref, clips, kind):
  _, frames, extra = clips[kind]
  images = [Image.fromarray(f) for f in frames]
  for ele in ({"video": images, **extra}, {"video": images, "min_pixels": 50_000}):
    _same_result(fetch_video(dict(ele)), ref.fetch_video(dict(ele)))


def test_resized_frames_equal_torch_resize_of_reference_frames(ref, clips):
  """The model-side resize of slow and fast frames, on real decoded content."""
  path, _, extra = clips["mixed"]
  ref_frames, kw = ref.fetch_video({"video": [Image.fromarray(f) for f in clips["mixed"][1]], **extra})
  kw = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
  pv, grids = Processor().video(ref_frames.numpy(), **kw)
  start = 0
  for i, t in enumerate(kw["frame_types"]):
    size = [kw["height"], kw["width"]] if t == 0 else [kw["fast_height"], kw["fast_width"]]
    want = torch.nn.functional.interpolate(ref_frames[i:i + 1], size, mode="bilinear", antialias=True)[0].numpy()
    n = want.shape[1] * want.shape[2] // 196
    got = pv[start:start + n].reshape(size[0] // 14, size[1] // 14, 3, 14, 14).transpose(2, 0, 3, 1, 4)
    np.testing.assert_array_equal(np.rint((got.reshape(want.shape) + 1) * 127.5), want)
    start += n


def test_video_start_and_end_are_honoured(clips):
  path, frames, _ = clips["mixed"]                      # 40 frames at 25 fps
  _, kw = fetch_video({"video": path, "fps": 25, "video_start": 0.4, "video_end": 1.2})
  ts = kw["timestamps"]
  assert len(ts) == int(21 / 25 * 25) and ts[0] == 0.0   # frames 10..30 inclusive, clip time from 0
  np.testing.assert_allclose(np.diff(ts), 0.04, atol=1e-6)


def test_process_vision_info_matches_reference(ref, clips, tmp_path):
  img = tmp_path / "a.png"
  Image.fromarray(clips["pan"][1][0]).save(img)
  frames = [Image.fromarray(f) for f in clips["cuts"][1]]
  conv = [{"role": "user", "content": [{"type": "image", "image": str(img)}, {"type": "text", "text": "hi"},
                                       {"type": "video", "video": frames, "fps": 4}]}]
  images, videos, kw = process_vision_info(conv)
  r_images, r_videos, r_kw = ref.process_vision_info(conv)
  np.testing.assert_array_equal(np.asarray(images[0]), np.asarray(r_images[0]))
  np.testing.assert_array_equal(videos[0], r_videos[0].numpy())
  assert sorted(kw) == sorted(r_kw)
  np.testing.assert_array_equal(kw["frame_types"][0], r_kw["frame_types"][0].numpy())


@pytest.fixture(scope="module")
def panning(tmp_path_factory):
  """Small versions of the benchmark's clips (preset fast: B-frames, so non-reference frames are skipped)."""
  d = tmp_path_factory.mktemp("panning")
  return {kind: write_clip(str(d / f"{kind}.mp4"), kind, seconds=4, fps=15, h=144, w=256, seed=3)
          for kind in ("heavy", "cheap")}


@pytest.mark.parametrize("kind", ["heavy", "cheap"])
@pytest.mark.parametrize("extra", [{}, {"fps": 15}, {"fps": 4, "min_frame_similarity": 0.5}])
def test_panning_clips_match_reference(ref, panning, kind, extra):
  """The decode path (non-reference frames skipped, conversion and features on worker threads) on a
  decode-heavy and a cheap clip: frames, types, timestamps and sizes equal the reference's."""
  ours = fetch_video({"video": panning[kind], **extra})
  _same_result(ours, ref.fetch_video({"video": panning[kind], **extra}))
  if extra.get("fps") == 15:                            # every frame sampled: scene cuts give slow frames
    assert (ours[1]["frame_types"] == 0).sum() >= 2


def test_read_frames_same_with_and_without_pool(panning):
  """Frames and the frames handed to on_frame are the same on worker threads as on the calling thread,
  repeated timestamps included."""
  import concurrent.futures
  path = panning["heavy"]
  info = video_reader.probe(path)
  wanted = info.pts[[0, 3, 3, 10, 31, 59, 59]]
  seen = {}
  plain = video_reader.read_frames(path, info, wanted, on_frame=lambda k, f: seen.setdefault(("plain", k), f.copy()))
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    pooled = video_reader.read_frames(path, info, wanted, pool=pool,
                                      on_frame=lambda k, f: seen.setdefault(("pool", k), f.copy()))
  np.testing.assert_array_equal(plain, pooled)
  np.testing.assert_array_equal(plain[1], plain[2])
  for k in range(len(wanted)):
    np.testing.assert_array_equal(seen[("plain", k)], plain[k])
    np.testing.assert_array_equal(seen[("pool", k)], plain[k])


def test_frame_typer_any_order_equals_classify(ref):
  """Frames added out of order, from several threads, give the reference's types."""
  import concurrent.futures
  frames = np.stack(scene_frames("mixed", 24, 60, 100, seed=5) + scene_frames("cuts", 16, 60, 100, seed=6))
  frames = np.ascontiguousarray(frames.transpose(0, 3, 1, 2))
  want = ref.extract_slow_fast_frames(torch.from_numpy(frames)).numpy()
  order = np.random.default_rng(0).permutation(len(frames))
  typer = slowfast.FrameTyper(len(frames), 60, 100)
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    for f in [pool.submit(typer.add, int(k), frames[k]) for k in order]:
      f.result()
  np.testing.assert_array_equal(typer.types(), want)
  np.testing.assert_array_equal(slowfast.extract_slow_fast_frames(frames), want)
  assert (want == 0).sum() >= 3
