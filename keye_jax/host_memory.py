"""Host-memory reuse for CPU runs (glibc's malloc).

XLA:CPU allocates each executable's temporaries as one block per call (1.4 GB for the benchmark's
training step). glibc hands blocks that large out with a fresh mmap, or grows and trims the heap, so every
step page-faults its whole working set in again: 340k faults and a sixth of the step's CPU time in the
kernel. Keeping freed memory in one never-trimmed heap makes the next call reuse the same pages.

It must run before JAX creates its CPU client: the client's worker threads choose their malloc arena on
first use, and an arena of their own would still mmap large blocks. `keye train` applies it on the CPU;
other commands do not, because one shared arena makes small allocations contend for its lock (decoding,
whose temporaries are small, measured ~12% slower with it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def runs_on_cpu() -> bool:
  """Whether JAX will pick the CPU: JAX_PLATFORMS says so, or the machine has no TPU or GPU device."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not any(glob.glob(p) for p in ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*"))


def keep_freed_memory() -> bool:
  """One malloc arena, no mmap for large blocks, never trim: freed host memory stays mapped and is
  reused (the process keeps its high-water mark, like jemalloc or tcmalloc would). Returns False
  where this is not glibc."""
  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name)
    mallopt = libc.mallopt
  except (OSError, AttributeError, TypeError):
    return False
  # -1 is glibc's "no limit": mallopt's int reaches the size_t threshold as SIZE_MAX.
  return all(mallopt(k, v) == 1 for k, v in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
