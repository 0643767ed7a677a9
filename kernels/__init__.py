"""Attention kernels and the one dispatch the model calls.

`attention(q, k, v, *, q_segment_ids, kv_segment_ids, causal, impl)`: q (B, Sq, Hq, D), k/v (B, Skv, Hkv, D),
segment ids (B, S) int32 with 0 = padding; returns (B, Sq, Hq, D). The model never knows which
implementation runs:

- `xla`: plain XLA reference (`kernels.reference`), query-blocked for memory (on the CPU the model
  runs keye_jax/cpu_ops.py's form of it, with a written-out gradient).
- `pallas`: segment-aware flash attention (`kernels.flash_attention`) that visits only the blocks
  sharing a segment; interpret mode automatically when not on TPU. Shapes the blocks do not tile
  (e.g. KV-cache decoding with Sq = 1) fall back to `xla`.
- `auto`: `pallas` on TPU, `xla` elsewhere.

With `mesh` given, the call runs under shard_map as ring attention over the mesh's `context` axis
(`kernels.ring_attention`; size 1 is plain sharded attention), batch split over `data`/`fsdp` and
heads over `tensor` where the mesh has them. Mosaic kernels inside sharded programs need this, so the
`pallas` path also takes the ambient mesh (`jax.set_mesh`, as the trainer and sampler set it) when no
`mesh` is passed: the model stays unaware of meshes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.block_tables import default_positions
from kernels.flash_attention import flash_attention
from kernels.reference import xla_attention
from kernels.ring_attention import ring_attention

IMPLS = ("auto", "xla", "pallas")
LANES, SUBLANES = 128, 8


def compile_platform() -> str:
  """The platform being compiled for: the mesh in context's (ahead-of-time compiles for a TPU topology run
  on a CPU host), else the default backend's."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh is None or mesh.empty else mesh.abstract_device
  return device.platform if device is not None else jax.default_backend()


def _on_tpu() -> bool:
  return compile_platform() == "tpu"


def pallas_blocks(sq: int, skv: int, block_q: int, block_kv: int, *, strict: bool):
  """Block sizes (bq, bkv) the Pallas kernel can use for these lengths, or None (then XLA runs).
  `strict` applies TPU tiling rules: bq a multiple of 8 sublanes, bkv of 128 lanes."""
  bq, bkv = min(block_q, sq), min(block_kv, skv)
  if sq % bq or skv % bkv:
    return None
  if strict and (bq % SUBLANES or bkv % LANES):
    return None
  return bq, bkv


def _pallas_attention(q, k, v, q_segment_ids, kv_segment_ids, *, causal, scale, block_q, block_kv, interpret):
  b, sq, hq, d = q.shape
  skv = k.shape[1]
  blocks = pallas_blocks(sq, skv, block_q, block_kv, strict=not interpret)
  if blocks is None:
    return xla_attention(q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                         causal=causal, scale=scale)
  if q_segment_ids is None:
    q_segment_ids = jnp.ones((b, sq), jnp.int32)
    kv_segment_ids = jnp.ones((b, skv), jnp.int32)
  # Lane-aligned heads (D % 128 == 0, text) are read in place; others (vision D = 72) go heads-major.
  seq_major = d % LANES == 0
  to_kernel = (lambda x: x) if seq_major else (lambda x: x.transpose(0, 2, 1, 3))  # self-inverse
  out = flash_attention(to_kernel(q), to_kernel(k), to_kernel(v), q_segment_ids.astype(jnp.int32),
                        kv_segment_ids.astype(jnp.int32), default_positions(b, sq, skv - sq),
                        default_positions(b, skv), causal=causal, scale=scale, block_q=blocks[0],
                        block_kv=blocks[1], interpret=interpret, seq_major=seq_major)
  return to_kernel(out)


def _mesh_attention(q, k, v, q_segment_ids, kv_segment_ids, *, mesh, impl, causal, scale, block_q,
                    block_kv, interpret):
  names = mesh.axis_names
  size = mesh.shape.get("context", 1)
  batch_axes = tuple(a for a in ("data", "fsdp") if a in names)
  head_axis = "tensor" if "tensor" in names else None
  local_len = q.shape[1] // size
  blocks = pallas_blocks(local_len, local_len, block_q, block_kv, strict=not interpret)
  local_impl = "pallas" if impl == "pallas" and blocks is not None else "xla"
  bq, bkv = blocks or (block_q, block_kv)
  return ring_attention(q, k, v, q_segment_ids, kv_segment_ids, mesh=mesh, causal=causal, scale=scale,
                        axis="context" if "context" in names else None, batch_axes=batch_axes,
                        head_axis=head_axis, impl=local_impl, block_q=bq, block_kv=bkv,
                        interpret=interpret)


def attention(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, causal: bool, impl: str = "auto",
              scale: float | None = None, block_q: int = 512, block_kv: int = 512, mesh=None,
              interpret: bool | None = None):
  """Softmax attention over packed sequences; see the module docstring for `impl` and `mesh`.
  `interpret` (Pallas paths) defaults to "not running on a TPU"; ahead-of-time compiles for a TPU
  topology from a CPU host pass False so the real Mosaic kernels are lowered."""
  if impl not in IMPLS:
    raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
  if impl == "auto":
    impl = "pallas" if _on_tpu() else "xla"
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  interpret = not _on_tpu() if interpret is None else interpret
  if mesh is None and impl == "pallas":
    # Inside a shard_map the ambient axes are already manual: the call is local, leave it so.
    ambient = jax.sharding.get_abstract_mesh()
    if ambient is not None and not ambient.empty and ambient.size > 1 and not ambient.manual_axes:
      mesh = ambient
  if mesh is not None and q.shape[1] == k.shape[1]:
    return _mesh_attention(q, k, v, q_segment_ids, kv_segment_ids, mesh=mesh, impl=impl, causal=causal,
                           scale=scale, block_q=block_q, block_kv=block_kv, interpret=interpret)
  if impl == "xla":
    return xla_attention(q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                         causal=causal, scale=scale)
  return _pallas_attention(q, k, v, q_segment_ids, kv_segment_ids, causal=causal, scale=scale,
                           block_q=block_q, block_kv=block_kv, interpret=interpret)
