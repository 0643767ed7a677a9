"""Video preprocessing speed: ours (numpy + PyAV) against keye_vl_utils 1.5.2 (decord + torch + OpenCV) and
against the decode floor, all measured in the same run, interleaved.

  .venv/bin/python benchmarks/bench_preprocess.py [--rounds 5] [--seconds 20] [--workdir /tmp/keye_bench]

Inputs are made here with PyAV and cached in --workdir (tests/processing/media.write_clip):
  cheap  20 s 720p H.264, large flat blocks panning, no noise: cheap to decode, so all other work shows
  heavy  20 s 720p H.264, small blocks with fresh noise on every frame at crf 21: the decoder dominates
Rows:
  file   fetch_video on the clip (decode -> sample at 2 fps -> slow/fast -> sizes), the reference's, and a
         bare PyAV decode of every frame of the clip with the same thread settings (thread_type AUTO)
  list   fetch_video on 120 already-decoded 720p frames (PIL images) -> resized frames, types, sizes
  types  the slow/fast classification alone on the cheap clip's 40 sampled 720p frames
Each figure is the median of --rounds rounds; within a round every side runs once, in turn, so load changes
hit all alike. Wall time and the process's CPU time (all threads; steadier on a shared machine). Outputs
are checked to be identical (frames, frame types, timestamps, sizes). Printed, never asserted; the last line
is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import av  # noqa: E402
import numpy as np  # noqa: E402

from keye_jax.processing import fetch_video  # noqa: E402
from keye_jax.processing.slowfast import extract_slow_fast_frames  # noqa: E402
from tests.processing.media import load_reference, write_clip  # noqa: E402


def bare_decode(path: str) -> int:
  """Every frame through the decoder, nothing else: the floor of any reader that has to decode."""
  with av.open(path) as c:
    stream = c.streams.video[0]
    stream.thread_type = "AUTO"
    return sum(1 for _ in c.decode(stream))


def interleaved(fns: dict, rounds: int):
  """Median wall and CPU seconds of each function over `rounds` rounds (each round runs every function once,
  in turn), and the last outputs."""
  runs = {k: [] for k in fns}
  out = {}
  for _ in range(rounds):
    for k, f in fns.items():
      t, c = time.perf_counter(), time.process_time()
      out[k] = f()
      runs[k].append((time.perf_counter() - t, time.process_time() - c))
  med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in runs.items()}
  return med, out


def same_video(ours, theirs) -> bool:
  (f, kw), (rf, rkw) = ours, theirs
  return (np.array_equal(f, rf.numpy()) and np.array_equal(kw["frame_types"], rkw["frame_types"].numpy())
          and (("timestamps" in kw) == ("timestamps" in rkw))
          and ("timestamps" not in kw or (kw["timestamps"].dtype == np.float32
                                          and np.array_equal(kw["timestamps"], rkw["timestamps"].numpy())))
          and all(kw[k] == rkw[k] for k in ("height", "width", "fast_height", "fast_width")))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--seconds", type=float, default=20)
  ap.add_argument("--workdir", default="/tmp/keye_bench")
  args = ap.parse_args()
  os.makedirs(args.workdir, exist_ok=True)
  ref = load_reference()
  import torch
  print(f"machine: {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f}, torch threads "
        f"{torch.get_num_threads()}", file=sys.stderr)
  clips = {}
  for kind in ("cheap", "heavy"):
    t = time.perf_counter()
    clips[kind] = write_clip(os.path.join(args.workdir, f"{kind}_{args.seconds:g}s_720p.mp4"), kind, args.seconds)
    print(f"{kind} clip ready ({time.perf_counter() - t:.1f} s): {clips[kind]} "
          f"({os.path.getsize(clips[kind]) * 8 / args.seconds / 1e6:.1f} Mbit/s)", file=sys.stderr)

  rows, result, identical = [], {}, {}
  for kind, clip in clips.items():
    t, out = interleaved({"ours": lambda: fetch_video({"video": clip}),
                          "reference": lambda: ref.fetch_video({"video": clip}),
                          "bare": lambda: bare_decode(clip)}, args.rounds)
    identical[f"file_{kind}"] = same_video(out["ours"], out["reference"])
    rows.append((f"file {kind}: fetch_video", t["reference"], t["ours"], t["bare"]))
    types = out["ours"][1]["frame_types"]
    print(f"file {kind}: {len(types)} frames sampled, {int((types == 0).sum())} slow", file=sys.stderr)
    result[f"file_{kind}"] = {
        "ours_over_bare_wall": round(t["ours"][0] / t["bare"][0], 3),
        "ours_over_bare_cpu": round(t["ours"][1] / t["bare"][1], 3),
        "speedup_wall": round(t["reference"][0] / t["ours"][0], 2),
        "speedup_cpu": round(t["reference"][1] / t["ours"][1], 2),
        "ours_s": [round(v, 3) for v in t["ours"]], "reference_s": [round(v, 3) for v in t["reference"]],
        "bare_s": [round(v, 3) for v in t["bare"]]}
    if kind == "cheap":
      sampled = out["ours"][0]

  # frame list path: 120 decoded 720p frames as PIL images
  with av.open(clips["cheap"]) as c:
    images = [f.to_image() for _, f in zip(range(120), c.decode(video=0))]
  t, out = interleaved({"ours": lambda: fetch_video({"video": images}),
                        "reference": lambda: ref.fetch_video({"video": images})}, args.rounds)
  identical["list"] = same_video(out["ours"], out["reference"])
  rows.append(("list: fetch_video, 120 frames", t["reference"], t["ours"], None))
  result["list"] = {"speedup_wall": round(t["reference"][0] / t["ours"][0], 2),
                    "speedup_cpu": round(t["reference"][1] / t["ours"][1], 2)}

  # the classification alone, on decoded frames
  frames_t = torch.from_numpy(sampled)
  t, out = interleaved({"ours": lambda: extract_slow_fast_frames(sampled),
                        "reference": lambda: ref.extract_slow_fast_frames(frames_t)}, args.rounds)
  identical["types"] = bool(np.array_equal(out["ours"], out["reference"].numpy()))
  rows.append((f"types: slow/fast, {len(sampled)} frames", t["reference"], t["ours"], None))
  result["types"] = {"speedup_wall": round(t["reference"][0] / t["ours"][0], 2),
                     "speedup_cpu": round(t["reference"][1] / t["ours"][1], 2)}

  print(f"{'':32s} {'reference s':>15s} {'ours s':>15s} {'bare decode s':>15s} {'ref / ours':>15s} "
        f"{'ours / bare':>13s}")
  print(f"{'':32s}" + f" {'wall':>7s} {'cpu':>7s}" * 3 + f" {'wall':>7s} {'cpu':>7s} {'wall':>6s} {'cpu':>6s}")
  for name, r, o, b in rows:
    line = f"{name:32s} {r[0]:7.3f} {r[1]:7.3f} {o[0]:7.3f} {o[1]:7.3f}"
    line += f" {b[0]:7.3f} {b[1]:7.3f}" if b else f" {'':7s} {'':7s}"
    line += f" {r[0] / o[0]:6.2f}x {r[1] / o[1]:6.2f}x"
    line += f" {o[0] / b[0]:6.2f} {o[1] / b[1]:6.2f}" if b else ""
    print(line)
  print(f"medians of {args.rounds} interleaved rounds; load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cpus")
  print(f"targets: file ours/bare <= 1.15 (cheap {result['file_cheap']['ours_over_bare_wall']:.2f} wall "
        f"{result['file_cheap']['ours_over_bare_cpu']:.2f} cpu, heavy {result['file_heavy']['ours_over_bare_wall']:.2f}"
        f" wall {result['file_heavy']['ours_over_bare_cpu']:.2f} cpu); list >= 2x ({result['list']['speedup_wall']:.2f}x"
        f" wall); types >= 1x ({result['types']['speedup_wall']:.2f}x wall)")
  print(f"identical results: {identical}")
  result["identical"] = bool(all(identical.values()))
  result["rounds"] = args.rounds
  result["load_average"] = round(os.getloadavg()[0], 1)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
