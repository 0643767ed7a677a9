"""Large uninitialised arrays, reused once nothing references them any more.

A video's decoded frames fill a fresh array of ~100 MB (40 frames of 720p), and the first write of every page
of fresh memory is a page fault: measured on the 2-core development machine, writing into a fresh 110 MB
array cost ~10 ms of CPU per 720p frame against 0.5 ms into memory already mapped, as much as a quarter of
`fetch_video`'s CPU time on a cheap-to-decode clip. A data pipeline reads video after video of the same
size, so the last few buffers are kept and handed out again when their reference count shows that
nobody holds them, nor any view of them (a view references its base buffer).
"""

from __future__ import annotations

import sys
import threading

import numpy as np

MIN_BYTES = 1 << 24     # smaller arrays come from the allocator as usual
KEEP = 3                # buffers kept: the caller's previous result may still be alive while the next is made

_lock = threading.Lock()
_buffers: list[np.ndarray] = []   # 1-D uint8, most recently handed out last


def empty(shape, dtype=np.uint8) -> np.ndarray:
  """Like `np.empty(shape, dtype)`; large arrays may reuse memory of earlier ones that are no longer used."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if nbytes < MIN_BYTES:
    return np.empty(shape, dtype)
  with _lock:
    for i in reversed(range(len(_buffers))):     # the most recently used first: still warm in the caches
      # References: the list and getrefcount's argument; any more is a user or a view of it.
      if _buffers[i].nbytes == nbytes and sys.getrefcount(_buffers[i]) <= 2:
        _buffers.append(_buffers.pop(i))
        return _buffers[-1].view(dtype).reshape(shape)
    buf = np.empty(nbytes, np.uint8)
    _buffers.append(buf)
    if len(_buffers) > KEEP:
      _buffers.pop(0)                 # forgotten here; freed once its user drops it
    return buf.view(dtype).reshape(shape)
