"""Decode throughput: our jitted sampler against transformers' generate, same weights, same run.

Config of the decoder benchmark (~34M parameters): hidden 512, 8 layers, 8/4 heads, head_dim 64,
MLP 1536, vocab 8192; fp32 on the CPU. Batch 8, prompt 32, 128 new tokens, greedy, no early stop.
Prints tokens/s for both and the ratio; nothing is asserted.

  .venv/bin/python benchmarks/bench_generate.py [--batch 8] [--prompt 32] [--new 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from keye_jax.config import KeyeConfig, TextConfig  # noqa: E402
from keye_jax.generate import Prompt, Sampler, SamplingParams  # noqa: E402
from keye_jax.model import KeyeVL  # noqa: E402
from keye_jax.params import set_flat  # noqa: E402
from tests.model.hf_reference import hf_qwen3, hf_state_to_flat  # noqa: E402


def best_of(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return min(times), out


def weight_streaming_ceiling(flat: dict, batch: int, new: int, repeats: int) -> float:
  """Tokens/s of a jitted loop doing only each decode step's weight matmuls (no attention, norms or
  sampling): every step must stream all ~34M weights from memory, so no decoder can beat this here."""
  import jax
  import jax.numpy as jnp
  mats = [jnp.asarray(w) for k, w in sorted(flat.items()) if w.ndim == 2 and "embed" not in k]

  @jax.jit
  def loop(mats):
    def step(_, h_bd):
      h3_bd = jnp.tile(h_bd, (1, 3))  # the input of the (1536, 512) down projections
      out_bd = h_bd
      for w in mats:  # every product folded into the carry, so none can be hoisted or skipped
        z = jnp.dot(h_bd if w.shape[0] == h_bd.shape[1] else h3_bd, w)
        out_bd = out_bd + 1e-6 * jnp.max(z, axis=1, keepdims=True)  # (a sum XLA could move into w)
      return out_bd
    return jax.lax.fori_loop(0, new, step, jnp.ones((batch, 512), jnp.float32))

  loop(mats).block_until_ready()
  secs, _ = best_of(lambda: loop(mats).block_until_ready(), repeats)
  return batch * new / secs


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--prompt", type=int, default=32)
  ap.add_argument("--new", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--scan", action="store_true", help="scanned layer stack (default: unscanned)")
  ap.add_argument("--torch-threads", type=int, default=os.cpu_count())
  args = ap.parse_args()

  t = TextConfig(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8,
                 num_kv_heads=4, head_dim=64, rope_theta=10000.0, mrope_section=(32, 0, 0))
  hf = hf_qwen3(t, seed=0)
  cfg = KeyeConfig(text=t, vision=None, attention_impl="xla", scan_layers=args.scan)
  model = KeyeVL(cfg, rngs=nnx.Rngs(0))
  set_flat(model, hf_state_to_flat(hf.state_dict(), cfg))
  n_params = sum(p.numel() for p in hf.parameters())

  rng = np.random.default_rng(0)
  ids = rng.integers(1, t.vocab_size, (args.batch, args.prompt))
  n_tokens = args.batch * args.new

  torch.set_num_threads(args.torch_threads)
  torch_ids = torch.tensor(ids)

  def run_hf():
    with torch.no_grad():
      return hf.generate(input_ids=torch_ids, attention_mask=torch.ones_like(torch_ids),
                         max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                         pad_token_id=0, eos_token_id=None)

  sampler = Sampler(model, stop_token_ids=())
  prompts = [Prompt(r.astype(np.int32)) for r in ids]
  params = SamplingParams(max_new_tokens=args.new)
  t0 = time.perf_counter()
  sampler.generate(prompts, params)
  compile_s = time.perf_counter() - t0

  ours_s, ours = best_of(lambda: sampler.generate(prompts, params), args.repeats)
  run_hf()  # warm-up
  hf_s, theirs = best_of(run_hf, args.repeats)
  same = np.array_equal(np.stack([g.tokens for g in ours]), theirs[:, args.prompt:].numpy())

  print(f"config: {n_params / 1e6:.1f}M params, batch {args.batch}, prompt {args.prompt}, "
        f"{args.new} new tokens, greedy, fp32, {os.cpu_count()} CPUs (torch threads {args.torch_threads}), "
        f"{'scanned' if args.scan else 'unscanned'} layers")
  print(f"ours (jitted while_loop): {n_tokens / ours_s:8.1f} tokens/s  ({ours_s:.3f} s; first call incl. "
        f"compile {compile_s:.1f} s)")
  print(f"transformers generate:    {n_tokens / hf_s:8.1f} tokens/s  ({hf_s:.3f} s)")
  print(f"ratio ours / transformers: {hf_s / ours_s:.2f}x   (same greedy tokens: {same})")
  ceiling = weight_streaming_ceiling(hf_state_to_flat(hf.state_dict(), cfg), args.batch, args.new, args.repeats)
  print(f"weight-streaming ceiling:  {ceiling:8.1f} tokens/s  (only the matmuls of each step; ours reach "
        f"{n_tokens / ours_s / ceiling:.0%}, transformers {n_tokens / hf_s / ceiling:.0%})")


if __name__ == "__main__":
  main()
