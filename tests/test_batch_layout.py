"""keye_jax.batch_layout: rows stack on each key's batch axis, and microbatches, row selection and
concatenation agree with doing the same row by row."""

import jax
import numpy as np

from keye_jax import batch_layout
from keye_jax.sharding import make_mesh


def _rows(n, s=6, seed=0):
  rng = np.random.default_rng(seed)
  return [{"input_ids": rng.integers(0, 99, s).astype(np.int32),
           "position_ids": rng.integers(0, 99, (3, s)).astype(np.int32),
           "pixel_values": rng.random((4, 5)).astype(np.float32),
           "advantages": rng.random(s).astype(np.float32)} for _ in range(n)]


def _row(batch, i):
  return {k: np.take(v, i, axis=batch_layout.batch_axis(k)) for k, v in batch.items()}


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_stack_take_concat():
  rows = _rows(6)
  b = batch_layout.stack(rows)
  assert b["position_ids"].shape == (3, 6, 6) and b["input_ids"].shape == (6, 6)
  assert b["pixel_values"].shape == (6, 4, 5) and b["advantages"].shape == (6, 6)
  assert b["position_ids"].flags.c_contiguous and batch_layout.batch_size(b) == 6
  for i, r in enumerate(rows):
    _same(_row(b, i), r)
  _same(batch_layout.take(b, [4, 1]), batch_layout.stack([rows[4], rows[1]]))
  _same(batch_layout.concat([batch_layout.stack(rows[:2]), batch_layout.stack(rows[2:])]), b)
  jb = {k: jax.numpy.asarray(v) for k, v in b.items()}
  _same(batch_layout.concat([batch_layout.take(jb, slice(0, 3)), batch_layout.take(jb, slice(3, 6))]), b)


def test_microbatch_i_holds_rows_i_i_plus_n():
  rows = _rows(6, seed=1)
  micro = batch_layout.microbatches(batch_layout.stack(rows), 3)
  assert micro["position_ids"].shape == (3, 3, 2, 6) and micro["input_ids"].shape == (3, 2, 6)
  for i in range(3):
    _same({k: v[i] for k, v in micro.items()}, batch_layout.stack(rows[i::3]))


def test_shardings_and_to_global():
  mesh = make_mesh({"fsdp": 1}, jax.devices()[:1])
  spec = lambda k: batch_layout.shardings([k], mesh)[k].spec
  assert spec("position_ids") == jax.sharding.PartitionSpec(None, ("data", "fsdp"))
  assert spec("input_ids") == jax.sharding.PartitionSpec(("data", "fsdp"))
  b = batch_layout.stack(_rows(2, seed=2))
  g = batch_layout.to_global(b, mesh)
  _same(g, b)
  assert g["position_ids"].sharding.spec == spec("position_ids")
