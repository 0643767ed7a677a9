"""RL rollout throughput: our RolloutEngine against Tunix's vanilla Sampler, same weights, same run.

Model: the tiny Qwen3 of bench_generate (hidden 512, 8 layers, 8/4 heads, head_dim 64, MLP 1536, vocab
8192; fp32 on the CPU). Workload: 16 prompts x G=8 samples at temperature 1, prompts of 64-192 tokens,
response lengths drawn from a long-tailed (log-normal) distribution, most short, a few up to 512 (fixed
seed). Useful tokens are the drawn lengths: each side stops a sample at its drawn length as its API
allows: ours with per-sample max tokens; Tunix's static batches run each batch to its longest sample
(`max_generation_steps` = the batch's longest drawn length; no stop token can fire).

Sides, interleaved in one process (each repeat runs ours then Tunix; best of the repeats): ours; Tunix
with one call per prompt group (batch 8) and with everything in one call (batch 128), its best reported;
the weight-streaming ceiling (a jitted loop of only each step's weight matmuls at batch = our slots);
plus, for our side only, a variant with one image per prompt (a tiny SigLIP tower). Compile times are
the first call's time minus the best later one (each side's first pass compiles what it needs). The
ceiling fractions: end to end (useful tokens/s over the ceiling) and inside the decode loop (running
rows' tokens per second spent in our decode calls). Nothing is asserted; the last stdout line is JSON.

Tunix (PyPI google-tunix, test-only) drags in a heavy tree (datasets, tensorflow_datasets, qwix, ...)
that its sampler does not use: it is installed with --no-deps plus jaxtyping and sentencepiece, and its
package __init__ (which imports every trainer) is skipped by registering a bare `tunix` package.

  .venv/bin/python benchmarks/bench_rollout.py [--slots 32] [--repeats 2] [--tunix-batches 8,128]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
import types

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.bench_generate import weight_streaming_ceiling  # noqa: E402
from keye_jax.config import KeyeConfig, TextConfig  # noqa: E402
from keye_jax.generate import Prompt, SamplingParams  # noqa: E402
from keye_jax.model import KeyeVL  # noqa: E402
from keye_jax.params import set_flat  # noqa: E402
from keye_jax.rollout import Request, RolloutEngine  # noqa: E402
from tests.model.hf_reference import hf_qwen3, hf_state_to_flat, tiny_vision_config  # noqa: E402

PROMPTS, G, MAX_LEN = 16, 8, 512


def workload(seed: int, vocab: int):
  """Prompts (16 arrays of 64-192 ids) and drawn response lengths (16, 8), long-tailed in [4, 512]."""
  rng = np.random.default_rng(seed)
  prompts = [rng.integers(10, vocab, int(n)).astype(np.int32) for n in rng.integers(64, 193, PROMPTS)]
  lengths = np.clip(rng.lognormal(np.log(40 * MAX_LEN / 512), 1.0, (PROMPTS, G)), 4, MAX_LEN).astype(int)
  lengths[rng.integers(0, PROMPTS, 2), rng.integers(0, G, 2)] = MAX_LEN    # the tail reaches the limit
  return prompts, lengths


def requests(prompts, lengths, images=None):
  out = []
  for i, ids in enumerate(prompts):
    params = [SamplingParams(max_new_tokens=int(n), temperature=1.0, seed=i, stop_token_ids=()) for n in lengths[i]]
    out.append(Request(images[i] if images else Prompt(ids), params, G))
  return out


def import_tunix():
  """tunix.generate.sampler and tunix.models.qwen3 without tunix/__init__ (it imports every trainer)."""
  spec = importlib.util.find_spec("tunix")
  if spec is None:
    raise SystemExit("google-tunix is not installed: .venv/bin/pip install --no-deps google-tunix==0.1.7 "
                     "jaxtyping sentencepiece")
  if "tunix" not in sys.modules:
    pkg = types.ModuleType("tunix")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["tunix"] = pkg
  from tunix.generate import sampler as tunix_sampler
  from tunix.models.qwen3 import model as tunix_model, params as tunix_params
  return tunix_sampler, tunix_model, tunix_params


class IdTokenizer:
  """Tunix's sampler takes strings: a prompt is its ids written out, so both sides see the same ids."""

  def encode(self, text, **_):
    return [int(x) for x in text.split()]

  def decode(self, ids, **_):
    return " ".join(str(int(i)) for i in ids)

  def bos_id(self):
    return None                     # Tunix prepends a truthy BOS id: none, so both sides see the same ids

  def eos_id(self):
    return 2

  def pad_id(self):
    return 0


def build_tunix(hf, t: TextConfig, cache_size: int):
  tunix_sampler, tunix_model, tunix_params = import_tunix()
  cfg = tunix_model.ModelConfig(num_layers=t.num_layers, vocab_size=t.vocab_size, embed_dim=t.hidden_size,
                                hidden_dim=t.intermediate_size, num_heads=t.num_heads, head_dim=t.head_dim,
                                num_kv_heads=t.num_kv_heads, rope_theta=int(t.rope_theta), norm_eps=t.rms_norm_eps)
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d, safe_serialization=True)
    model = tunix_params.create_model_from_safe_tensors(d, cfg)
  cache = tunix_sampler.CacheConfig(cache_size=cache_size, num_layers=t.num_layers, num_kv_heads=t.num_kv_heads,
                                    head_dim=t.head_dim)
  return tunix_sampler.Sampler(model, IdTokenizer(), cache)


def run_tunix(sampler, prompts, lengths, batch: int, vocab: int):
  """All samples in static batches of `batch` (whole groups, in order), each run to its longest sample
  rounded up to a multiple of 64 (every step count is a compile in Tunix: this bounds them to 8)."""
  texts = [" ".join(map(str, p)) for p in prompts for _ in range(G)]
  flat = lengths.reshape(-1)
  out = []
  for start in range(0, len(texts), batch):
    steps = -(-int(flat[start:start + batch].max()) // 64) * 64
    res = sampler(texts[start:start + batch], max_generation_steps=steps, max_prompt_length=256,
                  temperature=1.0, top_p=1.0, seed=start, eos_tokens=[vocab], pad_output=True)
    out += [np.asarray(tk)[:n] for tk, n in zip(res.tokens, flat[start:start + batch])]
  return out


def image_prompts(prompts, cfg: KeyeConfig, rng):
  """Each prompt with one 16x16-patch image (64 merged tokens) in front, 3D positions from processing."""
  from keye_jax.processing.positions import position_ids
  v = cfg.vision
  dim = v.num_channels * v.patch_size ** 2
  out = []
  for ids in prompts:
    body = ids[:len(ids) - 66]                                     # same length as the text prompt
    full = np.concatenate([[cfg.vision_start_token_id], [cfg.image_token_id] * 64, [cfg.vision_end_token_id],
                           body]).astype(np.int32)
    grids = np.array([[16, 16]])
    pos, _ = position_ids(full, grids, (cfg.image_token_id, cfg.video_token_id), v.spatial_merge_size)
    out.append(Prompt(full, pos, rng.standard_normal((256, dim)).astype(np.float32), grids))
  return out


def timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return time.perf_counter() - t0, out


def main():
  global PROMPTS, MAX_LEN
  ap = argparse.ArgumentParser()
  ap.add_argument("--slots", type=int, default=32)
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--tunix-batches", default="8,128")
  ap.add_argument("--no-image", action="store_true")
  ap.add_argument("--prompts", type=int, default=PROMPTS, help="smaller workloads for a quick look only")
  ap.add_argument("--max-len", type=int, default=MAX_LEN, help="(the tail's limit; the median scales with it)")
  args = ap.parse_args()
  PROMPTS, MAX_LEN = args.prompts, args.max_len

  # rope_theta 1e6 (Qwen3's own): Tunix 0.1.7's Qwen3 attention calls apply_rope without the config's
  # rope_theta, so it always uses its default 1e6 (with 1e4 its greedy tokens differ from transformers').
  t = TextConfig(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8,
                 num_kv_heads=4, head_dim=64, rope_theta=1_000_000.0, mrope_section=(32, 0, 0))
  hf = hf_qwen3(t, seed=0)
  flat = hf_state_to_flat(hf.state_dict(), KeyeConfig(text=t, vision=None))
  cfg = KeyeConfig(text=t, vision=None, attention_impl="xla", scan_layers=False)
  model = KeyeVL(cfg, rngs=nnx.Rngs(0))
  set_flat(model, flat)
  prompts, lengths = workload(0, t.vocab_size)
  useful = int(lengths.sum())
  reqs = requests(prompts, lengths)
  print(f"workload: {PROMPTS} prompts x G={G}, prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
        f"responses mean {lengths.mean():.0f} median {np.median(lengths):.0f} max {lengths.max()} "
        f"({useful} useful tokens); {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} "
        f"(shared machine: sides interleaved, best of {args.repeats})", flush=True)

  engine = RolloutEngine(model, slots=args.slots, stop_token_ids=())
  compile_ours, first = timed(lambda: engine.generate(reqs))
  assert [len(g.tokens) for grp in first for g in grp] == lengths.reshape(-1).tolist()
  print(f"ours, first call (compiles): {compile_ours:.1f} s", flush=True)
  tunix_batches = [int(b) for b in args.tunix_batches.split(",") if b]
  tunix = build_tunix(hf, t, cache_size=256 + MAX_LEN)
  compile_tunix = {}
  for b in tunix_batches:
    compile_tunix[b], _ = timed(lambda: run_tunix(tunix, prompts, lengths, b, t.vocab_size))
    print(f"Tunix batch {b}, first pass (compiles): {compile_tunix[b]:.1f} s", flush=True)

  # Same weights: greedy continuations of one prompt agree.
  greedy = engine.generate([Request(Prompt(prompts[0]), SamplingParams(max_new_tokens=16, stop_token_ids=()))])
  theirs = tunix([" ".join(map(str, prompts[0]))], max_generation_steps=16, max_prompt_length=256,
                 eos_tokens=[t.vocab_size], pad_output=True).tokens[0][:16]
  same = greedy[0][0].tokens == [int(x) for x in theirs]

  ours_s, tunix_s = [], {b: [] for b in tunix_batches}
  for _ in range(args.repeats):
    secs, out = timed(lambda: engine.generate(reqs))
    ours_s.append(secs)
    print(f"  ours {useful / secs:.1f} tokens/s", flush=True)
    for b in tunix_batches:
      tunix_s[b].append(timed(lambda: run_tunix(tunix, prompts, lengths, b, t.vocab_size))[0])
      print(f"  Tunix batch {b}: {useful / tunix_s[b][-1]:.1f} tokens/s", flush=True)
  ours = useful / min(ours_s)
  tunix_rates = {b: useful / min(s) for b, s in tunix_s.items()}
  best_b = max(tunix_rates, key=tunix_rates.get)
  ceiling = weight_streaming_ceiling(flat, args.slots, 64, 3)
  decode_rate = out.busy_slot_steps / out.decode_seconds         # tokens/s inside the decode loop

  print(f"ours (RolloutEngine, {args.slots} slots): {ours:8.1f} useful tokens/s  ({min(ours_s):.2f} s; "
        f"{out.vision_encodes} vision encodes, {out.prefills} prefills, {out.decode_steps} decode steps, "
        f"{out.decode_seconds:.2f} s in the decode loop, slot utilisation {out.slot_utilisation:.0%}; first call "
        f"incl. compile {compile_ours:.1f} s, so ~{compile_ours - min(ours_s):.1f} s of compiles)")
  for b in tunix_batches:
    print(f"Tunix Sampler, batch {b:3d}:          {tunix_rates[b]:8.1f} useful tokens/s  ({min(tunix_s[b]):.2f} s; "
          f"first pass incl. compile {compile_tunix[b]:.1f} s, so ~{compile_tunix[b] - min(tunix_s[b]):.1f} s of compiles)")
  print(f"ratio ours / Tunix (its best, batch {best_b}): {ours / tunix_rates[best_b]:.2f}x  "
        f"(same greedy tokens on one prompt: {same})")
  print(f"weight-streaming ceiling at batch {args.slots}: {ceiling:8.1f} tokens/s; ours reach "
        f"{ours / ceiling:.0%} end to end, {decode_rate / ceiling:.0%} inside the decode loop (running rows' "
        f"tokens per second of decoding)")

  result = {"ours_tokens_per_s": round(ours, 1), "tunix_tokens_per_s": round(tunix_rates[best_b], 1),
            "ratio": round(ours / tunix_rates[best_b], 3), "ceiling_fraction": round(ours / ceiling, 3),
            "vision_encodes_per_prompt": None, "prefills_per_prompt": out.prefills / PROMPTS,
            "decode_loop_ceiling_fraction": round(decode_rate / ceiling, 3),
            "compile_s_ours": round(compile_ours - min(ours_s), 1),
            "compile_s_tunix": round(compile_tunix[best_b] - min(tunix_s[best_b]), 1),
            "tunix_batch": best_b, "slot_utilisation": round(out.slot_utilisation, 3), "same_greedy": same}

  if not args.no_image:
    vcfg = KeyeConfig(text=t, vision=tiny_vision_config(), attention_impl="xla", scan_layers=False,
                      image_token_id=3, video_token_id=4, vision_start_token_id=5, vision_end_token_id=6)
    vmodel = KeyeVL(vcfg, rngs=nnx.Rngs(0))
    set_flat(vmodel, flat, strict=False)                        # the text half: the same weights
    vengine = RolloutEngine(vmodel, slots=args.slots, stop_token_ids=())
    vreqs = requests(prompts, lengths, image_prompts(prompts, vcfg, np.random.default_rng(1)))
    vcompile, _ = timed(lambda: vengine.generate(vreqs))
    vsecs, vout = min((timed(lambda: vengine.generate(vreqs)) for _ in range(args.repeats)), key=lambda x: x[0])
    print(f"ours with one image per prompt: {useful / vsecs:8.1f} useful tokens/s  ({vsecs:.2f} s; "
          f"{vout.vision_encodes} vision encodes, {vout.prefills} prefills for {PROMPTS} prompts; "
          f"first call incl. compile {vcompile:.1f} s)")
    result.update(vision_encodes_per_prompt=vout.vision_encodes / PROMPTS,
                  image_tokens_per_s=round(useful / vsecs, 1))
  print(json.dumps(result))


if __name__ == "__main__":
  main()
