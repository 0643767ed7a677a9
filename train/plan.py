"""`plan(config_path, topology)`: will this stage fit on that TPU slice? Compiles the real training step
ahead of time for the topology through libtpu (no TPU needed) and reads the compiler's memory analysis.

Reported per chip: parameters, optimizer state, the batch, temporaries (activations, gradients, logits
chunks, collectives' buffers), their total against the chip's HBM, and analytic FLOPs per step (the
compiler's own count sees a scanned layer once, so it is not used). When the compiler itself refuses the
program for lack of memory, the report says {"fits": false, ...} with the compiler's own figure.
Needs libtpu (`make setup-tpu`, or pip install "jax[tpu]"), not a TPU.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from keye_jax.sharding import make_mesh
from train.config import load_train_config
from train.metrics import flops_per_step
from train.model_state import ModelShape, batch_shardings
from train.step import abstract_state, make_step

log = logging.getLogger("train")
GIB = 1024 ** 3
HBM_GIB = {"v4": 32.0, "v5e": 16.0, "v5litepod": 16.0, "v5p": 95.0, "v6e": 32.0}


def hbm_gib(topology: str) -> float:
  name = topology.split(":")[0].lower()
  if name not in HBM_GIB:
    raise ValueError(f"unknown TPU generation {name!r} in topology {topology!r} (known: {sorted(HBM_GIB)})")
  return HBM_GIB[name]


def tpu_devices(topology: str):
  if importlib.util.find_spec("libtpu") is None:
    raise ModuleNotFoundError("keye plan compiles for TPUs through libtpu, which is not installed: run "
                              "`make setup-tpu` (or pip install 'jax[tpu]==0.10.2')")
  # Compiling only: several processes (parallel plans, tests) may load libtpu at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  try:
    return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
  except Exception as e:  # libtpu reports an unknown topology as a plain runtime error
    raise ValueError(f"--topology {topology}: libtpu cannot build it ({str(e).splitlines()[0]})") from None


# "Used 20.5G of 15.75G hbm" or "... required for HLO temporaries (85.17G) exceeds available HBM (15.75G)".
_OOM = re.compile(r"([\d.]+)([KMGT]?)i?B?\)?\s+(?:of|exceeds available HBM \()\s*([\d.]+)([KMGT]?)", re.IGNORECASE)
_UNIT = {"": 1 / GIB, "K": 1 / 1024 ** 2, "M": 1 / 1024, "G": 1.0, "T": 1024.0}


def out_of_memory(e: Exception) -> dict | None:
  """The compiler's figures from a RESOURCE_EXHAUSTED compile error ({"per_chip_gib", "compiler_hbm_gib",
  "error"}), or None for any other error."""
  text = str(e)
  if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
    return None
  first = next((line.strip() for line in text.splitlines() if "memory" in line.lower()), text.splitlines()[0])
  m = _OOM.search(text)
  out = {"error": first[:300]}
  if m:
    out["per_chip_gib"] = float(m.group(1)) * _UNIT[m.group(2).upper()]
    out["compiler_hbm_gib"] = float(m.group(3)) * _UNIT[m.group(4).upper()]
  return out


def abstract_batch(cfg, mesh) -> dict:
  d, m = cfg.data, cfg.model
  b, s = d.batch_size, d.seq_len
  spec = dict(input_ids=((b, s), jnp.int32), segment_ids=((b, s), jnp.int32), position_ids=((3, b, s), jnp.int32),
              loss_mask=((b, s), jnp.bool_), source_ids=((b, s), jnp.int32))
  if m.vision is not None:
    p, v = d.num_patches, m.vision
    spec.update(pixel_values=((b, p, v.num_channels * v.patch_size ** 2), jnp.float32),
                patch_segment_ids=((b, p), jnp.int32), patch_pos=((b, p, 4), jnp.int32),
                merge_index=((b, p // 4, 4), jnp.int32), merge_valid=((b, p // 4), jnp.bool_))
  sh = batch_shardings(list(spec), mesh)
  return {k: jax.ShapeDtypeStruct(shape, dt, sharding=sh[k]) for k, (shape, dt) in spec.items()}


def per_chip_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += math.prod(shard) * np.dtype(x.dtype).itemsize
  return total


def plan(config_path: str, topology: str, overrides=()) -> dict:
  cfg = load_train_config(config_path, overrides)
  devices = tpu_devices(topology)
  mesh = make_mesh(cfg.mesh, devices)
  shape = ModelShape.of(cfg.model)
  batch = abstract_batch(cfg, mesh)
  num_sources = max(len(cfg.data.sources), 1)
  fns = make_step(cfg, shape, mesh, num_sources, list(batch))
  state = abstract_state(fns)
  print(f"compiling the training step for {topology} ({len(devices)} chips, mesh {dict(mesh.shape)}) ...",
        file=sys.stderr, flush=True)
  hbm = hbm_gib(topology)
  try:
    compiled = fns.step.lower(state, batch).compile()
  except Exception as e:  # the compiler's own verdict that the program does not fit
    oom = out_of_memory(e)
    if oom is None:
      raise
    report = {"topology": topology, "chips": len(devices), "mesh": dict(mesh.shape), "fits": False,
              "per_chip_gib": oom.get("per_chip_gib"), "hbm_gib": hbm, **oom}
    print(f"{topology}: DOES NOT FIT: {oom['error']}", file=sys.stderr, flush=True)
    return report
  mem = compiled.memory_analysis()
  params_b, opt_b = per_chip_bytes(state["params"]), per_chip_bytes(state["opt"])
  batch_b = per_chip_bytes(batch)
  temp_b = int(mem.temp_size_in_bytes)
  # Arguments (state + batch) + temporaries + outputs not aliased to donated arguments + code.
  total_b = int(mem.argument_size_in_bytes) + temp_b + int(mem.output_size_in_bytes) \
      - int(mem.alias_size_in_bytes) + int(mem.generated_code_size_in_bytes)
  d = cfg.data
  flops = flops_per_step(cfg.model, d.batch_size, d.seq_len, d.num_patches if cfg.model.vision else 0)
  report = {
      "topology": topology, "chips": len(devices), "mesh": dict(mesh.shape),
      "params_gib": params_b / GIB, "optimizer_gib": opt_b / GIB, "batch_gib": batch_b / GIB,
      "temporaries_gib": temp_b / GIB, "per_chip_gib": total_b / GIB, "hbm_gib": hbm,
      "fits": total_b / GIB <= hbm, "flops_per_step": flops, "flops_per_chip": flops / len(devices),
      "tokens_per_chip": d.batch_size * d.seq_len / len(devices),
  }
  print(format_report(report), file=sys.stderr, flush=True)
  return report


def format_report(r: dict) -> str:
  rows = [("parameters", r["params_gib"]), ("optimizer state", r["optimizer_gib"]), ("batch", r["batch_gib"]),
          ("temporaries", r["temporaries_gib"]), ("total per chip", r["per_chip_gib"]), ("HBM per chip", r["hbm_gib"])]
  lines = [f"{r['topology']}: {r['chips']} chips, mesh {r['mesh']}"]
  lines += [f"  {name:<16} {gib:9.2f} GiB" for name, gib in rows]
  lines.append(f"  FLOPs per step   {r['flops_per_step']:.3e} ({r['flops_per_chip']:.3e} per chip)")
  lines.append("  fits" if r["fits"] else "  DOES NOT FIT")
  return "\n".join(lines)
