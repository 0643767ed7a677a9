"""Ahead-of-time compilation through libtpu of the ragged decode-attention kernel at the 8B model's RL
decode shapes (configs/keye-vl-1.5-8b/rl.yaml: 256 slots, cache 4096 + 16384 = 20480; 8 KV heads x 128,
32 query heads -> 4 rows per KV head; bf16 cache), slots split over the chips. One layer on 4-chip
slices, the whole 36-layer cache on the RL plan's 64-chip slices. Each compile takes about 1 s on CPU."""

from __future__ import annotations

import pytest

from kernels import aot

SHAPE = dict(slots=256, kv_heads=8, rows=4, head_dim=128, max_len=20480)
MiB = 2**20


@pytest.mark.parametrize("topology,layers", [("v5p:2x2x1", 1), ("v6e:2x2", 1), ("v5p:4x4x4", 36), ("v6e:8x8", 36)])
def test_decode_attention_compiles_for_tpu(topology, layers):
  mesh = aot.tpu_mesh(topology)
  compiled = aot.compile_decode_attention(mesh, layers=layers, **SHAPE)
  text = compiled.as_text()
  assert "tpu_custom_call" in text and "ragged_decode_attention" in text
  used = aot.per_chip_bytes(compiled)
  slots = SHAPE["slots"] // mesh.devices.size
  cache = 2 * layers * slots * SHAPE["kv_heads"] * SHAPE["max_len"] * SHAPE["head_dim"] * 2   # k and v, bf16
  # The arguments are the chip's share of the cache (+ q, segment ids, lengths); nothing cache-sized is
  # copied (temporaries: the (B, 1, T) segment-id view and the lse layout change).
  assert cache <= used["argument"] <= cache + 16 * MiB
  assert used["temp"] + used["output"] <= 16 * MiB
