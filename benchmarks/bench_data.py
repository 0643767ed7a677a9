"""Data pipeline throughput and packing efficiency on the demo mix at 8K context.

Writes the demo dataset (or reuses --data), mixes its train split from the JSONL manifest and the
ArrayRecord copy, decodes in --workers processes and packs rows of --seq-len text tokens and
--num-patches vision patches. Prints examples/s and the share of real (non-padding) text tokens and
vision patches in the emitted rows, after --warmup batches; nothing is asserted. Target: text >= 98%.

  .venv/bin/python benchmarks/bench_data.py [--seq-len 8192] [--num-patches 24576] [--batch 4]
      [--workers 2] [--batches 30] [--encoder real|fake]

`--encoder fake` swaps keye_jax.processing for the tests' stand-in (pipeline cost alone).
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
from train.data.demo import write_demo_dataset  # noqa: E402
from train.data.pipeline import make_iterator  # noqa: E402


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
  print(json.dumps(result))


if __name__ == "__main__":
  main()
