"""`keye plan` for RL compiles the rollout engine's decode step ahead of time (train/rl/plan.py): the demo RL
config (tiny model, 64 slots, a 256-token cache) for a 4-chip v5p slice through libtpu, on the abstract model.
Its memory is consistent with the shapes: the KV cache argument is the shape-computed cache per chip, the
arguments are the weights plus the slot state, the donated slot state is updated in place, and nothing copies
the cache. On a multi-host slice the compiled engine is one process's, with its share of rl.slots."""

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
  assert dec["cache_len"] == shaped["length"] == 256 and dec["slots"] == 64
  assert dec["cache"] == shaped["cache"] > 0          # 4 layers x K,V x 16 slots x 2 heads x 256 x 32 x fp32
  sh = shape.shardings(mesh)      # the trainer's parameter shardings: the engine works on them in place
  params = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh[k]) for k, v in shape.shapes().items()}
  assert dec["weights"] == per_chip_bytes(params)
  # Arguments: the engine's weights, the slot state, three scalars. The decode program takes the decoder's
  # weights only (jit drops the arguments it does not use: the vision tower's and the projector's).
  decoder = per_chip_bytes({k: v for k, v in params.items() if k.startswith("decoder/")})
  assert decoder + dec["carry"] <= dec["argument"] <= dec["weights"] + dec["carry"] + MiB
  # The slot state is donated: the new one lands in place (outputs aliased), no second cache in the outputs.
  assert dec["alias"] >= dec["cache"] and dec["output"] - dec["alias"] <= MiB
  # No copy of the whole cache in the compiled program (per-layer arrays, the pending K/V written as aligned
  # slot blocks: keye_jax/rollout.py `_put_pending`). This tiny model's head_dim 32 is below the TPU's 128
  # lanes, so XLA lays each layer's cache out T-minor and copies it for the kernel (`layer`); the 8B model's
  # head_dim 128 compiles with no copy at all (README, 8B RL plan row).
  copies = dec["cache_copies"]
  assert copies["whole"] == 0 and dec["processes"] == 1, dec
  assert dec["temp"] <= copies["layer"] * dec["layer_cache"] + 32 * MiB, dec


@pytest.mark.slow   # an AOT compile through libtpu: ~40 s loaded
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="AOT compiles for TPUs need libtpu")
def test_multi_host_topology_compiles_one_process_engine_with_its_share_of_the_slots():
  """v5p:2x2x2 has two hosts of 4 chips: a run gives each process an engine on its own 4 chips with 64 / 2
  slots, so the KV cache per chip is half the one-host slice's (v5p:2x2x1, 64 slots on 4 chips)."""
  cfg = load_rl_config(os.path.join(REPO, "configs", "demo", "rl.yaml"))
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention_impl="auto"))
  mesh = make_mesh(cfg.mesh, tpu_devices("v5p:2x2x2"))
  dec = compile_decode_step(cfg, mesh)
  assert dec["processes"] == 2 and dec["slots"] == 32 and dec["engine_mesh"]["fsdp"] == 4, dec
  assert dec["cache"] == rollout_bytes_per_chip(cfg, mesh)["cache"] == 4 * 2 * 8 * 2 * 256 * 32 * 4
  assert dec["cache_copies"]["whole"] == 0, dec


@pytest.mark.parametrize("trainable", [("projector", "language"), ("vision", "projector", "language")])
def test_plan_batch_is_the_batch_the_loop_packs(trainable):
  """The update step `keye plan` compiles takes the arrays the RL loop packs: with a frozen tower the
  rollout's vision_features (B, P, Dv) instead of pixel_values, same shapes and dtypes."""
  from train.data.decode import TokenIds
  from train.rl.batch import pack_responses, reused_vision_dim
  from train.rl.plan import rl_abstract_batch
  cfg = load_rl_config(os.path.join(REPO, "configs", "demo", "rl.yaml"))
  cfg = dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, trainable=trainable))
  mesh = make_mesh(cfg.mesh, jax.devices()[:1])
  planned = rl_abstract_batch(cfg, mesh)
  d = cfg.data
  packed = pack_responses([], d.seq_len, d.num_patches, d.batch_size, TokenIds(0, 3, 4, 5, 6),
                          vision_dim=reused_vision_dim(cfg.model, cfg.optimizer.trainable))
  assert ("vision_features" in planned) == ("vision" not in trainable)
  assert {k: (v.shape, v.dtype) for k, v in planned.items()} == {k: (v.shape, v.dtype) for k, v in packed.items()}
