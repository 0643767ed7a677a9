"""Script: write a multi-GB text checkpoint (one safetensors shard per tensor, written one tensor at a
time), convert it in a child process, print the child's peak RSS, the largest tensor and the checkpoint
size as JSON (last line).

The checkpoint is a Qwen3-shaped text model: embedding and lm_head `hidden x hidden` float32 (256 MiB
at hidden 8192, the largest tensors), each layer a 256 MiB group (q_proj and o_proj of 128 MiB, half as
many heads as hidden / head_dim; the rest is small). At the default 10 layers it holds 3.4 GiB, more
than twice the bound the test asserts (2x the largest tensor + 1 GiB = 1.5 GiB), so a converter that
holds the checkpoint in memory fails the test. (Layers of two 256 MiB tensors would make a 512 MiB
group, which the converter saves in one Orbax call needing about twice the group: ~1.44 GiB, too close
to the bound for a test.)

  python -m tests.convert.convert_memory WORK_DIR [LAYERS]
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import numpy as np
from safetensors.numpy import save_file

# The converter's entry point; a caller may put a patched one in its place (see `main`'s `prelude`).
CONVERT = "import sys\nfrom keye_jax.cli import main\nsys.exit(main(sys.argv[1:]))"


def _tensor(rng, shape: tuple[int, ...], ones: bool = False) -> np.ndarray:
  """(shape) float32: ones, or a 256-row random block tiled down the rows (cheap to make, finite)."""
  if ones:
    return np.ones(shape, np.float32)
  block = rng.standard_normal((min(256, shape[0]),) + tuple(shape[1:]), dtype=np.float32) * 0.02
  return np.resize(block, shape)


def write_checkpoint(d: str, hidden: int = 8192, layers: int = 10, ff: int = 256) -> dict:
  """Writes config.json, model.safetensors.index.json and one shard per tensor into `d`, holding one
  tensor at a time. Returns {"largest_tensor_bytes", "checkpoint_bytes"}."""
  os.makedirs(d, exist_ok=True)
  rng = np.random.default_rng(0)
  hd, kv, vocab = 128, 2, hidden
  heads = hidden // hd // 2
  shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
            "model.norm.weight": (hidden,)}
  for i in range(layers):
    p = f"model.layers.{i}."
    shapes.update({
        p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
        p + "self_attn.q_proj.weight": (heads * hd, hidden), p + "self_attn.k_proj.weight": (kv * hd, hidden),
        p + "self_attn.v_proj.weight": (kv * hd, hidden), p + "self_attn.o_proj.weight": (hidden, heads * hd),
        p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
        p + "mlp.gate_proj.weight": (ff, hidden), p + "mlp.up_proj.weight": (ff, hidden),
        p + "mlp.down_proj.weight": (hidden, ff)})
  weight_map, largest = {}, 0
  for j, (name, shape) in enumerate(shapes.items()):
    x = _tensor(rng, shape, ones=len(shape) == 1)
    shard = f"model-{j + 1:05d}-of-{len(shapes):05d}.safetensors"
    save_file({name: x}, os.path.join(d, shard))
    weight_map[name] = shard
    largest = max(largest, x.nbytes)
    del x
  with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": vocab,
               "hidden_size": hidden, "intermediate_size": ff, "num_hidden_layers": layers,
               "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd, "rms_norm_eps": 1e-6,
               "rope_theta": 1e6, "tie_word_embeddings": False}, f)
  size = sum(os.path.getsize(os.path.join(d, n)) for n in set(weight_map.values()))
  return {"largest_tensor_bytes": largest, "checkpoint_bytes": size}


def main(work: str, layers: int = 10, hidden: int = 8192, prelude: str = "") -> dict:
  """Writes the checkpoint under WORK/hf, converts it to WORK/orbax in a child process and prints (and
  returns) {"peak_rss_bytes" (the child's), "largest_tensor_bytes", "checkpoint_bytes", "seconds"}.
  `prelude`: Python run in the child before the converter (a check that the test can fail patches the
  converter with it)."""
  import time
  sizes = write_checkpoint(os.path.join(work, "hf"), hidden=hidden, layers=layers)
  t0 = time.time()
  r = subprocess.run([sys.executable, "-c", prelude + "\n" + CONVERT, "convert", "to-orbax",
                      os.path.join(work, "hf"), os.path.join(work, "orbax")], capture_output=True, text=True)
  if r.returncode:
    raise SystemExit(r.stderr[-2000:])
  peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
  out = {"peak_rss_bytes": peak, **sizes, "seconds": round(time.time() - t0, 1)}
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main(sys.argv[1], *map(int, sys.argv[2:3]))
