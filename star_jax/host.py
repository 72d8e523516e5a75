"""Host (CPU-side) process settings that make XLA's CPU buffers cheap.

XLA on the CPU allocates every output and temporary with `malloc`. glibc serves allocations
above its mmap threshold (32 MB at most by default) with fresh `mmap` calls and unmaps them on
free, so each new 51 MB heatmap gradient is paid for again in page faults: measured here, a
jitted `2 * h` over (32, 64, 64, 98) float32 took 14 ms with the default allocator and 2 ms once
large freed blocks are kept for reuse. `tune_allocator` raises the thresholds at run time (the
same as the MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ environment variables, which must be
set before the process starts).

`tune_xla_cpu` sets two XLA:CPU options, measured on the 2-core benchmark machine with the full
WFLW training step (batch 4, float32; benchmarks/RESULTS.md):
- the memory-optimised instruction scheduler, which orders the step's thousands of operations so
  that fewer large activations are alive at once: 2.22-2.24 s -> 2.14 s;
- YNNPACK for reductions only (`xla_cpu_experimental_ynn_fusion_type=reduce`), so that
  convolutions and matrix products go to XLA's Eigen kernels: a 3x3 convolution's weight
  gradient (4x64x64x128) takes 15.7 ms there against 27 ms in YNNPACK; the step went to
  1.96-1.99 s, the forward pass at batch 1 from 101 to 97 ms.
Both change which kernels run, not the mathematics (float32 results differ by rounding). The
second is an experimental XLA option, so it is only set for the jaxlib release it was measured
with. `tune_process` applies everything here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
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
# (flag, value, jaxlib release prefixes it was measured with, or None for any release whose
# binaries name the value).
_XLA_CPU_FLAGS = (
    ("xla_cpu_scheduler_type", "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED", None),
    ("xla_cpu_experimental_ynn_fusion_type", "reduce", ("0.10.",)),
)


def _jax_backends_initialised() -> bool:
  """Whether XLA has already read XLA_FLAGS in this process (flags set later are ignored)."""
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  except ImportError:
    return True  # unknown internals: assume too late rather than set flags that may not apply
  return bool(getattr(xla_bridge, "_backends", True))


@functools.lru_cache(maxsize=None)
def _jaxlib_knows(value: bytes) -> bool:
  """Whether the installed jaxlib binaries contain `value` (an XLA flag value).

  XLA aborts the process on an unknown flag value, so a flag is only set when the library that
  will parse it names it. Cached: a miss reads every binary (hundreds of MB).
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


def _jaxlib_version() -> str:
  try:
    import jaxlib.version  # pylint: disable=g-import-not-at-top
    return str(jaxlib.version.__version__)
  except ImportError:
    return ""


def tune_xla_cpu() -> list[str]:
  """Adds the XLA:CPU options above to XLA_FLAGS. Idempotent.

  An option is left alone when XLA_FLAGS already sets that flag (the user's choice wins), when
  STAR_JAX_DEFAULT_XLA_CPU=1, when JAX's backends already started (too late for flags), or when
  the installed jaxlib is not one it applies to (XLA aborts on a flag value it does not know).
  Returns the options in effect for this process.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  in_effect = [f"--{name}={value}" for name, value, _ in _XLA_CPU_FLAGS
               if f"--{name}={value}" in flags.split()]
  if os.environ.get(_XLA_OPT_OUT_ENV) or _jax_backends_initialised():
    return in_effect
  added = []
  for name, value, releases in _XLA_CPU_FLAGS:
    option = f"--{name}={value}"
    if name in flags:
      continue
    if releases is not None and not _jaxlib_version().startswith(releases):
      continue
    if not _jaxlib_knows(name.encode()) or (releases is None
                                            and not _jaxlib_knows(value.encode())):
      continue
    added.append(option)
  if added:
    os.environ["XLA_FLAGS"] = " ".join([flags] + added).strip()
  return in_effect + added


def tune_process() -> None:
  """`tune_allocator()` and `tune_xla_cpu()`: call first thing in an entry point."""
  tune_allocator()
  tune_xla_cpu()
