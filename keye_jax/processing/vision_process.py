"""Drop-in replacement for `keye_vl_utils` 1.5.2 (`smart_resize`, `fetch_image`, `fetch_video`,
`process_vision_info`): same message elements, same numbers, numpy instead of torch.

Differences on purpose: videos are read with PyAV (not decord) and `video_start` / `video_end` (seconds)
are honoured: the clip is then treated as the video, so its first frame has timestamp 0.0. Remote URLs are
not fetched. Bad input raises `MediaError` naming the source. A video too short to give one frame at the
sampling rate gives its first frame (the reference fails there).
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import io
import os

import numpy as np
from PIL import Image

from keye_jax.processing import slowfast, video_reader
from keye_jax.processing.errors import MediaError
from keye_jax.processing.sizing import (FPS, IMAGE_FACTOR, MAX_PIXELS, MIN_FRAME_SIMILARITY, MIN_PIXELS,
                                        VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS, checked_resize, sample_indices,
                                        smart_nframes, smart_resize, video_frame_sizes)

__all__ = ["smart_resize", "fetch_image", "fetch_video", "process_vision_info", "extract_vision_info"]

ELEMENT_KEYS = frozenset({
    "type", "image", "image_url", "video", "text", "min_pixels", "max_pixels", "fps", "max_frames",
    "video_total_pixels", "min_frame_similarity", "resized_height", "resized_width", "video_start",
    "video_end"})


def _source(ele: dict):
  return ele.get("image", ele.get("image_url", ele.get("video")))


def check_element(ele: dict) -> None:
  """MediaError for keys the reference does not know (a typo would otherwise be silently ignored)."""
  unknown = sorted(set(ele) - ELEMENT_KEYS)
  if unknown:
    raise MediaError(_source(ele), f"unknown element keys {unknown}; known: {sorted(ELEMENT_KEYS)}")


# --------------------------------------------------------------------------------------------------
# Images.


def load_image(image) -> Image.Image:
  """A PIL image, path, file:// URL, data:image base64 URL, bytes or (H, W, 3) uint8 array -> RGB image."""
  try:
    if isinstance(image, Image.Image):
      obj = image
    elif isinstance(image, np.ndarray):
      if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise MediaError(image, f"an image array must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
      obj = Image.fromarray(image)
    elif isinstance(image, (bytes, bytearray)):
      obj = Image.open(io.BytesIO(image))
    elif isinstance(image, str):
      if image.startswith(("http://", "https://")):
        raise MediaError(image, "remote images are not fetched; download the file first")
      if image.startswith("data:image"):
        if "base64," not in image:
          raise MediaError(image, "a data URL must be base64")
        obj = Image.open(io.BytesIO(base64.b64decode(image.split("base64,", 1)[1])))
      else:
        path = image[7:] if image.startswith("file://") else image
        if not os.path.exists(path):
          raise MediaError(image, "no such file")
        obj = Image.open(path)
    else:
      raise MediaError(image, "unrecognised image input: use a path, URL, bytes, PIL image or uint8 array")
    obj.load()                                   # decode errors surface here, as a MediaError
    # convert("RGB") of an RGB image is a plain copy; resizing makes a new image anyway, so skip it.
    return obj if obj.mode == "RGB" else obj.convert("RGB")
  except MediaError:
    raise
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise MediaError(image, f"not a readable image ({e})") from None


def fetch_image(ele: dict, size_factor: int = IMAGE_FACTOR, is_video: bool = False) -> Image.Image:
  """Load the element's image and resize it (Pillow's default BICUBIC) to its `smart_resize` size."""
  check_element(ele)
  source = ele["image"] if "image" in ele else ele["image_url"]
  image = load_image(source)
  if "resized_height" in ele and "resized_width" in ele:
    height, width = checked_resize(source, ele["resized_height"], ele["resized_width"], factor=size_factor)
  else:
    width, height = image.size
    lo, hi = (VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS) if is_video else (MIN_PIXELS, MAX_PIXELS)
    height, width = checked_resize(source, height, width, factor=size_factor,
                                   min_pixels=ele.get("min_pixels", lo), max_pixels=ele.get("max_pixels", hi))
  return image.resize((width, height))


# --------------------------------------------------------------------------------------------------
# Videos.


def _video_from_file(ele: dict):
  """(frames (T, 3, H, W) uint8, timestamps (T,) float32, frame types (T,) int32) of a video file."""
  source = ele["video"]
  info = video_reader.probe(source)
  times = info.times
  keep = np.ones(len(times), bool)
  if "video_start" in ele:
    keep &= times >= float(ele["video_start"])
  if "video_end" in ele:
    keep &= times <= float(ele["video_end"])
  if not keep.any():
    raise MediaError(source, f"no frame between video_start={ele.get('video_start')} and "
                             f"video_end={ele.get('video_end')} (video is {times[-1]:.3f} s)")
  pts, times = info.pts[keep], times[keep]
  nframes = max(1, smart_nframes(ele, len(pts), info.fps))
  idx = sample_indices(len(pts), nframes)
  timestamps = (times[idx] - times[0]).astype(np.float32)

  # Each decoded frame is converted and gets its classification features on a worker thread, and the
  # classification goes as far as the frames so far allow, while the decoder goes on.
  typer = slowfast.FrameTyper(len(idx), info.height, info.width,
                              ele.get("min_frame_similarity", MIN_FRAME_SIMILARITY))
  with concurrent.futures.ThreadPoolExecutor(slowfast.frame_threads()) as pool:
    frames = video_reader.read_frames(source, info, pts[idx], on_frame=typer.add, pool=pool)
  return frames, timestamps, typer.types()


def _video_from_list(ele: dict, image_factor: int):
  """The same for a list of frame images (each resized like an image with the video pixel bounds)."""
  items = ele["video"]
  if len(items) == 0:
    raise MediaError("<frame list>", "zero decodable frames: the frame list is empty")
  info = {k: v for k, v in ele.items() if k not in ("type", "video")}
  fps = ele.get("fps", None)
  if fps is not None and (not isinstance(fps, (int, float)) or isinstance(fps, bool) or fps <= 0):
    raise MediaError("<frame list>", f"fps must be a positive number, got {fps!r}")
  n = len(items)
  idx = sample_indices(n, max(1, smart_nframes(ele, n, ele.get("fps", FPS))))
  timestamps = (np.float64(1.0 / fps) * idx).astype(np.float32) if fps else None
  unique = np.unique(idx)

  def load(k):
    item = items[unique[k]]
    element = item if isinstance(item, dict) else {"image": item, **info}
    return fetch_image(element, size_factor=image_factor, is_video=True)

  # Each frame is loaded and resized (Pillow, without the GIL), split into planes straight into one
  # preallocated array and gets its classification features while it is still in cache; the classification
  # goes as far as the frames so far allow. Worker threads take frames one at a time, so a thread slowed
  # down by other load holds up at most one frame.
  first = load(0)
  width, height = first.size
  frames = np.empty((len(unique), 3, height, width), np.uint8)
  threshold = ele.get("min_frame_similarity", MIN_FRAME_SIMILARITY)
  typer = slowfast.FrameTyper(len(unique), height, width, threshold)

  def finish(k, image):
    if image.size != (width, height):
      raise MediaError("<frame list>", f"frames resize to different sizes {(width, height)} and {image.size}")
    for c, band in enumerate(image.split()):
      frames[k, c] = np.asarray(band)
    typer.add(k, frames[k])

  with concurrent.futures.ThreadPoolExecutor(slowfast.frame_threads()) as pool:
    running = [pool.submit(lambda k: finish(k, load(k)), k) for k in range(1, len(unique))]
    try:
      finish(0, first)
      for r in running:
        r.result()
    except BaseException:
      for r in running:
        r.cancel()
      raise
  if len(unique) == len(idx):
    return frames, timestamps, typer.types()
  pos = np.searchsorted(unique, idx)                  # repeated frames (fewer frames than samples)
  return frames[pos], timestamps, slowfast.classify(typer.hsv[pos], typer.sq_norms[pos], threshold)


def fetch_video(ele: dict, image_factor: int = IMAGE_FACTOR):
  """A video element -> (frames (T, 3, H, W) uint8, {"height", "width", "fast_height", "fast_width",
  "timestamps" (T,) float32 when known, "frame_types" (T,) int32 (0 slow, 1 fast)})."""
  check_element(ele)
  video = ele["video"]
  if isinstance(video, (str, bytes, bytearray)):
    frames, timestamps, types = _video_from_file(ele)
  elif isinstance(video, (list, tuple)):
    frames, timestamps, types = _video_from_list(ele, image_factor)
  else:
    raise MediaError(video, "a video must be a path, a file:// URL, bytes or a list of frames")
  kwargs = video_frame_sizes(frames.shape[2], frames.shape[3], types, ele)
  if timestamps is not None:
    kwargs["timestamps"] = timestamps
  kwargs["frame_types"] = types
  return frames, kwargs


# --------------------------------------------------------------------------------------------------
# Conversations.


def extract_vision_info(conversations) -> list[dict]:
  """Every image/video element of one conversation or a list of conversations, in order."""
  if isinstance(conversations[0], dict):
    conversations = [conversations]
  infos = []
  for conversation in conversations:
    for message in conversation:
      if isinstance(message["content"], list):
        for ele in message["content"]:
          if ("image" in ele or "image_url" in ele or "video" in ele
              or ele.get("type") in ("image", "image_url", "video")):
            infos.append(ele)
  return infos


def process_vision_info(conversations=None, vision_infos=None, image_factor: int = IMAGE_FACTOR):
  """-> (images: list of PIL images or None, videos: list of (T, 3, H, W) uint8 arrays or None,
  processor_kwargs: {key: [one value per video]})."""
  if conversations is None and vision_infos is None:
    raise ValueError("process_vision_info needs conversations or vision_infos")
  if vision_infos is None:
    vision_infos = extract_vision_info(conversations)
  images, videos = [], []
  kwargs = collections.defaultdict(list)
  for info in vision_infos:
    if "image" in info or "image_url" in info:
      images.append(fetch_image(info, image_factor))
    elif "video" in info:
      frames, video_kwargs = fetch_video(info, image_factor)
      videos.append(frames)
      for k, v in video_kwargs.items():
        kwargs[k].append(v)
    else:
      raise MediaError(info, "an element needs an image, image_url or video")
  return images or None, videos or None, kwargs
