"""Attention on packed batches: blocks visited by our segment flash kernel vs the dense square vs
splash attention, the FLOPs that saves, and compiled per-chip memory from an AOT compile for TPU.

  .venv/bin/python benchmarks/bench_attention.py [--topology v5e:2x2] [--block 512] [--no-compile]

Printed, never asserted. Splash's visited blocks come from its own mask info (it skips only where its
static causal/full mask is empty; segment ids are dynamic to it). No kernel runs here: counts are
exact for the kernels' tables, memory is libtpu's compile-time analysis.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kernels import aot, splash  # noqa: E402
from kernels.block_tables import default_positions, visit_mask  # noqa: E402


def packed(lengths, total):
  ids = np.concatenate([np.full(n, i + 1, np.int32) for i, n in enumerate(lengths)])
  return np.concatenate([ids, np.zeros(total - len(ids), np.int32)])[None]


def workloads():
  """name -> (segment ids (1, S), causal, q heads, kv heads, head_dim)."""
  # 64 frames of 16x16 patches, each frame attends only to itself.
  frames = packed([256] * 64, 16384)
  # Slow/fast video (spec example, 720x1280 source): slow 40x72 = 2880 patches, fast 22x38 = 836; one
  # slow frame then three fast ones, as many groups as fit in 16K patches, the rest padding.
  group = [2880, 836, 836, 836]
  slow_fast = packed(group * (16384 // sum(group)), 16384)
  # 8K text row of 20 documents with random lengths (Dirichlet split), causal.
  rng = np.random.default_rng(0)
  lengths = np.maximum(1, np.floor(rng.dirichlet(np.ones(20)) * 8192).astype(int))
  text = packed(list(lengths), 8192)
  return {
      "vision 64 frames x 256 patches": (frames, False, 16, 16, 72),
      "vision slow/fast mix (2880 + 3 x 836)": (slow_fast, False, 16, 16, 72),
      "text 8K, 20 documents": (text, True, 32, 8, 128),
  }


def block_counts(seg, causal, block):
  s = seg.shape[1]
  pos = default_positions(1, s)
  ours = int(np.asarray(visit_mask(jnp.asarray(seg), jnp.asarray(seg), pos, pos, causal=causal,
                                   block_q=block, block_kv=block)).sum())
  kernel = splash.make_kernel(1, s, s, causal=causal, block_q=block, block_kv=block)
  theirs = splash.visited_blocks(kernel)
  # Useful work: query-key pairs that are actually visible.
  ids = seg[0][seg[0] != 0]
  lens = np.bincount(ids)[1:]
  useful = int(((lens * (lens + 1)) // 2).sum()) if causal else int((lens ** 2).sum())
  return dict(dense=(s // block) ** 2, splash=theirs, ours=ours, useful_pair_fraction=useful / s ** 2)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topology", default="v5e:2x2")
  parser.add_argument("--block", type=int, default=512)
  parser.add_argument("--no-compile", action="store_true", help="skip the AOT memory figures")
  args = parser.parse_args()
  mesh = None if args.no_compile else aot.tpu_mesh(args.topology)
  summary = {}
  for name, (seg, causal, hq, hkv, d) in workloads().items():
    counts = {blk: block_counts(seg, causal, blk) for blk in sorted({args.block, 256, 128}, reverse=True)}
    print(f"\n== {name}: S={seg.shape[1]}, {'causal' if causal else 'bidirectional'}, "
          f"{hq}/{hkv} heads x {d}", file=sys.stderr)
    for blk, c in counts.items():
      fwd_flop = lambda n: 4 * n * blk * blk * d * hq  # QK^T and PV per visited block pair, all heads
      print(f"  block {blk:4d}: visited ours {c['ours']:6d} | splash {c['splash']:6d} | dense "
            f"{c['dense']:6d}  -> {c['ours'] / c['splash']:.3f} of splash, {c['ours'] / c['dense']:.3f} of "
            f"dense; fwd GFLOP ours {fwd_flop(c['ours']) / 1e9:.1f} vs splash "
            f"{fwd_flop(c['splash']) / 1e9:.1f} (saved {1 - c['ours'] / c['splash']:.1%}); useful pairs "
            f"{c['useful_pair_fraction']:.3f} of the square", file=sys.stderr)
    entry = {f"block{blk}": c for blk, c in counts.items()}
    if mesh is not None:
      for impl in ("pallas", "splash", "xla"):
        start = time.time()
        try:
          compiled = aot.compile_attention_step(mesh, seq=seg.shape[1], q_heads=hq, kv_heads=hkv, head_dim=d,
                                                causal=causal, impl=impl, block=args.block)
          mem = aot.per_chip_bytes(compiled)
        except Exception as err:  # a baseline that does not lower is itself a finding
          mem = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
        entry[f"memory_{impl}"] = mem
        shown = ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in mem.items() if k != "error" and k != "code")
        print(f"  AOT {args.topology} fwd+bwd per chip, {impl:6s}: {shown or mem['error']} "
              f"({time.time() - start:.0f} s)", file=sys.stderr)
    summary[name] = entry
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
