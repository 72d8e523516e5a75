"""Host (CPU-side) process settings that make XLA's CPU buffers cheap.

XLA on the CPU allocates every output and temporary with `malloc`. glibc serves allocations
above its mmap threshold (32 MB at most by default) with fresh `mmap` calls and unmaps them on
free, so each new 51 MB heatmap gradient is paid for again in page faults: measured here, a
jitted `2 * h` over (32, 64, 64, 98) float32 took 14 ms with the default allocator and 2 ms once
large freed blocks are kept for reuse. `tune_allocator` raises the thresholds at run time (the
same as the MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ environment variables, which must be
set before the process starts).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap and stay there after free.
_THRESHOLD_BYTES = 1 << 30
_OPT_OUT_ENV = "STAR_JAX_DEFAULT_MALLOC"

_tuned = False


def tune_allocator() -> bool:
  """Keeps freed large blocks for reuse (glibc on Linux; elsewhere a no-op). Idempotent.

  Returns whether the allocator was tuned. Set STAR_JAX_DEFAULT_MALLOC=1 to leave it alone.
  """
  global _tuned
  if _tuned:
    return True
  if not sys.platform.startswith("linux") or os.environ.get(_OPT_OUT_ENV):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (e.g. musl)
    return False
  _tuned = bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD_BYTES)) and bool(
      mallopt(_M_TRIM_THRESHOLD, _THRESHOLD_BYTES))
  return _tuned
