"""`keye plan RL_CONFIG --topology T`: do the RL trainer and its rollout sampler fit together on the chips?

Colocated RL holds, on every chip, the train state (parameters, optimizer state) at all times, and in turn:
  update   the RL batch and the step's temporaries: the real RL training step (GSPO loss through
           make_step, batch with the per-token RL fields) compiled ahead of time for the topology (libtpu,
           no TPU needed), read from the compiler's memory analysis, as `keye plan` does for pre-training;
  rollout  the sampler's KV cache for rl.slots sequences (G per prompt) of rl.max_prompt_len +
           rl.max_new_tokens tokens, sharded like the sampler shards it (sequences over the batch axes,
           KV heads over `tensor`), plus one decode step's logits; computed from the shapes (the sampler
           works on the trainer's parameters in place, so it adds no weights).
Fits when both phases fit in HBM: max(state + update, state + rollout) <= HBM per chip.
"""

from __future__ import annotations

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np

from keye_jax.sharding import make_mesh
from train.model_state import ModelShape, batch_shardings
from train.plan import GIB, abstract_batch, hbm_gib, out_of_memory, per_chip_bytes, tpu_devices
from train.rl.config import load_rl_config
from train.rl.update import rl_loss_fn
from train.step import abstract_state, make_step


def rl_abstract_batch(cfg, mesh) -> dict:
  """The pre-training batch's arrays plus the RL per-token fields (and ref log-probs with a KL term)."""
  batch = abstract_batch(cfg, mesh)
  b, s = cfg.data.batch_size, cfg.data.seq_len
  keys = ["old_logprobs", "advantages"] + (["ref_logprobs"] if cfg.rl.kl_coef > 0 else [])
  sh = batch_shardings(keys, mesh)
  for k in keys:
    batch[k] = jax.ShapeDtypeStruct((b, s), jnp.float32, sharding=sh[k])
  return batch


def rollout_bytes_per_chip(cfg, mesh) -> dict:
  """KV cache and decode logits of the rollout sampler, per chip (bytes)."""
  t, r = cfg.model.text, cfg.rl
  dtype = np.dtype(jnp.dtype(cfg.model.dtype)).itemsize
  length = r.max_prompt_len + r.max_new_tokens
  rows = math.prod(mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape)
  heads = mesh.shape.get("tensor", 1)
  seqs = max(r.slots, r.group_size)
  seqs_per_chip = -(-seqs // rows)
  kv_heads_per_chip = -(-t.num_kv_heads // heads)
  cache = t.num_layers * 2 * seqs_per_chip * length * kv_heads_per_chip * t.head_dim * dtype
  logits = seqs_per_chip * t.vocab_size * 4 * 2  # fp32 logits and log-softmax of one decode step
  return {"cache": cache, "logits": logits, "sequences": seqs, "length": length}


def plan(config_path: str, topology: str, overrides=()) -> dict:
  cfg = load_rl_config(config_path, overrides)
  devices = tpu_devices(topology)
  mesh = make_mesh(cfg.mesh, devices)
  shape = ModelShape.of(cfg.model)
  batch = rl_abstract_batch(cfg, mesh)
  import dataclasses
  fns = make_step(dataclasses.replace(cfg, steps=cfg.optimizer_steps()), shape, mesh, 1, list(batch),
                  loss_fn=rl_loss_fn(cfg.rl, cfg.loss_chunk))
  state = abstract_state(fns)
  hbm = hbm_gib(topology)
  print(f"compiling the RL training step for {topology} ({len(devices)} chips, mesh {dict(mesh.shape)}) ...",
        file=sys.stderr, flush=True)
  base = {"topology": topology, "chips": len(devices), "mesh": dict(mesh.shape), "hbm_gib": hbm}
  try:
    compiled = fns.step.lower(state, batch).compile()
  except Exception as e:
    oom = out_of_memory(e)
    if oom is None:
      raise
    print(f"{topology}: the RL training step DOES NOT FIT: {oom['error']}", file=sys.stderr, flush=True)
    return {**base, "fits": False, "per_chip_gib": oom.get("per_chip_gib"), **oom}
  mem = compiled.memory_analysis()
  params_b, opt_b, batch_b = per_chip_bytes(state["params"]), per_chip_bytes(state["opt"]), per_chip_bytes(batch)
  temp_b = int(mem.temp_size_in_bytes)
  update_b = int(mem.argument_size_in_bytes) + temp_b + int(mem.output_size_in_bytes) \
      - int(mem.alias_size_in_bytes) + int(mem.generated_code_size_in_bytes)
  ro = rollout_bytes_per_chip(cfg, mesh)
  rollout_b = params_b + opt_b + ro["cache"] + ro["logits"]
  per_chip = max(update_b, rollout_b)
  report = {**base, "params_gib": params_b / GIB, "optimizer_gib": opt_b / GIB, "batch_gib": batch_b / GIB,
            "temporaries_gib": temp_b / GIB, "update_gib": update_b / GIB, "kv_cache_gib": ro["cache"] / GIB,
            "decode_logits_gib": ro["logits"] / GIB, "rollout_gib": rollout_b / GIB,
            "rollout_sequences": ro["sequences"], "rollout_length": ro["length"],
            "per_chip_gib": per_chip / GIB, "fits": per_chip / GIB <= hbm}
  print(format_report(report), file=sys.stderr, flush=True)
  return report


def format_report(r: dict) -> str:
  rows = [("parameters", r["params_gib"]), ("optimizer state", r["optimizer_gib"]), ("RL batch", r["batch_gib"]),
          ("step temporaries", r["temporaries_gib"]), ("update phase", r["update_gib"]),
          (f"KV cache ({r['rollout_sequences']} x {r['rollout_length']})", r["kv_cache_gib"]),
          ("decode logits", r["decode_logits_gib"]), ("rollout phase", r["rollout_gib"]),
          ("peak per chip", r["per_chip_gib"]), ("HBM per chip", r["hbm_gib"])]
  lines = [f"{r['topology']}: {r['chips']} chips, mesh {r['mesh']}"]
  lines += [f"  {name:<26} {gib:9.2f} GiB" for name, gib in rows]
  lines.append("  trainer and sampler fit together" if r["fits"] else "  DOES NOT FIT")
  return "\n".join(lines)
