"""Ring attention: context parallelism over a mesh axis with shard_map and collective permutes.

The sequence is split over the `context` axis. Each device keeps its queries and passes its keys and
values (with their segment ids and positions) around the ring; at every step it attends its queries
to the visiting chunk with the local kernel (Pallas on TPU, the XLA twin on CPU) and folds the result
into a running output with log-sum-exp weights. The backward pass walks the ring again: dq stays home,
dk and dv accumulators travel with their keys and arrive back at their owner after a full turn, so no
device ever holds more than two chunks of K/V.

Causal load balancing: a contiguous split gives the last device all the work. With `load_balance`
the sequence is cut into 2N chunks and device d holds chunks d and 2N-1-d (zig-zag), so every device
has the same share of the causal triangle; the chunks are moved there by collective permutes. Causality uses explicit positions, so the kernels need no
knowledge of the layout, and the per-step block tables skip the chunk pairs that are all in the future.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from kernels.flash_attention import flash_bwd, flash_fwd
from kernels import reference


def zigzag_order(length: int, num_devices: int) -> np.ndarray:
  """Permutation (new position -> old index) giving device d the chunks d and 2N-1-d of 2N."""
  if length % (2 * num_devices):
    raise ValueError(f"sequence length {length} is not a multiple of 2 x {num_devices} devices")
  chunks = np.arange(length).reshape(2 * num_devices, -1)
  return np.concatenate([np.concatenate([chunks[d], chunks[2 * num_devices - 1 - d]])
                         for d in range(num_devices)])


def _zigzag(x, axis: str, size: int, inverse: bool = False):
  """Inside shard_map: this device's contiguous chunks (2d, 2d+1 of 2N, split on dim 1) -> its zig-zag
  chunks (d, 2N-1-d), or back with `inverse`. Two collective permutes of half a local block each: a
  gather by `zigzag_order` on the sharded sequence would make every device hold the whole sequence.

  Chunk j goes to device j (first half) if j < N, else to device 2N-1-j (second half). The chunks in
  slot 0 (j = 2e) land on distinct devices, as do those in slot 1; an even device receives its first
  half from slot 0, an odd one from slot 1."""
  n = size
  to0 = [(e, 2 * e if 2 * e < n else 2 * n - 1 - 2 * e) for e in range(n)]
  to1 = [(e, 2 * e + 1 if 2 * e + 1 < n else 2 * n - 2 - 2 * e) for e in range(n)]
  back = lambda pairs: [(b, a) for a, b in pairs]
  even = jax.lax.axis_index(axis) % 2 == 0
  first, second = jnp.split(x, 2, axis=1)
  if not inverse:
    r0, r1 = jax.lax.ppermute(first, axis, to0), jax.lax.ppermute(second, axis, to1)
    return jnp.where(even, jnp.concatenate([r0, r1], 1), jnp.concatenate([r1, r0], 1))
  s0, s1 = jnp.where(even, first, second), jnp.where(even, second, first)
  return jnp.concatenate([jax.lax.ppermute(s0, axis, back(to0)), jax.lax.ppermute(s1, axis, back(to1))], 1)


def _step_fns(impl: str, causal: bool, scale: float, block_q: int, block_kv: int, interpret: bool):
  """(forward -> (out, lse), backward -> (dq, dk, dv)) for one chunk pair, in kernel layout."""
  if impl == "pallas":
    kw = dict(causal=causal, scale=scale, block_q=block_q, block_kv=block_kv, interpret=interpret)
    return functools.partial(flash_fwd, **kw), functools.partial(flash_bwd, **kw)
  kw = dict(causal=causal, scale=scale)
  return (functools.partial(reference.attention_fwd_lse, **kw),
          functools.partial(reference.attention_bwd, **kw))


def _ring_fwd(q, k, v, q_seg, kv_seg, q_pos, kv_pos, *, axis, size, step_fwd):
  """Local chunks in kernel layout -> (out (B, Hq, s, D) float32, lse (B, Hq, s)).

  The ring is a loop, not unrolled: unrolled, XLA runs every step's kernel before folding any result
  in, so all `size` partial outputs are live at once (1 GiB per layer at 128K over 16 devices)."""
  shift = [(i, (i + 1) % size) for i in range(size)]

  def fold(out, lse, visiting):
    out_s, lse_s = step_fwd(q, visiting[0], visiting[1], q_seg, visiting[2], q_pos, visiting[3])
    lse_new = jnp.logaddexp(lse, lse_s)
    out = (out * jnp.exp(lse - lse_new)[..., None]
           + out_s.astype(jnp.float32) * jnp.exp(lse_s - lse_new)[..., None])
    return out, lse_new

  def step(_, carry):
    out, lse, visiting = carry
    out, lse = fold(out, lse, visiting)
    return out, lse, jax.lax.ppermute(visiting, axis, shift)

  out = jnp.zeros(q.shape, jnp.float32)
  lse = jnp.full(q.shape[:-1], reference.MASK_VALUE, jnp.float32)
  visiting = (k, v, kv_seg, kv_pos)
  # The last step keeps its visitor: no permute after it.
  if size > 1:
    out, lse, visiting = jax.lax.fori_loop(0, size - 1, step, (out, lse, visiting))
  return fold(out, lse, visiting)


def _make_ring(axis: str, size: int, step_fwd, step_bwd):
  shift = [(i, (i + 1) % size) for i in range(size)]

  @jax.custom_vjp
  def ring(q, k, v, q_seg, kv_seg, q_pos, kv_pos):
    out, _ = _ring_fwd(q, k, v, q_seg, kv_seg, q_pos, kv_pos, axis=axis, size=size, step_fwd=step_fwd)
    return out.astype(q.dtype)

  def fwd(q, k, v, q_seg, kv_seg, q_pos, kv_pos):
    out, lse = _ring_fwd(q, k, v, q_seg, kv_seg, q_pos, kv_pos, axis=axis, size=size, step_fwd=step_fwd)
    out = out.astype(q.dtype)
    return out, (q, k, v, q_seg, kv_seg, q_pos, kv_pos, out, lse)

  def bwd(res, do):
    q, k, v, q_seg, kv_seg, q_pos, kv_pos, out, lse = res
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)

    def accumulate(dq, dk, dv, visiting):
      dq_s, dk_s, dv_s = step_bwd(q, visiting[0], visiting[1], q_seg, visiting[2], q_pos, visiting[3],
                                  lse, do, delta)
      dq = dq + dq_s
      # The accumulators follow their keys; after `size` shifts they are back with their owner.
      dk, dv = dk + dk_s, dv + dv_s
      if size > 1:
        dk, dv = jax.lax.ppermute((dk, dv), axis, shift)
      return dq, dk, dv

    def step(_, carry):  # a loop, like the forward ring, so one step's gradients are live at a time
      dq, dk, dv, visiting = carry
      dq, dk, dv = accumulate(dq, dk, dv, visiting)
      return dq, dk, dv, jax.lax.ppermute(visiting, axis, shift)

    carry = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32),
             (k, v, kv_seg, kv_pos))
    if size > 1:
      carry = jax.lax.fori_loop(0, size - 1, step, carry)
    dq, dk, dv = accumulate(*carry)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None

  ring.defvjp(fwd, bwd)
  return ring


def ring_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, *, mesh, causal: bool,
                   scale: float | None = None, axis: str = "context", batch_axes=(), head_axis=None,
                   impl: str = "xla", load_balance: bool = True, block_q: int = 512,
                   block_kv: int = 512, interpret: bool = False):
  """Self-attention over a sequence sharded on `axis` of `mesh`; model layout (B, S, H, D) in and out.

  `batch_axes` / `head_axis` name mesh axes the batch and head dimensions are split over (each device
  then works on its own batch rows and heads). `impl` is the per-step local attention: "pallas" (the
  Pallas kernels; `interpret` for CPU) or "xla".
  """
  b, s, hq, d = q.shape
  if k.shape[1] != s:
    raise ValueError("ring attention is self-attention: queries and keys must have the same length")
  if q_segment_ids is None:
    q_segment_ids = kv_segment_ids = jnp.ones((b, s), jnp.int32)
  size = mesh.shape[axis] if axis else 1
  scale = d ** -0.5 if scale is None else scale
  positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  operands = (q, k, v, q_segment_ids, kv_segment_ids, positions)
  balance = load_balance and causal and size > 1
  if balance:
    zigzag_order(s, size)  # checks the length splits into 2 x size chunks

  step_fwd, step_bwd = _step_fns(impl, causal, scale, block_q, block_kv, interpret)
  ring = _make_ring(axis, size, step_fwd, step_bwd)
  batch = tuple(batch_axes) or None

  def local(q, k, v, q_seg, kv_seg, pos):
    if balance:
      q, k, v, q_seg, kv_seg, pos = (_zigzag(x, axis, size) for x in (q, k, v, q_seg, kv_seg, pos))
    to_kernel = lambda x: x.transpose(0, 2, 1, 3)  # (B, s, H, D) <-> (B, H, s, D)
    out = to_kernel(ring(to_kernel(q), to_kernel(k), to_kernel(v), q_seg, kv_seg, pos, pos))
    return _zigzag(out, axis, size, inverse=True) if balance else out

  act, ids = P(batch, axis, head_axis, None), P(batch, axis)
  return jax.shard_map(local, mesh=mesh, in_specs=(act, act, act, ids, ids, ids), out_specs=act,
                       check_vma=False)(*operands)
