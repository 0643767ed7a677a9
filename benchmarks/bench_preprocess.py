"""Video preprocessing speed: ours (numpy + PyAV) against keye_vl_utils 1.5.2 (decord + torch + OpenCV).

  .venv/bin/python benchmarks/bench_preprocess.py [--repeats 3] [--workdir /tmp/keye_bench]

In one run, on the same inputs (a 20 s 720p H.264 clip made here, cached in --workdir):
  file   fetch_video on the clip (decode -> sample at 2 fps -> slow/fast -> sizes), and a bare PyAV decode
         of every frame of the clip (the usual floor: every frame must pass the decoder)
  list   fetch_video on 120 already-decoded 720p frames (PIL images) -> resized frames, types, sizes
  types  the slow/fast classification alone on the 40 sampled 720p frames
Each figure is the best of --repeats runs, ours and the reference interleaved. Results are checked to be
equal. Printed, never asserted; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import av  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from keye_jax.processing import fetch_video  # noqa: E402
from keye_jax.processing.slowfast import extract_slow_fast_frames  # noqa: E402
from tests.processing.media import load_reference  # noqa: E402


def make_clip(path: str, seconds: int = 20, fps: int = 30, h: int = 720, w: int = 1280) -> str:
  """Panning textured shots with a cut every 3 s and some noise, so the encoder spends real bits."""
  if os.path.exists(path):
    return path
  rng = np.random.default_rng(0)
  tmp = path + ".part"
  with av.open(tmp, "w", format="mp4") as c:
    s = c.add_stream("libx264", rate=fps)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    s.options = {"preset": "fast", "crf": "23"}
    scenes = [rng.integers(0, 256, (h // 16 + 1, (w * 2) // 16 + 1, 3), dtype=np.uint8) for _ in range(8)]
    scenes = [x.repeat(16, 0).repeat(16, 1)[:h, :w * 2] for x in scenes]
    for i in range(seconds * fps):
      base = scenes[(i // (3 * fps)) % len(scenes)]
      x = (i % (3 * fps)) * 4
      f = base[:, x:x + w].astype(np.int16) + rng.integers(-6, 7, (h, w, 1), dtype=np.int16)
      frame = av.VideoFrame.from_ndarray(np.clip(f, 0, 255).astype(np.uint8), format="rgb24")
      for p in s.encode(frame):
        c.mux(p)
    for p in s.encode():
      c.mux(p)
  os.replace(tmp, path)
  return path


def bare_decode(path: str) -> int:
  with av.open(path) as c:
    stream = c.streams.video[0]
    stream.thread_type = "AUTO" if (os.cpu_count() or 1) > 2 else "NONE"
    return sum(1 for _ in c.decode(stream))


def best(fns: dict, repeats: int) -> dict:
  """Best wall time of each function, runs interleaved so load changes hit all alike."""
  times = {k: [] for k in fns}
  out = {}
  for _ in range(repeats):
    for k, f in fns.items():
      t = time.perf_counter()
      out[k] = f()
      times[k].append(time.perf_counter() - t)
  return {k: min(v) for k, v in times.items()}, out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--workdir", default="/tmp/keye_bench")
  args = ap.parse_args()
  os.makedirs(args.workdir, exist_ok=True)
  ref = load_reference()
  import torch
  print(f"machine: {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}", file=sys.stderr)
  t = time.perf_counter()
  clip = make_clip(os.path.join(args.workdir, "clip_20s_720p.mp4"))
  print(f"clip ready ({time.perf_counter() - t:.1f} s): {clip}", file=sys.stderr)

  # file path
  t_file, out = best({"ours": lambda: fetch_video({"video": clip}),
                      "reference": lambda: ref.fetch_video({"video": clip}),
                      "bare_decode": lambda: bare_decode(clip)}, args.repeats)
  (f_ours, k_ours), (f_ref, k_ref) = out["ours"], out["reference"]
  same_file = (np.array_equal(f_ours, f_ref.numpy())
               and np.array_equal(k_ours["frame_types"], k_ref["frame_types"].numpy())
               and np.array_equal(k_ours["timestamps"], k_ref["timestamps"].numpy())
               and all(k_ours[k] == k_ref[k] for k in ("height", "width", "fast_height", "fast_width")))

  # frame list path: 120 decoded 720p frames as PIL images
  with av.open(clip) as c:
    images = [f.to_image() for _, f in zip(range(120), c.decode(video=0))]
  t_list, out = best({"ours": lambda: fetch_video({"video": images}),
                      "reference": lambda: ref.fetch_video({"video": images})}, args.repeats)
  (l_ours, lk_ours), (l_ref, lk_ref) = out["ours"], out["reference"]
  same_list = (np.array_equal(l_ours, l_ref.numpy())
               and np.array_equal(lk_ours["frame_types"], lk_ref["frame_types"].numpy()))
  t_resize, _ = best({"pillow_bicubic_only": lambda: [im.resize((1008, 560)) for im in images]}, args.repeats)

  # classification alone on the sampled frames
  frames_t = f_ref
  frames_np = np.ascontiguousarray(f_ours)
  t_cls, out = best({"ours": lambda: extract_slow_fast_frames(frames_np),
                     "reference": lambda: ref.extract_slow_fast_frames(frames_t)}, args.repeats)
  same_cls = np.array_equal(out["ours"], out["reference"].numpy())

  rows = [
      ("file: fetch_video, 20 s 720p clip", t_file["reference"], t_file["ours"]),
      ("file: bare PyAV decode, all frames", None, t_file["bare_decode"]),
      ("list: fetch_video, 120 720p frames", t_list["reference"], t_list["ours"]),
      ("list: Pillow bicubic resize alone", None, t_resize["pillow_bicubic_only"]),
      ("types: slow/fast on 40 720p frames", t_cls["reference"], t_cls["ours"]),
  ]
  print(f"{'':40s} {'reference s':>12s} {'ours s':>8s} {'speed-up':>9s}")
  for name, r, o in rows:
    print(f"{name:40s} {r if r is not None else float('nan'):12.3f} {o:8.3f} "
          f"{(r / o if r is not None else float('nan')):8.2f}x")
  print(f"file: {len(k_ours['frame_types'])} frames sampled, {int((k_ours['frame_types'] == 0).sum())} slow; "
        f"ours / bare decode = {t_file['ours'] / t_file['bare_decode']:.2f}")
  print(f"identical results: file {same_file}, list {same_list}, types {same_cls}")
  print(json.dumps({
      "file_speedup": round(t_file["reference"] / t_file["ours"], 2),
      "file_ours_s": round(t_file["ours"], 3), "file_reference_s": round(t_file["reference"], 3),
      "bare_decode_s": round(t_file["bare_decode"], 3),
      "list_speedup": round(t_list["reference"] / t_list["ours"], 2),
      "list_ours_s": round(t_list["ours"], 3), "list_reference_s": round(t_list["reference"], 3),
      "classify_speedup": round(t_cls["reference"] / t_cls["ours"], 2),
      "identical": bool(same_file and same_list and same_cls)}))


if __name__ == "__main__":
  main()
