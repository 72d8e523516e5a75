"""Host (CPU-side) process settings that make XLA's CPU buffers cheap.

XLA on the CPU allocates every output and temporary with `malloc`. glibc serves allocations
above its mmap threshold (32 MB at most by default) with fresh `mmap` calls and unmaps them on
free, so each new 51 MB heatmap gradient is paid for again in page faults: measured here, a
jitted `2 * h` over (32, 64, 64, 98) float32 took 14 ms with the default allocator and 2 ms once
large freed blocks are kept for reuse. `tune_allocator` raises the thresholds at run time (the
same as the MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ environment variables, which must be
set before the process starts).

`tune_xla_cpu` selects XLA:CPU's memory-optimised instruction scheduler, which orders the
training step's thousands of operations so that fewer large activations are alive at once. On
the 2-core benchmark machine the full WFLW step (batch 4, float32) went from 2.22-2.24 s to
2.14 s with it (benchmarks/RESULTS.md). It only changes the order of operations, not what they
compute. `tune_process` applies both.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import mmap
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


_XLA_OPT_OUT_ENV = "STAR_JAX_DEFAULT_XLA_CPU"
_SCHEDULER_FLAG = "xla_cpu_scheduler_type"
_SCHEDULER_VALUE = "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"


def _jax_backends_initialised() -> bool:
  """Whether XLA has already read XLA_FLAGS in this process (flags set later are ignored)."""
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  except ImportError:
    return True  # unknown internals: assume too late rather than set flags that may not apply
  return bool(getattr(xla_bridge, "_backends", True))


def _jaxlib_knows(value: bytes) -> bool:
  """Whether the installed jaxlib binaries contain `value` (an XLA flag value).

  XLA aborts the process on an unknown flag value, so a flag is only set when the library that
  will parse it names it.
  """
  try:
    import jaxlib  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  for path in sorted(glob.glob(os.path.join(os.path.dirname(jaxlib.__file__), "*.so"))):
    try:
      with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data.find(value) >= 0:
          return True
    except (OSError, ValueError):
      continue
  return False


def tune_xla_cpu() -> bool:
  """Adds XLA:CPU's memory-optimised scheduler to XLA_FLAGS. Idempotent.

  Left alone when XLA_FLAGS already chooses a scheduler, when STAR_JAX_DEFAULT_XLA_CPU=1, when
  JAX's backends already started (too late for flags), or when the installed jaxlib does not
  know the setting. Returns whether the flag is in effect for this process.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if f"--{_SCHEDULER_FLAG}={_SCHEDULER_VALUE}" in flags:
    return True
  if (os.environ.get(_XLA_OPT_OUT_ENV) or _SCHEDULER_FLAG in flags
      or _jax_backends_initialised() or not _jaxlib_knows(_SCHEDULER_VALUE.encode())):
    return False
  os.environ["XLA_FLAGS"] = f"{flags} --{_SCHEDULER_FLAG}={_SCHEDULER_VALUE}".strip()
  return True


def tune_process() -> None:
  """`tune_allocator()` and `tune_xla_cpu()`: call first thing in an entry point."""
  tune_allocator()
  tune_xla_cpu()
