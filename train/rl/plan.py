"""`keye plan RL_CONFIG --topology T`: do the RL trainer and its rollout sampler fit together on the chips?

Colocated RL holds, on every chip, the train state (parameters, optimizer state) at all times, and in turn:
  update   the RL batch and the step's temporaries: the real RL training step (GSPO loss through
           make_step, batch with the per-token RL fields) compiled ahead of time for the topology (libtpu,
           no TPU needed), read from the compiler's memory analysis, as `keye plan` does for pre-training;
  rollout  the rollout engine's decode step (`keye_jax.rollout.RolloutEngine._decode`: the while loop of
           single-token steps over the engine's slots, caches of rl.max_prompt_len + rl.max_new_tokens
           tokens in the engine's buckets) compiled ahead of time on the abstract model as a run lays it
           out (train/rl/rollouts.py): with one process, over the trainer's mesh with all rl.slots slots;
           with several (a multi-host topology), process 0's engine on its own chips with rl.slots /
           processes slots. Its slot state (KV cache, tokens, log-probs, knobs) and temporaries (logits,
           attention) come from the compiler's memory analysis. With one process the engine works on the
           trainer's parameters in place (no weights added); with several, each engine's copy of the whole
           model on its chips counts. The shape-computed cache + logits (`rollout_bytes_per_chip`) is
           reported beside it for comparison.
Fits when both phases fit in HBM: max(state + update, state + rollout) <= HBM per chip. The report counts
the compiled decode step's copies of the KV cache (none expected: see keye_jax/rollout.py `_put_pending`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from keye_jax.generate import LENGTH_BUCKETS, NEW_TOKEN_BUCKETS, bucket
from keye_jax.rollout import RolloutEngine
from keye_jax.sharding import make_mesh
from train.model_state import ModelShape, batch_shardings
from train.plan import GIB, abstract_batch, hbm_gib, out_of_memory, per_chip_bytes, tpu_devices
from train.rl.batch import reused_vision_dim
from train.rl.config import load_rl_config
from train.rl.rollouts import process_mesh, slots_per_process
from train.rl.update import rl_loss_fn
from train.step import abstract_state, make_step


def rl_abstract_batch(cfg, mesh) -> dict:
  """The pre-training batch's arrays plus the RL per-token fields (and ref log-probs with a KL term); with a
  frozen vision tower, the rollout's vision_features in place of pixel_values, as the RL loop packs them."""
  batch = abstract_batch(cfg, mesh)
  b, s = cfg.data.batch_size, cfg.data.seq_len
  if dim := reused_vision_dim(cfg.model, cfg.optimizer.trainable):
    del batch["pixel_values"]
    sh = batch_shardings(["vision_features"], mesh)["vision_features"]
    batch["vision_features"] = jax.ShapeDtypeStruct((b, cfg.data.num_patches, dim), jnp.float32, sharding=sh)
  keys = ["old_logprobs", "advantages"] + (["ref_logprobs"] if cfg.rl.kl_coef > 0 else [])
  sh = batch_shardings(keys, mesh)
  for k in keys:
    batch[k] = jax.ShapeDtypeStruct((b, s), jnp.float32, sharding=sh[k])
  return batch


def rollout_bytes_per_chip(cfg, mesh) -> dict:
  """KV cache and decode logits of the rollout sampler, per chip (bytes), at the engine's bucketed cache length,
  for the trainer's `mesh` (one process's engine: its devices, its rl.slots / processes slots)."""
  t, r = cfg.model.text, cfg.rl
  dtype = np.dtype(jnp.dtype(cfg.model.dtype)).itemsize
  length = bucket(r.max_prompt_len, LENGTH_BUCKETS) + bucket(r.max_new_tokens, NEW_TOKEN_BUCKETS)  # the engine's
  processes, mesh = engine_layout(mesh)
  rows = math.prod(mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape)
  heads = mesh.shape.get("tensor", 1)
  seqs = slots_per_process(r.slots, processes)
  seqs_per_chip = -(-seqs // rows)
  kv_heads_per_chip = -(-t.num_kv_heads // heads)
  cache = t.num_layers * 2 * seqs_per_chip * length * kv_heads_per_chip * t.head_dim * dtype
  logits = seqs_per_chip * t.vocab_size * 4 * 2  # fp32 logits and log-softmax of one decode step
  return {"cache": cache, "logits": logits, "sequences": seqs, "length": length}


def engine_layout(mesh) -> tuple:
  """(processes, the mesh process 0's rollout engine runs on) for the trainer's `mesh`, as
  train/rl/rollouts.py lays it out: the whole mesh with one process, else that process's own devices."""
  hosts = len({d.process_index for d in mesh.devices.flat})
  if hosts == 1:
    return 1, mesh
  local = process_mesh(mesh, 0)
  # libtpu compiles a program over a few of a topology's chips only when their ids are the first ones (v6e:8x8:
  # process 0's chips 0, 1, 8, 9 fail); the same mesh shape over chips 0..n-1 has the same memory.
  first = sorted(mesh.devices.flat, key=lambda d: d.id)[:local.devices.size]
  return hosts, Mesh(np.asarray(first).reshape(local.devices.shape), mesh.axis_names)


def compile_decode_step(cfg, mesh, shape: ModelShape | None = None) -> dict:
  """The rollout engine's decode loop (`RolloutEngine._decode`, sampled, not greedy) compiled on the
  abstract model (no weights are made) as one process runs it for the trainer's `mesh`: on that process's
  devices with its rl.slots / processes slots (`engine_layout`, `slots_per_process`). Per-chip bytes
  {"argument", "output", "alias", "temp", "code"} from the compiler, and from the abstract arrays "weights"
  (the engine's parameters), "carry" (the slot state), "cache" (its K and V), "layer_cache" (one layer's K
  and V); "attention": "pallas" when the TPU kernel is in the program, else "xla"; "cache_copies";
  "cache_len", "slots" (the engine's), "processes", "engine_mesh"."""
  shape = shape or ModelShape.of(cfg.model)
  r = cfg.rl
  processes, mesh = engine_layout(mesh)
  slots = slots_per_process(r.slots, processes)
  sh = shape.shardings(mesh)
  params = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh[k]) for k, v in shape.shapes().items()}
  engine = RolloutEngine(shape.build(params), slots=slots, mesh=mesh, stop_token_ids=(cfg.model.eos_token_id,))
  new_len = bucket(r.max_new_tokens, engine.new_token_buckets)
  cache_len = bucket(r.max_prompt_len, engine.length_buckets) + new_len
  scalar = lambda dt: jax.ShapeDtypeStruct((), dt)
  with jax.set_mesh(mesh):
    # The slot state as the engine lays it out: its shardings are those of the compiled `_new_carry`.
    new = engine._new_carry.lower(engine.state, cache_len=cache_len, new_len=new_len)
    out_sh = new.compile().output_shardings
    carry = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), new.out_info, out_sh)
    compiled = engine._decode.lower(engine.state, carry, scalar(jnp.int32), scalar(jnp.bool_), scalar(jnp.int32),
                                    greedy=False).compile()
  mem = compiled.memory_analysis()
  text = compiled.as_text()
  kv = [carry["cache"]["k"], carry["cache"]["v"]]
  cache_b = per_chip_bytes(kv)
  layers = cfg.model.text.num_layers
  return {"argument": int(mem.argument_size_in_bytes), "output": int(mem.output_size_in_bytes),
          "alias": int(mem.alias_size_in_bytes), "temp": int(mem.temp_size_in_bytes),
          "code": int(mem.generated_code_size_in_bytes), "weights": per_chip_bytes(engine.state),
          "carry": per_chip_bytes(carry), "cache": cache_b, "layer_cache": cache_b // layers,
          "attention": "pallas" if "ragged_decode_attention" in text else "xla",
          "cache_copies": _copies(text, kv[0]), "cache_len": cache_len, "slots": slots,
          "processes": processes, "engine_mesh": dict(mesh.shape)}


def _copies(hlo: str, kv) -> dict:
  """Copy ops in the compiled program of one chip's K (or V) cache: `whole`, of a stacked (L, B, Hkv, T, hd)
  cache array (e.g. a layout change around the decode loop); `layer`, of one layer's (B, Hkv, T, hd) array or
  (1, B, Hkv, T, hd) slice of a stacked cache (e.g. an operand of the attention kernel). `kv`: the carry's
  K cache, one stacked array or a list of per-layer arrays."""
  leaves = jax.tree.leaves(kv)
  a = leaves[0]
  shard = a.sharding.shard_shape(a.shape)
  name = jnp.dtype(a.dtype).name.replace("bfloat16", "bf16").replace("float", "f")
  count = lambda shape: len(re.findall(re.escape(f"= {name}[{','.join(map(str, shape))}]") + r"\{[^}]*\} copy\(", hlo))
  if len(leaves) > 1:       # per layer
    return {"whole": count((len(leaves), *shard)), "layer": count(shard) + count((1, *shard))}
  return {"whole": count(shard), "layer": count((1, *shard[1:])) if len(shard) == 5 else 0}


def plan(config_path: str, topology: str, overrides=()) -> dict:
  cfg = load_rl_config(config_path, overrides)
  devices = tpu_devices(topology)
  mesh = make_mesh(cfg.mesh, devices)
  shape = ModelShape.of(cfg.model)
  batch = rl_abstract_batch(cfg, mesh)
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
  shaped_b = params_b + opt_b + ro["cache"] + ro["logits"]
  print(f"compiling the rollout engine's decode step (rl.slots={cfg.rl.slots}) for {topology} ...", file=sys.stderr,
        flush=True)
  try:
    dec = compile_decode_step(cfg, mesh, shape)
  except Exception as e:
    oom = out_of_memory(e)
    if oom is None:
      raise
    print(f"{topology}: the rollout decode step DOES NOT FIT: {oom['error']}", file=sys.stderr, flush=True)
    return {**base, "fits": False, "update_gib": update_b / GIB, "per_chip_gib": oom.get("per_chip_gib"), **oom}
  # The train state stays; the decode step adds its slot state (arguments less the weights: with one process
  # they are the trainer's parameters, used in place), outputs not aliased to the donated slot state,
  # temporaries and code. With several processes each engine's weights are a copy of the whole model on its
  # process's devices (train/rl/rollouts.py `local_params`): they count.
  copied = dec["processes"] > 1
  decode_b = dec["argument"] - (0 if copied else dec["weights"]) + dec["output"] - dec["alias"] + dec["temp"] \
      + dec["code"]
  rollout_b = params_b + opt_b + decode_b
  per_chip = max(update_b, rollout_b)
  decode = {"decode_attention": dec["attention"], "decode_argument_gib": dec["argument"] / GIB,
            "decode_output_gib": dec["output"] / GIB, "decode_alias_gib": dec["alias"] / GIB,
            "decode_temporaries_gib": dec["temp"] / GIB, "decode_code_gib": dec["code"] / GIB,
            "decode_slot_state_gib": dec["carry"] / GIB, "decode_cache_gib": dec["cache"] / GIB,
            "decode_layer_cache_gib": dec["layer_cache"] / GIB, "decode_cache_copies": dec["cache_copies"], "decode_step_gib": decode_b / GIB,
            "rollout_shapes_gib": shaped_b / GIB, "rollout_shapes_fits": max(update_b, shaped_b) / GIB <= hbm}
  decode.update(processes=dec["processes"], engine_mesh=dec["engine_mesh"], engine_slots=dec["slots"],
                engine_weights_copy_gib=(dec["weights"] if copied else 0) / GIB)
  report = {**base, "params_gib": params_b / GIB, "optimizer_gib": opt_b / GIB, "batch_gib": batch_b / GIB,
            "temporaries_gib": temp_b / GIB, "update_gib": update_b / GIB, "kv_cache_gib": ro["cache"] / GIB,
            "decode_logits_gib": ro["logits"] / GIB, "rollout_gib": rollout_b / GIB,
            "rollout_sequences": ro["sequences"], "rollout_length": ro["length"], **decode,
            "per_chip_gib": per_chip / GIB, "fits": per_chip / GIB <= hbm}
  print(format_report(report), file=sys.stderr, flush=True)
  return report


def format_report(r: dict) -> str:
  rows = [("parameters", r["params_gib"]), ("optimizer state", r["optimizer_gib"]), ("RL batch", r["batch_gib"]),
          ("step temporaries", r["temporaries_gib"]), ("update phase", r["update_gib"]),
          (f"decode step ({r['decode_attention']} attention, {r['engine_slots']} slots):", None),
          ("  arguments", r["decode_argument_gib"]), ("    of which the engine's weights (a copy)",
                                                         r["engine_weights_copy_gib"] or None),
          ("    of which KV cache", r["decode_cache_gib"]),
          ("    of which other slot state", r["decode_slot_state_gib"] - r["decode_cache_gib"]),
          ("  outputs (aliased)", r["decode_output_gib"]), ("  temporaries", r["decode_temporaries_gib"]),
          ("  (one layer's K+V cache)", r["decode_layer_cache_gib"]),
          ("rollout phase (compiled)", r["rollout_gib"]),
          (f"from shapes: KV cache ({r['rollout_sequences']} x {r['rollout_length']})", r["kv_cache_gib"]),
          ("from shapes: decode logits", r["decode_logits_gib"]),
          ("from shapes: rollout phase", r["rollout_shapes_gib"]),
          ("peak per chip", r["per_chip_gib"]), ("HBM per chip", r["hbm_gib"])]
  lines = [f"{r['topology']}: {r['chips']} chips, mesh {r['mesh']}"]
  lines += [f"  {name:<40}" + ("" if gib is None else f" {gib:9.2f} GiB") for name, gib in rows]
  copies = r.get("decode_cache_copies", {})
  if copies.get("whole"):
    lines.append(f"  NOTE: the compiled decode step copies the whole K/V cache ({copies['whole']} cache-sized copy "
                 "ops, e.g. a layout change around the decode loop): that copy is in its temporaries")
  if copies.get("layer"):
    lines.append(f"  NOTE: it copies one layer's K/V slice out of the stacked cache ({copies['layer']} copy ops) "
                 "inside the layer scan")
  if r.get("processes", 1) > 1:
    lines.append(f"  NOTE: {r['processes']} processes: each runs its own rollout engine with {r['engine_slots']} of the "
                 f"rl.slots on its own chips (mesh {r['engine_mesh']}), holding a copy of the whole model there "
                 f"({r['engine_weights_copy_gib']:.2f} GiB per chip, in the rollout phase); the decode step above is "
                 "that engine's")
  lines.append("  trainer and sampler fit together" if r["fits"] else "  DOES NOT FIT")
  return "\n".join(lines)
