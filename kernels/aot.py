"""Ahead-of-time compilation of attention forward + backward for a TPU topology, on any machine.

libtpu compiles for a described topology without the hardware (see spec tpu-without-tpu.md), which
proves the Mosaic kernels lower (block shapes, layouts, memory spaces) and reports per-chip memory.
Each chip gets one batch row: the kernel runs under shard_map over a `data` axis, as Mosaic kernels
in sharded programs must.
"""

from __future__ import annotations

import os

# Compile-only use: several processes (parallel test runs) may load libtpu at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import kernels  # noqa: E402
from kernels import splash  # noqa: E402


def tpu_mesh(topology: str) -> Mesh:
  """1-D `data` mesh over every chip of a topology such as "v5e:2x2", "v5p:2x2x1", "v6e:2x2"."""
  devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
  return Mesh(np.array(devices).reshape(-1), ("data",))


def compile_attention_step(mesh: Mesh, *, seq: int, q_heads: int, kv_heads: int, head_dim: int,
                           causal: bool, impl: str = "pallas", dtype=jnp.bfloat16, block: int = 512):
  """Compiled (out, dq, dk, dv) = attention and its gradients, one (seq, heads, head_dim) row per chip."""
  batch = mesh.devices.size

  def local(q, k, v, segment_ids):
    def loss(q, k, v):
      kw = dict(q_segment_ids=segment_ids, kv_segment_ids=segment_ids, causal=causal, block_q=block,
                block_kv=block, interpret=False)
      # splash: JAX's splash attention, the benchmarks' comparison baseline (not a model choice).
      out = splash.splash_attention(q, k, v, **kw) if impl == "splash" else kernels.attention(q, k, v, impl=impl, **kw)
      return jnp.sum(out.astype(jnp.float32)), out
    grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return (out, *grads)

  rows = P("data")
  # check_vma=False: Pallas traces index maps over scalar-prefetch refs without varying-axis types.
  step = jax.shard_map(local, mesh=mesh, in_specs=(rows,) * 4, out_specs=(rows,) * 4, check_vma=False)
  sharding = NamedSharding(mesh, rows)
  act = lambda heads: jax.ShapeDtypeStruct((batch, seq, heads, head_dim), dtype, sharding=sharding)
  ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=sharding)
  return jax.jit(step).lower(act(q_heads), act(kv_heads), act(kv_heads), ids).compile()


def compile_decode_attention(mesh: Mesh, *, slots: int, kv_heads: int, rows: int, head_dim: int,
                             max_len: int, layers: int = 1, dtype=jnp.bfloat16, block_kv: int | None = None):
  """Compiled ragged decode attention (`kernels.ragged_decode`) for `layers` per-layer (slots, kv_heads,
  max_len, head_dim) caches (a list, as the unscanned decoder keeps them: a scan over a stacked cache would
  copy each layer's slice out for the custom call), slots split over the `data` axis; rows = query heads
  per KV head x new tokens. Per-chip argument bytes are then the decode step's whole KV cache."""
  from kernels.ragged_decode import ragged_decode_attention

  def local(q, k_caches, v_caches, segment_ids, lengths):
    return [ragged_decode_attention(q, k, v, segment_ids, lengths, scale=head_dim ** -0.5, block_kv=block_kv,
                                    interpret=False) for k, v in zip(k_caches, v_caches)]

  rows_ = P("data")
  step = jax.shard_map(local, mesh=mesh, in_specs=rows_, out_specs=rows_, check_vma=False)
  arg = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, rows_))
  caches = [arg((slots, kv_heads, max_len, head_dim), dtype) for _ in range(layers)]
  return jax.jit(step).lower(arg((slots, kv_heads, rows, head_dim), dtype), caches, caches,
                             arg((slots, max_len), jnp.int32), arg((slots,), jnp.int32)).compile()


def per_chip_bytes(compiled) -> dict:
  stats = compiled.memory_analysis()
  return dict(argument=stats.argument_size_in_bytes, output=stats.output_size_in_bytes,
              temp=stats.temp_size_in_bytes, code=stats.generated_code_size_in_bytes)
