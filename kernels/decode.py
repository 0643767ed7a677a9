"""Decode-time attention over a KV cache: a few queries per row against that row's filled cache slots.

`cache_attention(q, k_cache, v_cache, segment_ids, lengths, *, scale, impl)`:
  q           (B, Hkv, R, D)   R query rows per KV head (G query heads x the step's new tokens)
  k_cache/v   (B, Hkv, T, D)   heads-major cache, as the decoder keeps it
  segment_ids (B, T) int32     0 = empty or padding slot
  lengths     (B,) int32       slots at and after lengths[b] are never valid (the row's write index):
                               a kernel need not read them
returns (out (B, Hkv, R, D) float32, the softmax over the row's valid slots; lse (B, Hkv, R) float32, the
log-sum-exp of the scaled scores), so the caller can merge in the new tokens' own keys (see
`merge_new_tokens`). A row with no valid slot gives out 0 and lse NO_KEYS.

- `xla`: plain XLA (einsum; what TPU/GPU run without Pallas, and the reference kernels are tested against).
  XLA CPU runs keye_jax/cpu_ops.py's multiply-reduce form of the same maths (~10x faster there).
- `pallas`: the ragged TPU kernel (`kernels.ragged_decode`): blocks at or after `lengths` are never read.
- `auto`: `pallas` on TPU, `xla` elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

NO_KEYS = -1e30       # lse of a row without valid slots: exp(NO_KEYS - m) is an exact 0 for any real m
IMPLS = ("auto", "xla", "pallas")


def valid_slots(segment_ids, lengths, t: int):
  """(B, T) bool: a non-empty slot before the row's length."""
  return (segment_ids != 0) & (jnp.arange(t)[None, :] < jnp.reshape(lengths, (-1, 1)))


def xla_cache_attention(q, k_cache, v_cache, segment_ids, lengths, *, scale):
  t = k_cache.shape[2]
  s = jnp.einsum("bhrd,bhtd->bhrt", q, k_cache.astype(q.dtype), preferred_element_type=jnp.float32) * scale
  ok = valid_slots(segment_ids, lengths, t)[:, None, None, :]
  return softmax_parts(jnp.where(ok, s, NO_KEYS), ok, v_cache,
                       lambda p, v: jnp.einsum("bhrt,bhtd->bhrd", p, v, preferred_element_type=jnp.float32))


def softmax_parts(s, ok, v_cache, pv):
  """(softmax(s) over valid slots @ v, log-sum-exp) from masked fp32 scores s (B, H, R, T)."""
  m = jnp.max(s, axis=-1, keepdims=True)
  e = jnp.where(ok, jnp.exp(s - m), 0.0)
  l = jnp.sum(e, axis=-1, keepdims=True)
  out = pv((e / jnp.maximum(l, 1e-30)).astype(v_cache.dtype), v_cache)
  lse = jnp.where(l[..., 0] > 0, m[..., 0] + jnp.log(jnp.maximum(l[..., 0], 1e-30)), NO_KEYS)
  return out.astype(jnp.float32), lse


def merge_new_tokens(out_c, lse_c, s_new, v_new):
  """Merges the cache part with the new tokens' own keys in one softmax.
  out_c (B, H, R, D), lse_c (B, H, R); s_new (B, H, R, s) masked scaled fp32 scores of the new tokens;
  v_new (B, H, s, D). Returns (B, H, R, D) float32."""
  m = jnp.maximum(lse_c, jnp.max(s_new, axis=-1))
  w_c = jnp.exp(lse_c - m)
  e = jnp.exp(s_new - m[..., None])
  num = w_c[..., None] * out_c + jnp.einsum("bhrs,bhsd->bhrd", e, v_new.astype(jnp.float32))
  return num / (w_c + jnp.sum(e, axis=-1))[..., None]


def cache_attention(q, k_cache, v_cache, segment_ids, lengths, *, scale: float, impl: str = "auto",
                    interpret: bool | None = None):
  """See the module docstring."""
  if impl not in IMPLS:
    raise ValueError(f"decode attention impl must be one of {IMPLS}, got {impl!r}")
  from kernels import compile_platform
  on_tpu = compile_platform() == "tpu"
  if impl == "auto":
    impl = "pallas" if on_tpu else "xla"
  lengths = jnp.broadcast_to(jnp.asarray(lengths, jnp.int32), (q.shape[0],))
  if impl == "xla":
    return xla_cache_attention(q, k_cache, v_cache, segment_ids, lengths, scale=scale)
  from kernels.ragged_decode import ragged_decode_attention
  kernel = lambda *a: ragged_decode_attention(*a, scale=scale,
                                              interpret=(not on_tpu) if interpret is None else interpret)
  # Mosaic kernels are not partitioned automatically: inside a sharded program (the rollout engine's
  # slots over data/fsdp, KV heads over tensor) the kernel runs per shard under shard_map.
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.size == 1 or mesh.manual_axes:
    return kernel(q, k_cache, v_cache, segment_ids, lengths)
  rows = tuple(a for a in ("data", "fsdp") if a in mesh.shape and mesh.shape[a] > 1) or None
  heads = "tensor" if mesh.shape.get("tensor", 1) > 1 else None
  bh, b = P(rows, heads), P(rows)
  return jax.shard_map(kernel, in_specs=(bh, bh, bh, b, b), out_specs=(bh, bh), check_vma=False)(
      q, k_cache, v_cache, segment_ids, lengths)
