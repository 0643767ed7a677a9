"""Bad input raises MediaError naming the source and the reason."""

import av
import numpy as np
import pytest
from PIL import Image

from keye_jax.processing import MediaError, fetch_image, fetch_video
from tests.processing.media import scene_frames, write_video


def test_unreadable_and_missing_images(tmp_path):
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"\x89PNG not really" + bytes(range(200)))
  with pytest.raises(MediaError, match="bad.png.*not a readable image"):
    fetch_image({"image": str(bad)})
  with pytest.raises(MediaError, match="missing.jpg.*no such file"):
    fetch_image({"image": str(tmp_path / "missing.jpg")})
  with pytest.raises(MediaError, match="remote"):
    fetch_image({"image": "https://example.com/a.png"})


def test_aspect_ratio_over_200(tmp_path):
  path = tmp_path / "strip.png"
  Image.new("RGB", (403, 2)).save(path)
  with pytest.raises(MediaError, match="strip.png.*aspect ratio"):
    fetch_image({"image": str(path)})


def test_unknown_element_keys(tmp_path):
  path = tmp_path / "a.png"
  Image.new("RGB", (64, 64)).save(path)
  with pytest.raises(MediaError, match=r"a.png.*unknown element keys \['max_pixel'\]"):
    fetch_image({"image": str(path), "max_pixel": 1000})
  with pytest.raises(MediaError, match="unknown element keys"):
    fetch_video({"video": str(path), "frame_rate": 2})


def test_corrupt_truncated_and_empty_videos(tmp_path):
  junk = tmp_path / "junk.mp4"
  junk.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
  with pytest.raises(MediaError, match="junk.mp4.*not a readable video"):
    fetch_video({"video": str(junk)})
  good = write_video(str(tmp_path / "good.mp4"), scene_frames("cuts", 20, 64, 64))
  cut = tmp_path / "cut.mp4"
  cut.write_bytes(open(good, "rb").read()[:1500])
  with pytest.raises(MediaError, match="cut.mp4"):
    fetch_video({"video": str(cut)})
  empty = tmp_path / "empty.mp4"
  with av.open(str(empty), "w") as c:
    s = c.add_stream("libx264", rate=10)
    s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
  with pytest.raises(MediaError, match="empty.mp4"):
    fetch_video({"video": str(empty)})
  with pytest.raises(MediaError, match="no such file"):
    fetch_video({"video": str(tmp_path / "nope.mp4")})
  with pytest.raises(MediaError, match="video_start"):
    fetch_video({"video": good, "video_start": 100.0})


def test_frame_lists(tmp_path):
  with pytest.raises(MediaError, match="empty"):
    fetch_video({"video": []})
  with pytest.raises(MediaError, match="different sizes"):
    fetch_video({"video": [Image.new("RGB", (300, 200)), Image.new("RGB", (200, 300))]})
  with pytest.raises(MediaError, match="fps"):
    fetch_video({"video": [Image.new("RGB", (300, 200))], "fps": -1})


def test_damaged_middle_still_gives_every_sampled_frame(tmp_path):
  path = write_video(str(tmp_path / "ok.mp4"), scene_frames("cuts", 40, 64, 96), fps=10)
  data = bytearray(open(path, "rb").read())
  rng = np.random.default_rng(0)
  for off in range(len(data) // 3, len(data) // 3 + 400, 7):
    data[off] = int(rng.integers(0, 256))
  damaged = tmp_path / "damaged.mp4"
  damaged.write_bytes(bytes(data))
  frames, kw = fetch_video({"video": str(damaged), "fps": 10})
  assert frames.shape == (40, 3, 64, 96) and len(kw["frame_types"]) == 40
