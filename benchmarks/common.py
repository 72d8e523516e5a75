"""Shared benchmark plumbing: process settings, timing, machine description, RESULTS.md rows.

Every script in this folder runs both as `python -m benchmarks.NAME` and as
`python benchmarks/NAME.py` (each puts the repository root on `sys.path` itself when run as a
file), answers `--help` without importing JAX or TensorFlow, prints its table, and appends it
to the tracked `benchmarks/RESULTS.md` only when given `--record`.

Process settings. What the entry points set for the whole process (star_jax.commands.host: glibc
malloc
keeping large freed blocks, and two XLA:CPU options) changes timings several-fold for
memory-bound work: a 51 MB buffer freshly mapped on every call costs as much in page faults as
the arithmetic. A comparison is only fair when both sides run with the same settings, so every
script applies them through `apply_process_settings` (`--process_settings tuned|default`, one
choice for everything in the process and its children) and states them in its output. The
allocator setting applies to every library in the process (PyTorch included); the XLA options
are compiler options that only JAX reads.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Sequence

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
PROCESS_SETTINGS = ("tuned", "default")


def add_common_flags(parser: argparse.ArgumentParser, *, settings: bool = True) -> None:
  """`--record` (append to RESULTS.md; default: print only) and `--process_settings`."""
  parser.add_argument("--record", action="store_true",
                      help="append the table to benchmarks/RESULTS.md (default: print only)")
  if settings:
    parser.add_argument("--process_settings", default="tuned", choices=PROCESS_SETTINGS,
                        help="tuned: what star-jax's entry points set (malloc keeps large freed "
                             "blocks; XLA:CPU options); default: neither. Applies to both "
                             "sides of every comparison.")


def apply_process_settings(mode: str, *, jax_in_process: bool = True) -> str:
  """Applies `mode` ('tuned' or 'default') to this process; returns a one-line description.

  Call before JAX starts its backends (the XLA options are read once). A script's children get
  the same `mode` through their own `--process_settings` flag; a child that runs no JAX
  (`jax_in_process=False`, e.g. the PyTorch side) takes the allocator setting only.
  This is the one place the benchmarks reach star-jax's process settings.
  """
  if mode not in PROCESS_SETTINGS:
    raise ValueError(f"process settings {mode!r}: use one of {PROCESS_SETTINGS}")
  if mode == "default":
    return "process settings: default (glibc malloc defaults; XLA's default CPU options)"
  from star_jax.commands import host
  tuned = host.tune_allocator()
  malloc = ("glibc malloc keeps freed blocks up to 1 GiB for reuse (star_jax.commands.host."
            "tune_allocator; every library in the process)" if tuned
            else "malloc left as is (not glibc, or STAR_JAX_DEFAULT_MALLOC set)")
  if not jax_in_process:
    return f"process settings: tuned: {malloc}"
  xla = host.tune_xla_cpu()
  options = " ".join(xla) if xla else "none applied"
  return f"process settings: tuned: {malloc}; XLA:CPU options (JAX only): {options}"


def time_fn(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 10,
            sync: Callable[[object], object] | None = None) -> list[float]:
  """Seconds per call of `fn` over `repeats` runs after `warmup` runs.

  `sync` is applied to each result before the clock stops (e.g. `jax.block_until_ready`).
  """
  sync = sync or (lambda x: x)
  for _ in range(warmup):
    sync(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t0)
  return times


def time_windows(run_window: Callable[[], object], *, windows: int, steps_per_window: int
                 ) -> tuple[list[float], list[float]]:
  """(wall, process CPU) seconds per step for each of `windows` calls of `run_window`.

  `run_window` runs `steps_per_window` steps and returns once they have finished.
  """
  walls, cpus = [], []
  for _ in range(windows):
    t0, cpu0 = time.perf_counter(), time.process_time()
    run_window()
    walls.append((time.perf_counter() - t0) / steps_per_window)
    cpus.append((time.process_time() - cpu0) / steps_per_window)
  return walls, cpus


def time_calls(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 10,
               sync: Callable[[object], object] | None = None
               ) -> tuple[list[float], list[float]]:
  """(wall seconds, process CPU seconds) of each of `repeats` calls of `fn` after `warmup`.

  Process CPU time counts every thread of the process: on a machine shared with other work it
  moves less than the wall time.
  """
  sync = sync or (lambda x: x)
  for _ in range(warmup):
    sync(fn())
  walls, cpus = [], []
  for _ in range(repeats):
    t0, cpu0 = time.perf_counter(), time.process_time()
    sync(fn())
    walls.append(time.perf_counter() - t0)
    cpus.append(time.process_time() - cpu0)
  return walls, cpus


def load_average() -> str:
  """'1-min load average X.X on N cores' (other work on the machine skews wall times)."""
  try:
    return f"1-min load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
  except OSError:
    return f"{os.cpu_count()} cores"


def median(xs: Sequence[float]) -> float:
  return statistics.median(xs)


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


# Vector extensions that decide the speed of float32 and int8 kernels (the same CPU model name
# is lent with and without AVX-512 and VNNI), named in every record.
_VECTOR_FLAGS = (("avx512_vnni", "AVX-512 VNNI"), ("avx512f", "AVX-512"), ("avx_vnni", "AVX-VNNI"),
                 ("avx2", "AVX2"))


def _vector_extensions() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          flags = set(line.split(":", 1)[1].split())
          return ", ".join(name for flag, name in _VECTOR_FLAGS if flag in flags)
  except OSError:
    pass
  return ""


def machine() -> str:
  """One line naming the machine: CPU model, its vector extensions and core count, GPU if JAX
  sees one."""
  extensions = _vector_extensions()
  desc = f"{_cpu_model()}{f' ({extensions})' if extensions else ''}, {os.cpu_count()} cores"
  try:
    import jax
    devs = jax.devices()
    if devs and devs[0].platform != "cpu":
      desc = f"{len(devs)}x {devs[0].device_kind}; host {desc}"
  except Exception:  # pragma: no cover - jax missing or broken
    pass
  return desc


def versions() -> str:
  """Versions of the libraries that matter here, from package metadata (nothing is imported)."""
  from importlib import metadata
  parts = [f"python {platform.python_version()}"]
  for name, dist in (("jax", "jax"), ("jaxlib", "jaxlib"), ("flax", "flax"), ("torch", "torch"),
                     ("tensorflow", "tensorflow-cpu"), ("tensorflow", "tensorflow")):
    if any(p.startswith(name + " ") for p in parts):
      continue
    try:
      parts.append(f"{name} {metadata.version(dist)}")
    except metadata.PackageNotFoundError:
      pass
  return ", ".join(parts)


def _git_rev() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(RESULTS), check=False).stdout.strip() or "-"
  except OSError:
    return "-"


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def record(title: str, header: Sequence[str], rows: Sequence[Sequence[object]],
           notes: str = "", write: bool = False, extra_lines: Sequence[str] = ()) -> str:
  """Prints the table with machine, date and versions; appends it to RESULTS.md if `write`.

  `extra_lines` become bullets after the notes (one finding each).
  """
  table = format_table(header, rows)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  block = (f"\n### {title}\n\n- date: {stamp}\n- machine: {machine()}\n- versions: {versions()}\n"
           f"- commit: {_git_rev()}\n" + (f"- notes: {notes}\n" if notes else "")
           + "".join(f"- {line}\n" for line in extra_lines) + "\n" + table + "\n")
  print(block)
  if write:
    with open(RESULTS, "a") as f:
      f.write(block)
    print(f"appended to {RESULTS}")
  else:
    print("(not recorded: add --record to append this to benchmarks/RESULTS.md)")
  return block


def random_wflw_model(name: str, *, stacks: int, channels: int, levels: int = 4,
                      image_size: int = 256):
  """A `model_store.LoadedModel` of the WFLW network with random weights (speed does not
  depend on them), for the export and web benchmarks."""
  from star_jax.core import schemes as datasets
  from star_jax.training.model_store import LoadedModel
  from star_jax.models import hourglass
  spec = datasets.get_spec("wflw")
  model = hourglass.StackedHourglass(num_stacks=stacks, num_levels=levels, channels=channels,
                                     num_points=spec.num_points,
                                     edge_points=tuple(tuple(e.points) for e in spec.edges))
  variables = hourglass.init_variables(model, 0, image_size)
  return LoadedModel(model, variables, spec, image_size, source=f"random {name}", weights="raw")

