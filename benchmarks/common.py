"""Shared benchmark plumbing: timing with warm-up, machine description, RESULTS.md rows."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Sequence

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


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


def machine() -> str:
  """One line naming the machine: CPU model and core count, GPU if JAX sees one."""
  desc = f"{_cpu_model()}, {os.cpu_count()} cores"
  try:
    import jax
    devs = jax.devices()
    if devs and devs[0].platform != "cpu":
      desc = f"{len(devs)}x {devs[0].device_kind}; host {desc}"
  except Exception:  # pragma: no cover - jax missing or broken
    pass
  return desc


def versions() -> str:
  parts = [f"python {platform.python_version()}"]
  for name in ("jax", "flax", "torch", "tensorflow"):
    try:
      mod = __import__(name)
      parts.append(f"{name} {mod.__version__}")
    except Exception:
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
           notes: str = "", write: bool = True) -> str:
  """Prints the table and appends it, with machine, date and versions, to RESULTS.md."""
  table = format_table(header, rows)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  block = (f"\n### {title}\n\n- date: {stamp}\n- machine: {machine()}\n- versions: {versions()}\n"
           f"- commit: {_git_rev()}\n" + (f"- notes: {notes}\n" if notes else "") + "\n" + table + "\n")
  print(block)
  if write:
    with open(RESULTS, "a") as f:
      f.write(block)
  return block
