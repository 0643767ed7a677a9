"""Video files -> sampled RGB frames with PyAV, streaming: only the sampled frames are ever kept.

1. `probe` demuxes the video stream without decoding: every frame's presentation timestamp, so the frame
   count and each frame's time come from the container itself (variable frame rates included).
2. The caller picks frame indices (in presentation order).
3. `read_frames` decodes once from the nearest key frame before the first wanted frame, asks the decoder to
   skip non-reference frames it will not return (they are needed by nobody), converts only wanted frames
   to planar RGB straight into the output array, on worker threads that go on to the caller's per-frame
   work while the decoding thread goes on decoding.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os
import threading
from fractions import Fraction
from typing import Callable, Iterator

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from keye_jax.processing import buffer_pool
from keye_jax.processing.errors import MediaError


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  """What the container says about the video stream."""

  pts: np.ndarray          # (n,) int64 presentation timestamps of every frame, sorted
  time_base: Fraction      # seconds per pts unit
  fps: float               # the stream's average frame rate
  height: int
  width: int

  @property
  def times(self) -> np.ndarray:
    """(n,) float64 seconds of every frame from the first one (each one correctly rounded division)."""
    ticks = (self.pts - self.pts[0]) * self.time_base.numerator
    return ticks.astype(np.float64) / float(self.time_base.denominator)


def _open(source):
  """An av container for a path, `file://` URL or bytes; MediaError when it is not a readable video."""
  if isinstance(source, (bytes, bytearray)):
    target = io.BytesIO(source)
  elif isinstance(source, str):
    target = source[7:] if source.startswith("file://") else source
    if target.startswith(("http://", "https://")):
      raise MediaError(source, "remote videos are not fetched; download the file first")
    if not os.path.exists(target):
      raise MediaError(source, "no such file")
  else:
    raise MediaError(source, "a video must be a path, a file:// URL, bytes or a list of frames")
  try:
    container = av.open(target)
  except (av.FFmpegError, OSError, ValueError) as e:
    raise MediaError(source, f"not a readable video ({e})") from None
  if not container.streams.video:
    container.close()
    raise MediaError(source, "no video stream")
  return container


def probe(source) -> VideoInfo:
  """Timestamps of every frame from the demuxer (no decoding)."""
  container = _open(source)
  try:
    stream = container.streams.video[0]
    pts = []
    for packet in container.demux(stream):
      if packet.size and packet.pts is not None:
        pts.append(packet.pts)
    ctx = stream.codec_context
    height, width = ctx.height, ctx.width
    rate = stream.average_rate or stream.guessed_rate
    time_base = stream.time_base
  except av.FFmpegError as e:
    raise MediaError(source, f"corrupt video ({e})") from None
  finally:
    container.close()
  if not pts:
    raise MediaError(source, "zero decodable frames")
  if not height or not width:
    raise MediaError(source, "video stream without a frame size")
  pts = np.unique(np.asarray(pts, np.int64))
  if rate:
    fps = float(rate)
  else:                                   # no declared rate: frames over their time span
    span = float((int(pts[-1]) - int(pts[0])) * time_base)
    fps = (len(pts) - 1) / span if span > 0 else 1.0
  return VideoInfo(pts=pts, time_base=Fraction(time_base), fps=fps, height=height, width=width)


def _copy_planes(g: av.VideoFrame, out: np.ndarray) -> None:
  """A gbrp frame -> `out` (3, H, W) uint8 RGB planes."""
  for channel, plane in zip((1, 2, 0), g.planes):      # gbrp stores G, B, R
    out[channel] = np.frombuffer(plane, np.uint8).reshape(g.height, plane.line_size)[:, :g.width]


def read_frames(source, info: VideoInfo, wanted_pts: np.ndarray,
                on_frame: Callable[[int, np.ndarray], None] | None = None,
                pool: concurrent.futures.Executor | None = None) -> np.ndarray:
  """Decode the frames with presentation timestamps `wanted_pts` (sorted, may repeat) -> (m, 3, H, W) uint8.

  Each wanted frame is converted to RGB and `on_frame(k, frames[k])` called for every k that shows it, as
  one task on `pool` when given (so the decoding thread only decodes, and the frame is still in cache for
  the caller's work), else on the calling thread. A wanted frame the decoder cannot produce is replaced by
  the nearest earlier decoded frame (`on_frame` then runs on the calling thread); none at all is a
  MediaError.
  """
  wanted_pts = np.asarray(wanted_pts, np.int64)
  unique = np.unique(wanted_pts)
  frames = buffer_pool.empty((len(wanted_pts), 3, info.height, info.width), np.uint8)
  got = np.zeros(len(unique), bool)
  out_of = np.searchsorted(unique, wanted_pts)         # wanted index -> unique index
  users = [np.flatnonzero(out_of == u) for u in range(len(unique))]
  # One colour converter per thread for all its frames (a frame's own would set swscale up again each time).
  local = threading.local()

  def finish(u, frame):
    if not hasattr(local, "rgb"):
      local.rgb = VideoReformatter()
    # gbrp: swscale's planar GBR, the same pixels as rgb24, copied plane by plane with no interleaving.
    _copy_planes(local.rgb.reformat(frame, format="gbrp", threads=1), frames[users[u][0]])
    for k in users[u]:
      if k != users[u][0]:
        frames[k] = frames[users[u][0]]
      if on_frame:
        on_frame(int(k), frames[k])

  tasks = []
  try:
    for u, frame in _decode(source, info, unique):
      if (frame.height, frame.width) != frames.shape[2:]:
        raise MediaError(source, f"frame size changes inside the video: {(frame.height, frame.width)} after "
                                 f"{frames.shape[2:]}")
      got[u] = True
      if pool is None:
        finish(u, frame)
      else:
        tasks.append(pool.submit(finish, u, frame))
  finally:
    for t in tasks:                                    # wait for every task (and raise the first error)
      t.result()
  if not got.any():
    raise MediaError(source, "zero decodable frames")
  for u in np.flatnonzero(~got):                       # undecodable: nearest earlier (else later) frame
    src = np.flatnonzero(got[:u])
    src = src[-1] if len(src) else np.flatnonzero(got)[0]
    frames[users[u]] = frames[users[src][0]]
    if on_frame:
      for k in users[u]:
        on_frame(int(k), frames[k])
  return frames


def _decode(source, info: VideoInfo, unique: np.ndarray) -> Iterator[tuple[int, av.VideoFrame]]:
  """(index into `unique`, decoded frame) of the wanted frames in presentation order."""
  container = _open(source)
  try:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"                        # FFmpeg threads, one per core, as decord uses
    ctx = stream.codec_context
    if unique[0] > info.pts[0]:
      container.seek(int(unique[0]), stream=stream, backward=True, any_frame=False)
    want = {int(p): u for u, p in enumerate(unique)}
    for packet in container.demux(stream):
      if packet.pts is not None:
        # Non-reference frames nobody asked for are not decoded at all.
        ctx.skip_frame = "DEFAULT" if packet.pts in want else "NONREF"
      try:
        decoded = ctx.decode(packet)
      except av.InvalidDataError:                      # a damaged packet: its frame is replaced later
        continue
      for frame in decoded:
        u = want.pop(frame.pts, None)
        if u is not None:
          yield u, frame
      if not want:
        break
  except av.FFmpegError as e:
    raise MediaError(source, f"corrupt video ({e})") from None
  finally:
    container.close()
