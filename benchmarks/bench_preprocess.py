"""Video preprocessing speed: ours (numpy + PyAV) against keye_vl_utils 1.5.2 (decord + torch + OpenCV).

  .venv/bin/python benchmarks/bench_preprocess.py [--repeats 3] [--workdir /tmp/keye_bench]

In one run, on the same inputs (a 20 s 720p H.264 clip made here, cached in --workdir):
  file   fetch_video on the clip (decode -> sample at 2 fps -> slow/fast -> sizes), and a bare PyAV decode
         of every frame of the clip (the usual floor: every frame must pass the decoder)
  list   fetch_video on 120 already-decoded 720p frames (PIL images) -> resized frames, types, sizes
  types  the slow/fast classification alone on the 40 sampled 720p frames
Each figure is the best of --repeats runs, ours and the reference interleaved, as wall time and as the
process's CPU time (all threads; steadier on a shared machine). Results are checked to be equal.
Printed, never asserted; the last line is JSON.
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

from keye_jax.processing import fetch_video  # noqa: E402
from keye_jax.processing.slowfast import extract_slow_fast_frames  # noqa: E402
from tests.processing.media import _gray, _vivid, load_reference  # noqa: E402


def make_clip(path: str, seconds: int = 20, fps: int = 30, h: int = 720, w: int = 1280) -> str:
  """Panning shots, gray and vivid in turn, cut every 3 s, with noise so the encoder spends real bits."""
  if os.path.exists(path):
    return path
  rng = np.random.default_rng(0)
  tmp = path + ".part"
  with av.open(tmp, "w", format="mp4") as c:
    s = c.add_stream("libx264", rate=fps)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    s.options = {"preset": "fast", "crf": "23"}
    scenes = [(_gray if k % 2 else _vivid)(rng, h, w * 2, block=16) for k in range(8)]
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
    stream.thread_type = "AUTO"
    return sum(1 for _ in c.decode(stream))


def best(fns: dict, repeats: int):
  """Best wall time of each function (runs interleaved so load changes hit all alike), the process CPU
  time (all threads) of that run, and the last outputs."""
  runs = {k: [] for k in fns}
  out = {}
  for _ in range(repeats):
    for k, f in fns.items():
      t, c = time.perf_counter(), time.process_time()
      out[k] = f()
      runs[k].append((time.perf_counter() - t, time.process_time() - c))
  return {k: min(v) for k, v in runs.items()}, out


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
  clip = make_clip(os.path.join(args.workdir, "clip_20s_720p_cuts.mp4"))
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
  nan = (float("nan"), float("nan"))
  print(f"{'':38s} {'reference s':>18s} {'ours s':>14s} {'speed-up':>16s}")
  print(f"{'':38s} {'wall':>9s} {'cpu':>8s} {'wall':>7s} {'cpu':>6s} {'wall':>8s} {'cpu':>7s}")
  for name, r, o in rows:
    r = r or nan
    print(f"{name:38s} {r[0]:9.3f} {r[1]:8.3f} {o[0]:7.3f} {o[1]:6.3f} {r[0] / o[0]:7.2f}x {r[1] / o[1]:6.2f}x")
  print(f"file: {len(k_ours['frame_types'])} frames sampled, {int((k_ours['frame_types'] == 0).sum())} slow; "
        f"ours / bare decode = {t_file['ours'][0] / t_file['bare_decode'][0]:.2f} (wall)")
  print(f"list: ours / Pillow resize alone (which both sides do, the floor) = "
        f"{t_list['ours'][1] / t_resize['pillow_bicubic_only'][1]:.2f} (cpu); the reference spends "
        f"{t_list['reference'][1] / t_resize['pillow_bicubic_only'][1]:.2f}x that resize's cpu")
  print(f"identical results: file {same_file}, list {same_list}, types {same_cls}")
  print(json.dumps({
      "file_speedup": round(t_file["reference"][0] / t_file["ours"][0], 2),
      "file_cpu_speedup": round(t_file["reference"][1] / t_file["ours"][1], 2),
      "file_ours_s": round(t_file["ours"][0], 3), "file_reference_s": round(t_file["reference"][0], 3),
      "bare_decode_s": round(t_file["bare_decode"][0], 3),
      "list_speedup": round(t_list["reference"][0] / t_list["ours"][0], 2),
      "list_cpu_speedup": round(t_list["reference"][1] / t_list["ours"][1], 2),
      "list_ours_s": round(t_list["ours"][0], 3), "list_reference_s": round(t_list["reference"][0], 3),
      "pillow_resize_cpu_s": round(t_resize["pillow_bicubic_only"][1], 3),
      "classify_speedup": round(t_cls["reference"][0] / t_cls["ours"][0], 2),
      "identical": bool(same_file and same_list and same_cls)}))


if __name__ == "__main__":
  main()
