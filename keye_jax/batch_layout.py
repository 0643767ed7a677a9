"""Where each batch key keeps its rows: the one table every producer and consumer of batches reads.

Every batch array is (B, ...) with its rows on axis 0, except the 3D M-RoPE position ids:
  position_ids (3, B, S)      batch axis 1
  input_ids, segment_ids, loss_mask, source_ids (B, S); pixel_values (B, P, C*p*p); vision_features
  (B, P, Dv); patch_segment_ids, patch_pos, merge_index, merge_valid (B, P...); any other key, e.g.
  per-token advantages or old log-probs (B, S)             batch axis 0
The batch axis always sits right before the sequence (or patch) axis, so one row, the batch without
its batch axis, has its tokens on that same axis: position_ids (3, S), everything else (S, ...).

Helpers: `stack` rows into a batch, `concat` batches, `take` rows, `microbatches` (the step's
gradient-accumulation split), `partition_spec`/`shardings` over the mesh's batch axes, and `to_global`
(each process's rows -> global jax.Arrays).
"""

from __future__ import annotations

import numpy as np

BATCH_AXIS = {"position_ids": 1}
BATCH_MESH_AXES = ("data", "fsdp")  # the mesh axes rows are split across


def batch_axis(key: str) -> int:
  """The axis of `key`'s arrays that indexes batch rows (and, in one row, its tokens)."""
  return BATCH_AXIS.get(key, 0)


def batch_size(batch: dict) -> int:
  k, v = next(iter(batch.items()))
  return v.shape[batch_axis(k)]


def stack(rows: list[dict]) -> dict:
  """Rows (dicts of numpy arrays, one row each) -> a numpy batch."""
  return {k: np.stack([r[k] for r in rows], axis=batch_axis(k)) for k in rows[0]}


def concat(batches: list[dict]) -> dict:
  """Batches with the same keys -> one batch, rows in order (numpy or jax arrays)."""
  import jax.numpy as jnp
  cat = np.concatenate if all(isinstance(v, np.ndarray) for b in batches for v in b.values()) else jnp.concatenate
  return {k: cat([b[k] for b in batches], axis=batch_axis(k)) for k in batches[0]}


def take(batch: dict, rows) -> dict:
  """The batch's rows `rows` (a slice or integer indices)."""
  return {k: v[(slice(None),) * batch_axis(k) + (rows,)] for k, v in batch.items()}


def microbatches(batch: dict, n: int) -> dict:
  """(B, ...) -> (n, B/n, ...) with microbatch i = rows i, i+n, i+2n, ...: each microbatch stays spread
  over the devices the batch is split across. position_ids (3, B, S) -> (n, 3, B/n, S)."""
  out = {}
  for k, v in batch.items():
    a = batch_axis(k)
    split = v.reshape(*v.shape[:a], v.shape[a] // n, n, *v.shape[a + 1:])  # rows r*n + i
    out[k] = _move_axis(split, a + 1, 0)
  return out


def _move_axis(x, src: int, dst: int):
  perm = list(range(x.ndim))
  perm.insert(dst, perm.pop(src))
  return x.transpose(perm)


def mesh_batch_axes(mesh) -> tuple[str, ...] | None:
  """The mesh axes rows are split across (those of BATCH_MESH_AXES the mesh has), or None (replicated)."""
  return tuple(a for a in BATCH_MESH_AXES if a in mesh.axis_names) or None


def partition_spec(key: str, axes):
  """PartitionSpec of `key`'s arrays with rows split over the mesh axes `axes` (None: replicated)."""
  from jax.sharding import PartitionSpec
  return PartitionSpec(*(None,) * batch_axis(key), axes)


def shardings(keys, mesh) -> dict:
  """{key: NamedSharding} with rows split over the mesh's batch axes."""
  from jax.sharding import NamedSharding
  axes = mesh_batch_axes(mesh)
  return {k: NamedSharding(mesh, partition_spec(k, axes)) for k in keys}


def to_global(batch: dict, mesh, process_count: int | None = None) -> dict:
  """Each process's rows (numpy, the same shapes in every process) -> global jax.Arrays, the processes'
  rows concatenated in process order and split over the mesh's batch axes."""
  import jax
  n = jax.process_count() if process_count is None else process_count
  sh = shardings(list(batch), mesh)
  out = {}
  for k, v in batch.items():
    shape = list(v.shape)
    shape[batch_axis(k)] *= n
    out[k] = jax.make_array_from_process_local_data(sh[k], v, tuple(shape))
  return out
