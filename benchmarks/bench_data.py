"""Data pipeline throughput and packing efficiency on the demo mix at 8K context, and what feeding a v5p chip
at stage 4 takes in host cores.

Writes the demo dataset (or reuses --data), mixes its train split from the JSONL manifest and the
ArrayRecord copy, decodes in --workers processes and packs rows of --seq-len text tokens and
--num-patches vision patches. Prints examples/s and the share of real (non-padding) text tokens and
vision patches in the emitted rows, after --warmup batches; nothing is asserted. Target: text >= 98%.

  .venv/bin/python benchmarks/bench_data.py [--seq-len 8192] [--num-patches 24576] [--batch 4]
      [--workers 2] [--batches 30] [--encoder real|fake]

`--encoder fake` swaps keye_jax.processing for the tests' stand-in (pipeline cost alone).

Host cores per chip (`--video-examples N`, 0 to skip): two video mixes are encoded in this process by the
same Decoder the Grain workers run, then packed (fit_example + BinPacker + build_row), timed in process CPU
time (all threads), so the rates are per core however loaded the machine is:
  demo   the demo dataset's train videos (224x168 frames, the reference's smallest video frame; 5-32 of them)
  720p   20 s 720p H.264 clips at the default 2 fps (40 frames each), one decode-heavy and one cheap
         (tests/processing/media.write_clip, cached in --workdir), each with a question
Printed per mix: examples/s per worker core (decode + vision preprocessing + tokenising), packed tokens/s per
host core (also counting the packing), and the host cores one chip needs at the stage-4 step rate: the 8B
stage-4 config's FLOPs per chip (train/metrics.flops_per_step, which is what `keye plan` prints; computed
analytically, no compile) at 50% of a v5p chip's 459 TFLOP/s peak, with every row filled from the mix (packed into
stage-4 rows of 131072 tokens / 65536 patches).
A v5p host has 4 chips and 208 vCPUs (104 with NUMA binding): 52 vCPUs per chip (26 NUMA-bound).
Source: https://cloud.google.com/tpu/docs/v5p-training (VM, host and slice properties).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train.data.config import DataConfig, SourceConfig  # noqa: E402
from train.data.decode import Decoder, is_bad, token_ids  # noqa: E402
from train.data.packing import BinPacker, build_row, example_size, fit_example  # noqa: E402
from train.data.demo import write_demo_dataset  # noqa: E402
from train.data.pipeline import make_iterator  # noqa: E402


V5P_CHIPS_PER_HOST, V5P_VCPUS_PER_HOST = 4, 208   # cloud.google.com/tpu/docs/v5p-training
V5P_PEAK_FLOPS = 459e12                             # bf16 per chip, same page
STAGE4_CONFIG = "configs/keye-vl-1.5-8b/stage4.yaml"
STAGE4_CHIPS = 128                                  # v5p:4x4x8, where the README's `keye plan` fits stage 4


def stage4_rate() -> dict:
  """Rows and seconds per step per chip of 8B stage 4 at 50% of the v5p peak (analytic FLOPs)."""
  from train.config import load_train_config
  from train.metrics import flops_per_step
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cfg = load_train_config(os.path.join(root, STAGE4_CONFIG))
  d = cfg.data
  per_chip = flops_per_step(cfg.model, d.batch_size, d.seq_len, d.num_patches) / STAGE4_CHIPS
  return {"flops_per_chip": per_chip, "step_s": per_chip / (0.5 * V5P_PEAK_FLOPS),
          "rows_per_chip": d.batch_size / STAGE4_CHIPS, "seq_len": d.seq_len, "num_patches": d.num_patches}


def _720p_mix(workdir: str, seconds: float) -> str:
  from tests.processing.media import write_clip
  os.makedirs(workdir, exist_ok=True)
  lines = []
  for kind in ("heavy", "cheap"):
    clip = write_clip(os.path.join(workdir, f"{kind}_{seconds:g}s_720p.mp4"), kind, seconds)
    for q, a in (("What changes in this video?", "The scene cuts every three seconds."),
                 ("Describe the motion.", "The camera pans right.")):
      lines.append(json.dumps({"messages": [
          {"role": "user", "content": [{"type": "video", "video": clip}, {"type": "text", "text": q}]},
          {"role": "assistant", "content": [{"type": "text", "text": a}]}]}))
  path = os.path.join(workdir, f"video_720p_{seconds:g}s.jsonl")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path


def per_core(manifest: str, tokenizer, limit: int, rate: dict) -> dict:
  """Encode up to `limit` examples of a manifest and pack them into stage-4 rows, in this process, in CPU
  seconds."""
  seq_len, num_patches = rate["seq_len"], rate["num_patches"]
  from train.data.sources import open_source
  src = open_source(manifest)
  items = [src[i] for i in range(min(limit, len(src)))]
  dec, ids = Decoder(tokenizer, 0), token_ids(tokenizer)
  c = time.process_time()
  examples = [dec(item) for item in items]
  decode_cpu = time.process_time() - c
  good = [e for e in examples if not is_bad(e)]
  c = time.process_time()
  packer, rows, fitted = BinPacker(seq_len, num_patches, 16), [], []
  for e in good:
    e = fit_example(e, seq_len, num_patches, ids, "truncate")
    if e is None:
      continue
    fitted.append(e)
    for keys in packer.add(len(fitted) - 1, *example_size(e)):
      rows.append(build_row([fitted[k] for k in keys], seq_len, num_patches, ids))
  for keys in packer.flush():
    rows.append(build_row([fitted[k] for k in keys], seq_len, num_patches, ids))
  pack_cpu = time.process_time() - c
  tokens = sum(example_size(e)[0] for e in fitted)
  patches = sum(example_size(e)[1] for e in fitted)
  n = len(fitted)
  # Stage-4 rows filled from this mix: as many examples as the tighter of the two budgets lets in.
  per_row = min(rate["seq_len"] / (tokens / n), rate["num_patches"] / max(patches / n, 1e-9))
  tokens_per_core = tokens / (decode_cpu + pack_cpu)
  need = rate["rows_per_chip"] * per_row * (tokens / n) / rate["step_s"]     # tokens/s one chip consumes
  return {"examples": n, "bad": len(examples) - len(good), "tokens_per_example": round(tokens / n),
          "patches_per_example": round(patches / n),
          "examples_per_s_per_worker_core": round(n / decode_cpu, 3),
          "packed_tokens_per_s_per_host_core": round(tokens_per_core),
          "stage4_examples_per_row": round(per_row, 2), "stage4_tokens_per_s_per_chip": round(need),
          "host_cores_per_chip": round(need / tokens_per_core, 2)}


def report_cores(args, tmpdir: str, demo_root: str) -> dict:
  from keye_jax.processing.tokenizer import build_demo_tokenizer
  tokenizer = build_demo_tokenizer(os.path.join(tmpdir, "tok_cores"))
  rate = stage4_rate()
  print(f"stage 4 (8B, {STAGE4_CONFIG}): {rate['flops_per_chip']:.3e} FLOPs per chip per step on {STAGE4_CHIPS} "
        f"chips -> {rate['step_s']:.2f} s per step at 50% of {V5P_PEAK_FLOPS / 1e12:.0f} TFLOP/s, "
        f"{rate['rows_per_chip']:.4g} rows of {rate['seq_len']} tokens / {rate['num_patches']} patches per chip",
        file=sys.stderr)
  mixes = {"demo_video": os.path.join(demo_root, "train_video.jsonl"),
           "video_720p": _720p_mix(args.workdir, args.clip_seconds)}
  out = {"stage4_step_s": round(rate["step_s"], 3), "stage4_flops_per_chip": rate["flops_per_chip"],
         "v5p_vcpus_per_chip": V5P_VCPUS_PER_HOST // V5P_CHIPS_PER_HOST}
  for name, manifest in mixes.items():
    r = per_core(manifest, tokenizer, args.video_examples, rate)
    out[name] = r
    print(f"{name:11s} {r['examples']} examples ({r['tokens_per_example']} tokens, {r['patches_per_example']} "
          f"patches each): {r['examples_per_s_per_worker_core']:.2f} examples/s per worker core, "
          f"{r['packed_tokens_per_s_per_host_core']} packed tokens/s per host core; stage 4 needs "
          f"{r['stage4_tokens_per_s_per_chip']} tokens/s per chip ({r['stage4_examples_per_row']} examples per row)"
          f" -> {r['host_cores_per_chip']:.2f} host cores per chip (a v5p host has "
          f"{V5P_VCPUS_PER_HOST // V5P_CHIPS_PER_HOST} vCPUs per chip, "
          f"{V5P_VCPUS_PER_HOST // V5P_CHIPS_PER_HOST // 2} NUMA-bound)")
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--data", help="an existing demo dataset directory (default: write one to a temp dir)")
  ap.add_argument("--seq-len", type=int, default=8192)
  ap.add_argument("--num-patches", type=int, default=24576)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--workers", type=int, default=2)
  ap.add_argument("--bins", type=int, default=16)
  ap.add_argument("--batches", type=int, default=30)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--encoder", choices=("real", "fake"), default="real")
  ap.add_argument("--video-examples", type=int, default=24,
                  help="examples per video mix for the host-cores report (0: skip it)")
  ap.add_argument("--clip-seconds", type=float, default=20)
  ap.add_argument("--workdir", default="/tmp/keye_bench", help="where the 720p clips are cached")
  args = ap.parse_args()

  tmp = tempfile.TemporaryDirectory(prefix="keye-bench-data-")
  root = args.data
  if root is None:
    t0 = time.perf_counter()
    info = write_demo_dataset(os.path.join(tmp.name, "demo"), seed=0, with_tfds=False)
    root = info["path"]
    print(f"demo dataset: {info['train']} train examples in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

  if args.encoder == "fake":
    from tests.data.fakes import FakeTokenizer, fake_encode
    tokenizer, encode = FakeTokenizer(), fake_encode
  else:
    from keye_jax.processing.tokenizer import build_demo_tokenizer
    tokenizer, encode = build_demo_tokenizer(os.path.join(tmp.name, "tok")), None

  cfg = DataConfig(
      sources=(SourceConfig(path=os.path.join(root, "train.jsonl"), name="manifest", weight=1.0),
               SourceConfig(path=os.path.join(root, "array_record", "train.array_record"), name="array_record",
                            weight=1.0)),
      seq_len=args.seq_len, num_patches=args.num_patches, batch_size=args.batch, workers=args.workers,
      packing_bins=args.bins, worker_buffer_size=16)
  it = make_iterator(cfg, tokenizer, encode=encode, process_index=0, process_count=1)
  for _ in range(args.warmup):
    next(it)
  start = it.stats()
  t0 = time.perf_counter()
  for _ in range(args.batches):
    next(it)
  seconds = time.perf_counter() - t0
  end = it.stats()
  it.close()
  rows = end["rows"] - start["rows"]
  result = {
      "examples_per_second": round((end["examples"] - start["examples"]) / seconds, 1),
      "batches_per_second": round(args.batches / seconds, 3),
      "text_efficiency": round((end["text_tokens"] - start["text_tokens"]) / (rows * args.seq_len), 4),
      "vision_efficiency": round((end["patches"] - start["patches"]) / (rows * args.num_patches), 4),
      "examples_per_row": round((end["examples"] - start["examples"]) / rows, 1),
      "truncated": sum(s["truncated"] for s in end["sources"]),
      "dropped": sum(s["dropped"] for s in end["sources"]),
      "bad": sum(sum(s["bad"].values()) for s in end["sources"]),
      "seq_len": args.seq_len, "num_patches": args.num_patches, "batch": args.batch, "workers": args.workers,
      "encoder": args.encoder, "seconds": round(seconds, 2),
  }
  if args.video_examples:
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus; rates are CPU time", file=sys.stderr)
    result["host_cores"] = report_cores(args, tmp.name, root)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
