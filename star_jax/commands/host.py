"""Process-wide settings: the host allocator, XLA:CPU options, TensorFlow and library logs.

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
Both change which kernels run, not the mathematics (float32 results differ by rounding). Both
are only set for the jaxlib release they were measured with (XLA aborts on unknown flags).

`configure_process` applies everything here; the entry points (train.py, eval.py, the
`python -m star_jax.*` commands) and the benchmarks call it, library functions never do.
`show_absl_logs` gives the training commands (train.py, eval.py) the training library's
`absl.logging` lines on stderr.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging as py_logging
import os
import sys

from star_jax.commands import cli

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
# (flag, value, jaxlib release prefixes it was measured with). XLA aborts the process on a flag
# it does not know, so an option is only set for the releases it was measured with.
_XLA_CPU_FLAGS = (
    ("xla_cpu_scheduler_type", "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED", ("0.10.",)),
    ("xla_cpu_experimental_ynn_fusion_type", "reduce", ("0.10.",)),
)
# TensorFlow's C++ logging: warnings and errors only (it prints INFO lines at import otherwise).
_TF_LOG_LEVEL = "1"


def _jaxlib_version() -> str:
  try:
    import jaxlib.version
    return str(jaxlib.version.__version__)
  except ImportError:
    return ""


def tune_xla_cpu() -> list[str]:
  """Adds the XLA:CPU options above to XLA_FLAGS. Idempotent.

  An option is left alone when XLA_FLAGS already sets that flag (the user's choice wins), when
  STAR_JAX_DEFAULT_XLA_CPU=1, when JAX's backends already started (too late for flags), or when
  the installed jaxlib is not a release it was measured with. Returns the options in effect.
  """
  from star_jax.core import jax_compat
  flags = os.environ.get("XLA_FLAGS", "")
  in_effect = [f"--{name}={value}" for name, value, _ in _XLA_CPU_FLAGS
               if f"--{name}={value}" in flags.split()]
  if os.environ.get(_XLA_OPT_OUT_ENV) or jax_compat.backends_initialised():
    return in_effect
  release = _jaxlib_version()
  added = [f"--{name}={value}" for name, value, releases in _XLA_CPU_FLAGS
           if name not in flags and release.startswith(releases)]
  if added:
    os.environ["XLA_FLAGS"] = " ".join([flags] + added).strip()
  return in_effect + added


def _quiet_tensorflow() -> None:
  """Keeps TensorFlow (the input pipeline) off accelerators and quiet.

  TensorFlow would otherwise reserve GPU memory next to JAX; it only decodes images here.
  """
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", _TF_LOG_LEVEL)
  import tensorflow as tf
  try:
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
  except (RuntimeError, ValueError):
    pass  # already initialised, or no such device type


# Libraries whose INFO records drown the console (orbax: several lines per checkpoint file;
# jax: the platforms it probes).
_CHATTY_PATHS = ("/orbax/", "/jax/_src/")


class _DropLibraryChatter(py_logging.Filter):
  """Drops INFO records logged from inside the libraries in _CHATTY_PATHS."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return (record.levelno >= py_logging.WARNING
            or not any(p in record.pathname for p in _CHATTY_PATHS))


def _quiet_library_logs() -> None:
  """Keeps the console to our own progress: library INFO records are dropped (warnings stay)."""
  try:
    from absl import logging
  except ImportError:  # the inference-only install (and the GPU check) run without absl
    return
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _DropLibraryChatter) for f in handler.filters):
    handler.addFilter(_DropLibraryChatter())


class _AbslLines(cli.CurrentStderrHandler):
  """Log records as absl prints them, on whatever `sys.stderr` is when a record comes (a class
  of its own, so that it is installed once, beside the library's plain-line handler)."""


def show_absl_logs() -> None:
  """The training commands' log lines (train.py, eval.py): records of INFO and above on stderr
  in absl's format (`I1207 15:28:58.511832 140231244168064 train_lib.py:574] ...`), as absl's
  `app.run` showed them, and Python's fault handler on (app.run's too), so that a crash in
  native code still prints the Python stack. Idempotent.

  The training library logs through `absl.logging`. absl's own handler expects absl's flag
  parser to have run (without it, it prefixes the first record with a warning that flags were
  not parsed); the commands parse with argparse, so this handler formats with absl's public
  formatter instead, at the root as absl's is, and drops the same library chatter as
  `configure_process` does on absl's.
  """
  import faulthandler
  from absl import logging
  root = py_logging.getLogger()
  if not any(isinstance(h, _AbslLines) for h in root.handlers):
    handler = _AbslLines()
    handler.setFormatter(logging.PythonFormatter())
    handler.addFilter(_DropLibraryChatter())
    root.addHandler(handler)
  root.setLevel(py_logging.INFO)
  logging.set_verbosity(logging.INFO)
  if not faulthandler.is_enabled():
    faulthandler.enable()



class _DropClosedLoopTracebacks:
  """stderr, minus the tracebacks of `RuntimeError: Event loop is closed`.

  When orbax fails to read a damaged checkpoint it closes its event loop while tensorstore reads
  are still pending; each of them later prints that traceback from a completion callback (one
  per array: thousands for a training state). The checkpoint code reports the failure itself in
  one line, so these are noise. Every other write passes through unchanged (a traceback is held
  back only until its last line shows what it is).
  """

  _START = "Traceback (most recent call last):"
  _NOISE = "RuntimeError: Event loop is closed"

  def __init__(self, stream):
    self._stream = stream
    self._held: list[str] = []
    self._partial = ""

  def write(self, text: str) -> int:
    self._partial += text
    lines = self._partial.split("\n")
    self._partial = lines.pop()
    for line in lines:
      self._line(line + "\n")
    if not self._held and self._partial and not self._START.startswith(self._partial):
      self._stream.write(self._partial)
      self._partial = ""
    return len(text)

  def _line(self, line: str) -> None:
    if not self._held and not line.startswith(self._START):
      self._stream.write(line)
      return
    self._held.append(line)
    if line.startswith((" ", self._START)):
      return  # still inside the traceback
    if line.strip() != self._NOISE:
      self._stream.write("".join(self._held))
    self._held = []

  def flush(self) -> None:
    self._stream.flush()

  def __getattr__(self, name):
    return getattr(self._stream, name)


def configure_process(*, tensorflow: bool = False) -> None:
  """Every process-wide setting star-jax wants, applied by entry points and benchmarks only.

  The allocator and XLA:CPU options above, TensorFlow's log level, quiet library loggers,
  stderr without orbax's closed-event-loop noise (`_DropClosedLoopTracebacks`), and, with
  `tensorflow=True` (commands that run the tf.data pipeline), TensorFlow kept off GPUs.
  Library functions never change the process; a program that uses star-jax as a library calls
  this once at its start if it wants the same settings.
  """
  tune_allocator()
  tune_xla_cpu()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", _TF_LOG_LEVEL)
  _quiet_library_logs()
  if not isinstance(sys.stderr, _DropClosedLoopTracebacks):
    sys.stderr = _DropClosedLoopTracebacks(sys.stderr)
  if tensorflow:
    _quiet_tensorflow()


def hide_xla_flags_from_tensorflow() -> None:
  """Starts JAX (which reads XLA_FLAGS once, now), then removes XLA_FLAGS from the process:
  TensorFlow's older XLA, started later by the SavedModel and TFLite exports, aborts the process
  on options only jaxlib's XLA knows (`tune_xla_cpu` sets some). Export entry points only."""
  import jax
  jax.devices()
  os.environ.pop("XLA_FLAGS", None)
