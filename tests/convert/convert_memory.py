"""Script: write a multi-GB text checkpoint (sharded safetensors), convert it in a child process, print
the child's peak RSS and the largest tensor size as JSON."""

import json
import os
import resource
import subprocess
import sys

import numpy as np
from safetensors.numpy import save_file


def write_checkpoint(d: str, vocab: int, hidden: int, layers: int) -> int:
  os.makedirs(d, exist_ok=True)
  rng = np.random.default_rng(0)
  hd, heads, kv, ff = 128, hidden // 128, 2, 256
  def w(*shape):
    return rng.standard_normal(shape, dtype=np.float32) * 0.02
  shards = [{"model.embed_tokens.weight": w(vocab, hidden)}, {"lm_head.weight": w(vocab, hidden),
                                                              "model.norm.weight": np.ones(hidden, np.float32)}]
  layer_tensors = {}
  for i in range(layers):
    p = f"model.layers.{i}."
    layer_tensors.update({
        p + "input_layernorm.weight": np.ones(hidden, np.float32),
        p + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
        p + "self_attn.q_proj.weight": w(heads * hd, hidden), p + "self_attn.k_proj.weight": w(kv * hd, hidden),
        p + "self_attn.v_proj.weight": w(kv * hd, hidden), p + "self_attn.o_proj.weight": w(hidden, heads * hd),
        p + "self_attn.q_norm.weight": np.ones(hd, np.float32), p + "self_attn.k_norm.weight": np.ones(hd, np.float32),
        p + "mlp.gate_proj.weight": w(ff, hidden), p + "mlp.up_proj.weight": w(ff, hidden),
        p + "mlp.down_proj.weight": w(hidden, ff)})
  shards.append(layer_tensors)
  weight_map = {}
  for i, shard in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(d, name))
    weight_map.update({k: name for k in shard})
    largest = max(x.nbytes for x in shard.values())
  with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump({"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": ff, "num_hidden_layers": layers,
               "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd, "rms_norm_eps": 1e-6,
               "rope_theta": 1e6, "tie_word_embeddings": False}, f)
  return vocab * hidden * 4


def main(work: str, vocab: int = 65536, hidden: int = 4096, layers: int = 2):
  largest = write_checkpoint(os.path.join(work, "hf"), vocab, hidden, layers)
  r = subprocess.run([sys.executable, "-m", "keye_jax", "convert", "to-orbax", os.path.join(work, "hf"),
                      os.path.join(work, "orbax")], capture_output=True, text=True)
  if r.returncode:
    raise SystemExit(r.stderr[-2000:])
  peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
  print(json.dumps({"peak_rss_bytes": peak, "largest_tensor_bytes": largest,
                    "checkpoint_bytes": sum(os.path.getsize(os.path.join(work, "hf", n))
                                            for n in os.listdir(os.path.join(work, "hf")))}))


if __name__ == "__main__":
  main(sys.argv[1])
