"""XLA CPU's forms of the platform operations (see keye_jax/ops.py, which picks them): the same maths
as the plain forms, with gradients and layouts written for XLA CPU, plus the CPU's compiler options and
host-memory setting. Every function here is tested against the plain form's autodiff.

Why: XLA CPU hands a matmul to YNNPACK, its fast matmul library, only when the left operand contracts
its last dim (~430 vs ~350 GFLOP/s for Eigen here), and its YNNPACK fusions never duplicate a value two
fusions read, so generic gradients become extra passes over memory.
  matmul           one row dim, weight gradient on an explicit x^T                  (`rows_matmul`)
  rms_norm         written-out gradient, reductions as matrix-vector products       (`rms_norm`)
  apply_rope       gradient = RoPE with -sin                                        (`apply_rope`)
  attention        written-out VJP; causal self-attention split in halves           (`attention`)
  target_logit     a gather, its gradient a scatter (a few thousand elements)      (`target_logit`)
  compiler options YNNPACK also runs elementwise ops                               (`COMPILER_OPTIONS`)
  host memory      freed host memory kept and reused by `keye train`               (`prepare_host`)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import kernels
from kernels import decode
from keye_jax import host_memory, rope
from keye_jax.ops import Ops, rms_norm_parts

# XLA CPU also hands elementwise ops to YNNPACK (its default is matmuls and reductions only), which
# then runs the transposes, normalisations and activations around the matmuls: ~5% off the CPU step.
COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ",".join(
    "LIBRARY_FUSION_TYPE_" + t for t in ("DOT", "INDIVIDUAL_DOT", "REDUCE", "ELTWISE"))}


def prepare_host() -> bool:
  """For training on the CPU: keep freed host memory mapped for reuse (keye_jax/host_memory.py; must run
  before JAX creates its CPU client). Does nothing (False) when JAX will not run on the CPU."""
  return host_memory.runs_on_cpu() and host_memory.keep_freed_memory()


# ---- matmul ----------------------------------------------------------------------------------------


def rows_matmul(x, w, preferred_element_type=None):
  """x (..., K) @ w (K, N) as a matmul over one row dim (the leading dims flattened), with a written-out
  gradient so that every matmul of the training step runs on YNNPACK (see `_rows_dot`)."""
  y_rn = _rows_dot(x.reshape(-1, x.shape[-1]), w, preferred_element_type)
  return y_rn.reshape(*x.shape[:-1], w.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rows_dot(x_rk, w_kn, out_dtype):
  """x (R, K) @ w (K, N) -> (R, N).

  The generic gradient contracts x over its rows for the weight gradient (x^T dy), which then runs on
  the slower Eigen path. Here the weight gradient multiplies an explicit x^T instead (one cheap
  transpose; the barrier stops XLA folding it back into the matmul)."""
  return jnp.dot(x_rk, w_kn, preferred_element_type=out_dtype)


def _rows_dot_fwd(x_rk, w_kn, out_dtype):
  return _rows_dot(x_rk, w_kn, out_dtype), (x_rk, w_kn)


def _rows_dot_bwd(out_dtype, res, dy_rn):
  x_rk, w_kn = res
  dx_rk = jax.lax.dot_general(dy_rn, w_kn, (((1,), (1,)), ((), ())), preferred_element_type=x_rk.dtype)
  x_kr = jax.lax.optimization_barrier(x_rk.T)
  dw_kn = jax.lax.dot_general(x_kr, dy_rn, (((1,), (0,)), ((), ())), preferred_element_type=w_kn.dtype)
  return dx_rk, dw_kn


_rows_dot.defvjp(_rows_dot_fwd, _rows_dot_bwd)


# ---- RMSNorm ---------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x, scale, eps):
  """`ops.rms_norm_parts`'s output with a gradient written for XLA CPU.

  XLA CPU's YNNPACK fusions never duplicate a value that two fusions read (the norm's rsqrt, the
  scale broadcast to x's shape, dy * scale): each becomes an array of its own, and the generic
  gradient of one norm took 11 passes over (rows, D). Here the two row/column reductions of the
  gradient are matrix-vector products and each elementwise pass reads only x, dy and small vectors
  (measured: fwd+bwd of (2048, 512) 1.1 -> 0.55 ms)."""
  return _rms_norm_fwd(x, scale, eps)[0]


def _rms_norm_fwd(x, scale, eps):
  y, r = rms_norm_parts(x, scale, eps)
  return y, (x, scale, r)


def _rms_norm_bwd(eps, res, dy):
  x, scale, r = res
  # Fresh values, so their broadcasts are not shared with the forward's (see above).
  scale, r = jax.lax.optimization_barrier((scale, r))
  x32, dy32, s32 = x.astype(jnp.float32), dy.astype(jnp.float32), scale.astype(jnp.float32)
  t = dy32 * x32
  # dx = r * (dy*s - x * r^2 * mean(dy*s*x)); dscale = sum over rows of dy * x * r.
  c = jnp.einsum("...d,d->...", t, s32)[..., None] * (r * r / x.shape[-1])
  dscale = jnp.einsum("...,...d->d", r[..., 0], t)
  dx = r * (dy32 * s32 - x32 * c)
  return dx.astype(x.dtype), dscale.astype(scale.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


# ---- RoPE ------------------------------------------------------------------------------------------


@jax.custom_vjp
def apply_rope(x_bshd, cos_bsd, sin_bsd):
  """`rope.apply_rope` whose gradient is the inverse rotation, RoPE with -sin (cos/sin must repeat their
  first half in the second, as both of rope.py's tables do): the generic one turns the halves' slices
  into pads and adds (~1.5% of the CPU training step). cos/sin get no gradient (integer positions)."""
  return rope.apply_rope(x_bshd, cos_bsd, sin_bsd)


def _apply_rope_fwd(x_bshd, cos_bsd, sin_bsd):
  return rope.apply_rope(x_bshd, cos_bsd, sin_bsd), (cos_bsd, sin_bsd)


def _apply_rope_bwd(res, dy_bshd):
  cos_bsd, sin_bsd = res
  return rope.apply_rope(dy_bshd, cos_bsd, -sin_bsd), jnp.zeros_like(cos_bsd), jnp.zeros_like(sin_bsd)


apply_rope.defvjp(_apply_rope_fwd, _apply_rope_bwd)


# ---- cross-entropy's target logit --------------------------------------------------------------------


def target_logit(logits, targets):
  return jnp.take_along_axis(logits, targets[..., None], axis=-1, mode="clip")[..., 0]


def subtract_at_target(d, targets, g):
  rows = d.reshape(-1, d.shape[-1])
  rows = rows.at[jnp.arange(rows.shape[0]), targets.reshape(-1)].add(-g.reshape(-1), mode="clip")
  return rows.reshape(d.shape)


# ---- attention -------------------------------------------------------------------------------------


def attention(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, causal: bool, impl: str = "auto",
              scale: float | None = None, block_q: int = 512, mesh=None, **kw):
  """`kernels.attention`; its XLA path (impl auto or xla, no mesh) as `xla_attention` below."""
  if mesh is not None or impl not in ("auto", "xla"):
    return kernels.attention(q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, causal=causal,
                             impl=impl, scale=scale, block_q=block_q, mesh=mesh, **kw)
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
  return xla_attention(q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, causal=causal,
                       scale=scale, block_q=block_q)


def xla_attention(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, causal: bool, scale=None,
                  block_q: int = 512):
  """kernels.reference.xla_attention's numbers, with `_grouped_attention`'s written-out gradient and
  causal self-attention of 256..block_q queries split in halves: the first half of the queries sees only
  the first half of the keys, so it skips the masked quarter of the score matrix."""
  b, sq, hq, d = q.shape
  skv, hkv = k.shape[1], k.shape[2]
  if hq % hkv:
    raise ValueError(f"query heads {hq} are not a multiple of kv heads {hkv}")
  g = hq // hkv
  scale = d ** -0.5 if scale is None else scale
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

  def block(q_blk, q_seg_blk, q_offset, kv_len=skv):
    """Queries q_offset .. q_offset + Tq against the first kv_len keys."""
    tq = q_blk.shape[1]
    qh = q_blk.reshape(b, tq, hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * tq, d)
    mask = jnp.ones((1, tq, kv_len), dtype=bool)
    if q_seg_blk is not None:
      kv_seg = kv_segment_ids[:, :kv_len]
      mask = (q_seg_blk[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] != 0)
    if causal:
      q_pos = q_offset + jnp.arange(tq)[:, None] + (skv - sq)
      mask = mask & (q_pos >= jnp.arange(kv_len)[None, :])[None]
    out = _grouped_attention(qh, kh[:, :, :kv_len], vh[:, :, :kv_len], mask[:, None, None], scale)
    return out.reshape(b, hkv, g, tq, d).transpose(0, 3, 1, 2, 4).reshape(b, tq, hq, d).astype(q.dtype)

  if causal and sq == skv and sq % 2 == 0 and 256 <= sq <= block_q:
    half = sq // 2
    seg = (None, None) if q_segment_ids is None else (q_segment_ids[:, :half], q_segment_ids[:, half:])
    return jnp.concatenate([block(q[:, :half], seg[0], 0, kv_len=half), block(q[:, half:], seg[1], half)],
                           axis=1)
  if sq <= block_q or sq % block_q:
    return block(q, q_segment_ids, 0)
  n = sq // block_q
  q_blocks = q.reshape(b, n, block_q, hq, d).swapaxes(0, 1)
  seg_blocks = None if q_segment_ids is None else q_segment_ids.reshape(b, n, block_q).swapaxes(0, 1)
  offsets = jnp.arange(n) * block_q
  body = jax.checkpoint(lambda args: block(*args))  # keep backward memory blockwise too
  out = jax.lax.map(body, (q_blocks, seg_blocks, offsets))
  return out.swapaxes(0, 1).reshape(b, sq, hq, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _grouped_attention(qh, kh, vh, mask, scale):
  """kernels.reference.grouped_attention (qh (B, H, G*Tq, D), kh, vh (B, H, Skv, D), mask broadcasting
  against (B, H, G, Tq, Skv)) with its gradient written out so that every matmul, forward and backward,
  is a batched product over rows or keys with only (rows, D) operands ever transposed: the generic
  gradient contracts over (G, Tq) and makes XLA CPU copy the (Tq, Skv) probabilities transposed, several
  times per layer."""
  return _grouped_attention_fwd(qh, kh, vh, mask, scale)[0]


def _grouped_attention_fwd(qh, kh, vh, mask, scale):
  b, h, m, _ = qh.shape
  tq, skv = mask.shape[-2:]
  s = jnp.einsum("bhmd,bhkd->bhmk", qh, kh, preferred_element_type=jnp.float32)
  s = s.reshape(b, h, m // tq, tq, skv) * scale
  row_max = jnp.max(jnp.where(mask, s, -jnp.inf), axis=-1, keepdims=True)
  e = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(row_max), row_max, 0.0)), 0.0)
  l = e.sum(-1, keepdims=True)
  p = (e * jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)).reshape(b, h, m, skv)
  out = jnp.einsum("bhmk,bhkd->bhmd", p.astype(vh.dtype), vh, preferred_element_type=jnp.float32)
  return out, (qh, kh, vh, p, out)


def _grouped_attention_bwd(scale, res, d_out):
  qh, kh, vh, p, out = res
  delta = jnp.sum(d_out * out, axis=-1, keepdims=True)
  dp = jnp.einsum("bhmd,bhkd->bhmk", d_out.astype(vh.dtype), vh, preferred_element_type=jnp.float32)
  ds = p * (dp - delta)
  dq = jnp.einsum("bhmk,bhkd->bhmd", ds.astype(kh.dtype), kh, preferred_element_type=jnp.float32) * scale
  # Key and value gradients as (D, Skv) = (D, rows) @ (rows, Skv), then transposed (small). The
  # barriers keep both transposes explicit: folded into the matmul, XLA CPU would contract the left
  # operand over a leading dim, which YNNPACK does not take (see `_rows_dot`).
  bar = jax.lax.optimization_barrier
  dk = jnp.einsum("bhdm,bhmk->bhdk", bar(qh.swapaxes(2, 3)), ds.astype(qh.dtype),
                  preferred_element_type=jnp.float32) * scale
  dv = jnp.einsum("bhdm,bhmk->bhdk", bar(d_out.astype(vh.dtype).swapaxes(2, 3)), p.astype(vh.dtype),
                  preferred_element_type=jnp.float32)
  dk, dv = bar((dk, dv))
  return (dq.astype(qh.dtype), dk.swapaxes(2, 3).astype(kh.dtype), dv.swapaxes(2, 3).astype(vh.dtype), None)


_grouped_attention.defvjp(_grouped_attention_fwd, _grouped_attention_bwd)


# ---- decode-time cache attention -------------------------------------------------------------------


def cache_attention(q, k_cache, v_cache, segment_ids, lengths, *, scale: float, impl: str = "auto", **kw):
  """`kernels.decode.cache_attention`; its XLA path as multiply-reduce loops instead of matmuls. With one
  query row per head, XLA CPU runs the einsum form as thousands of tiny matmuls (measured: 200 ms per
  decode step of 32 rows x 768 slots x 8 layers); as fused multiply-reduce passes it reads the cache at
  about the memory's speed (22 ms)."""
  if impl not in ("auto", "xla"):
    return decode.cache_attention(q, k_cache, v_cache, segment_ids, lengths, scale=scale, impl=impl, **kw)
  lengths = jnp.broadcast_to(jnp.asarray(lengths, jnp.int32), (q.shape[0],))
  f32 = jnp.float32
  s = jnp.sum(q.astype(f32)[:, :, :, None, :] * k_cache.astype(f32)[:, :, None, :, :], axis=-1) * scale
  ok = decode.valid_slots(segment_ids, lengths, k_cache.shape[2])[:, None, None, :]
  pv = lambda p, v: jnp.sum(p.astype(f32)[..., None] * v.astype(f32)[:, :, None, :, :], axis=-2)
  return decode.softmax_parts(jnp.where(ok, s, decode.NO_KEYS), ok, v_cache, pv)


CPU = Ops("cpu", matmul=rows_matmul, rms_norm=rms_norm, apply_rope=apply_rope, attention=attention,
          cache_attention=cache_attention, target_logit=target_logit, subtract_at_target=subtract_at_target, compiler_options=COMPILER_OPTIONS)
