"""JAX's own splash attention behind our signature: the comparison baseline.

Splash takes a static mask (causal or full) and dynamic segment ids; it skips blocks only where the
static mask is empty, so for packed data it visits the whole square (bidirectional) or triangle
(causal). Our conventions are adapted around it: the softmax scale is folded into q, head_dim is
zero-padded to a multiple of 128 lanes, and padding queries (segment 0, which splash lets attend to
other padding) are zeroed afterwards.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

LANES = 128


def make_kernel(num_heads: int, q_len: int, kv_len: int, *, causal: bool, block_q: int = 512,
                block_kv: int = 512, interpret: bool = False):
  shape = (q_len, kv_len)
  head_mask = splash.CausalMask(shape) if causal else splash.FullMask(shape)
  block_q, block_kv = min(block_q, q_len), min(block_kv, kv_len)
  sizes = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                            block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                            block_q_dq=block_q, block_kv_dq=block_kv)
  return splash.make_splash_mha(splash.MultiHeadMask([head_mask] * num_heads), block_sizes=sizes,
                                head_shards=1, q_seq_shards=1, interpret=interpret)


def visited_blocks(kernel) -> int:
  """Key blocks the forward kernel computes, summed over query blocks, from splash's own mask info."""
  block_mask = kernel.fwd_mask_info.block_mask  # (heads or 1, nq, nk); all our heads share one mask
  return int((block_mask[0] > 0).sum())


def splash_attention(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, causal: bool, scale=None,
                     block_q: int = 512, block_kv: int = 512, interpret: bool = False):
  """Model layout (B, S, H, D) in and out, like `kernels.attention`."""
  b, sq, hq, d = q.shape
  scale = d ** -0.5 if scale is None else scale
  if q_segment_ids is None:
    q_segment_ids = jnp.ones((b, sq), jnp.int32)
    kv_segment_ids = jnp.ones((b, k.shape[1]), jnp.int32)
  pad = (-d) % LANES
  widen = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, pad))).transpose(0, 2, 1, 3)
  kernel = make_kernel(hq, sq, k.shape[1], causal=causal, block_q=block_q, block_kv=block_kv,
                       interpret=interpret)
  per_row = lambda q_, k_, v_, qs, ks: kernel(q_, k_, v_, segment_ids=splash.SegmentIds(qs, ks))
  out = jax.vmap(per_row)(widen(q * jnp.asarray(scale, q.dtype)), widen(k), widen(v), q_segment_ids,
                          kv_segment_ids)
  out = out.transpose(0, 2, 1, 3)[..., :d]
  return jnp.where((q_segment_ids != 0)[:, :, None, None], out, 0).astype(q.dtype)
