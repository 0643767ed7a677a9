"""Large arrays reuse memory only once nothing references it (keye_jax/processing/buffer_pool.py)."""

import numpy as np

from keye_jax.processing import buffer_pool


def _address(a):
  return a.__array_interface__["data"][0]


def test_a_dropped_array_is_reused_and_a_held_view_prevents_it():
  shape = (8, 3, 720, 1280)                         # 22 MB: pooled
  a = buffer_pool.empty(shape)
  a[:] = 7
  first = _address(a)
  keep = a[2]                                       # a view keeps the memory in use
  del a
  b = buffer_pool.empty(shape)
  second = _address(b)
  assert second != first
  b[:] = 1
  assert (keep == 7).all()                          # untouched by the new array
  del b
  assert _address(buffer_pool.empty(shape)) == second   # b's memory is free again
  del keep
  reused = {_address(buffer_pool.empty(shape)) for _ in range(3)}
  assert reused == {second}                         # dropped at once each time: the same warm memory


def test_dtype_shape_and_small_arrays():
  a = buffer_pool.empty((1 << 22,), np.float32)
  assert a.dtype == np.float32 and a.shape == (1 << 22,)
  small = buffer_pool.empty((10, 10), np.uint8)
  assert small.shape == (10, 10) and small.flags.owndata


def test_two_results_alive_at_once_never_share_memory():
  shape = (8, 3, 720, 1280)
  results = [buffer_pool.empty(shape) for _ in range(5)]
  assert len({_address(r) for r in results}) == 5
