"""`keye plan` for RL compiles the rollout engine's decode step ahead of time (train/rl/plan.py): the demo RL
config (tiny model, 32 slots, cache 128 + 128) for a 4-chip v5p slice through libtpu, on the abstract model.
Its memory is consistent with the shapes: the KV cache argument is the shape-computed cache per chip, the
arguments are the weights plus the slot state, and the donated slot state is updated in place."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import jax
import pytest

from keye_jax.sharding import make_mesh
from train.model_state import ModelShape
from train.plan import per_chip_bytes, tpu_devices
from train.rl.config import load_rl_config
from train.rl.plan import compile_decode_step, rollout_bytes_per_chip

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MiB = 2**20


@pytest.mark.slow   # two AOT compiles through libtpu: 40 s on the loaded 2-core machine
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="AOT compiles for TPUs need libtpu")
def test_decode_step_compiles_for_v5p_and_its_memory_matches_the_shapes():
  cfg = load_rl_config(os.path.join(REPO, "configs", "demo", "rl.yaml"))
  # The config's own attention_impl is xla; auto takes the Pallas decode kernel when compiling for a TPU,
  # per shard under shard_map (kernels/decode.py).
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention_impl="auto"))
  mesh = make_mesh(cfg.mesh, tpu_devices("v5p:2x2x1"))
  shape = ModelShape.of(cfg.model)
  dec = compile_decode_step(cfg, mesh, shape)
  assert dec["attention"] == "pallas", dec

  shaped = rollout_bytes_per_chip(cfg, mesh)
  assert dec["cache_len"] == shaped["length"] == 256 and dec["slots"] == 32
  assert dec["cache"] == shaped["cache"] > 0          # 4 layers x K,V x 8 slots x 2 heads x 256 x 32 x fp32
  sh = shape.shardings(mesh)      # the trainer's parameter shardings: the engine works on them in place
  params = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh[k]) for k, v in shape.shapes().items()}
  assert dec["weights"] == per_chip_bytes(params)
  # Arguments: the engine's weights, the slot state, three scalars.
  assert dec["weights"] + dec["carry"] <= dec["argument"] <= dec["weights"] + dec["carry"] + MiB
  # The slot state is donated: the new one lands in place (outputs aliased), no second cache in the outputs.
  assert dec["alias"] >= dec["cache"] and dec["output"] - dec["alias"] <= MiB
  # Temporaries: the step's activations, logits and gathered weights, plus what it copies of the cache
  # (counted from the compiled program: whole-cache copies are a layout change around the decode loop).
  copies = dec["cache_copies"]
  assert dec["temp"] <= (copies["whole"] + 1) * dec["cache"] + copies["layer"] * dec["layer_cache"] + 32 * MiB, dec
