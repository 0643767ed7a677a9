"""Attention kernels and the one dispatch the model calls.

`attention(q, k, v, *, q_segment_ids, kv_segment_ids, causal, impl)`: q (B, S, Hq, D), k/v (B, S, Hkv, D),
segment ids (B, S) int32 with 0 = padding; returns (B, S, Hq, D). The model never knows which
implementation runs.
"""

from __future__ import annotations

import jax

from kernels.reference import xla_attention

IMPLS = ("auto", "xla", "pallas", "splash")


def attention(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, causal: bool, impl: str = "auto",
              scale: float | None = None):
  if impl not in IMPLS:
    raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    impl = "pallas" if jax.default_backend() == "tpu" else "xla"
  if impl == "xla":
    return xla_attention(q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                         causal=causal, scale=scale)
  raise NotImplementedError(f"attention impl {impl!r} is not built yet")
