"""A training run killed (SIGKILL) again and again inside its checkpoint and best-model writes,
resumed each time by the same command, ends exactly as an uninterrupted run does.

The run (tests/train_harness.py: the tiny model on synthetic batches, with a log record, a
validation, a best-model write when the NME improves and a training checkpoint at every step)
is watched for orbax's temporary step folders (`<step>.orbax-checkpoint-tmp`) in
`checkpoints/` and `best/`. Each attempt kills it at the n-th such folder that appears (n and
the delay after it vary, so kills fall into best-model writes and into the asynchronous
training-checkpoint writes, early or late in them). A kill counts as landed inside a write when
the temporary folder is still there once the process is gone. Every resume must start without
a traceback, and the finished run's per-step losses, validation NMEs, best model and weights
must equal those of a run that was never interrupted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from star_jax.training import checkpointing, model_store
from star_jax.training import logging_utils
from tests.limits import LAST_GUARD_S

pytestmark = pytest.mark.slow

HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_harness.py")
STEPS = 24
MIN_LANDED = 20
MAX_ATTEMPTS = 40
TMP_MARK = ".orbax-checkpoint-tmp"
WATCHED = (checkpointing.CHECKPOINTS_DIR, checkpointing.BEST_DIR)
# (n-th temporary folder of the process, seconds after it appeared), cycled through.
PLAN = [(1, 0.0), (2, 0.02), (1, 0.05), (3, 0.0), (2, 0.1), (4, 0.03), (1, 0.15), (3, 0.07),
        (2, 0.0), (4, 0.12), (1, 0.01), (3, 0.2)]


def _env(cache_dir: str) -> dict[str, str]:
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("XLA_FLAGS", None)
  return env


def _start(workdir: str, out: str, log_path: str, env: dict[str, str]) -> subprocess.Popen:
  with open(log_path, "w") as log:
    return subprocess.Popen([sys.executable, HARNESS, workdir, out, "--steps", str(STEPS),
                             "--every", "1"], stdout=log, stderr=subprocess.STDOUT, env=env)


def _temporaries(workdir: str) -> set[str]:
  found = set()
  for sub in WATCHED:
    try:
      names = os.listdir(os.path.join(workdir, sub))
    except OSError:
      continue
    found.update(f"{sub}/{name}" for name in names if TMP_MARK in name)
  return found


def _read(path: str) -> str:
  with open(path, errors="replace") as f:
    return f.read()


def _kill_in_write(proc: subprocess.Popen, workdir: str, nth: int, delay: float
                   ) -> str | None:
  """Kills `proc` `delay` seconds after the `nth` temporary folder appears in it; returns the
  folder (None when the run ended first)."""
  seen = _temporaries(workdir)
  appeared = 0
  deadline = time.monotonic() + LAST_GUARD_S
  while proc.poll() is None and time.monotonic() < deadline:
    now = _temporaries(workdir)
    new = sorted(now - seen)
    seen = now
    if new:
      appeared += len(new)
      if appeared >= nth:
        if delay:
          time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return new[0]
    time.sleep(0.002)
  return None


def _without_timings(records: list[dict]) -> list[dict]:
  return [{k: v for k, v in r.items() if k not in ("examples_per_sec", "val_seconds")}
          for r in records]


def test_kills_inside_checkpoint_writes_then_resume_exactly(tmp_path):
  tmp = str(tmp_path)
  env = _env(os.path.join(tmp, "jax_cache"))
  reference = os.path.join(tmp, "reference")
  ref_proc = _start(reference, os.path.join(tmp, "reference.npz"),
                    os.path.join(tmp, "reference.log"), env)

  workdir = os.path.join(tmp, "killed")
  out = os.path.join(tmp, "killed.npz")
  kills = []   # (attempt, folder that appeared, delay, temporaries left behind)
  started = time.monotonic()
  attempt = 0
  while sum(1 for k in kills if k[3]) < MIN_LANDED and attempt < MAX_ATTEMPTS:
    nth, delay = PLAN[attempt % len(PLAN)]
    log_path = os.path.join(tmp, f"attempt{attempt}.log")
    proc = _start(workdir, out, log_path, env)
    folder = _kill_in_write(proc, workdir, nth, delay)
    log = _read(log_path)
    assert "Traceback" not in log and "StepAlreadyExistsError" not in log, (
        f"attempt {attempt}:\n{log[-4000:]}")
    if attempt:
      assert "resuming at step" in log or "starting at step 0" in log, log[-4000:]
    if folder is None:  # finished before the kill: the campaign is over
      assert proc.returncode == 0, log[-4000:]
      break
    kills.append((attempt, folder, delay, sorted(_temporaries(workdir))))
    attempt += 1

  landed = [k for k in kills if k[3]]
  in_best = [k for k in landed if any(t.startswith(checkpointing.BEST_DIR) for t in k[3])]
  in_checkpoints = [k for k in landed
                    if any(t.startswith(checkpointing.CHECKPOINTS_DIR) for t in k[3])]
  print(f"kill campaign: {len(kills)} kills, {len(landed)} inside a write ({len(in_best)} with "
        f"a best-model write open, {len(in_checkpoints)} with a checkpoint write open) in "
        f"{time.monotonic() - started:.0f} s; " + "; ".join(
            f"#{a} {f} +{d * 1000:.0f}ms -> {','.join(t) or 'none'}" for a, f, d, t in kills))
  assert len(landed) >= MIN_LANDED, kills
  assert in_best and in_checkpoints, kills

  # The same command once more finishes the run.
  final_log = os.path.join(tmp, "final.log")
  final = _start(workdir, out, final_log, env)
  assert final.wait(timeout=LAST_GUARD_S) == 0, _read(final_log)[-4000:]
  log = _read(final_log)
  assert "Traceback" not in log and "resuming at step" in log, log[-4000:]
  assert ref_proc.wait(timeout=LAST_GUARD_S) == 0, _read(os.path.join(tmp, "reference.log"))
  assert not _temporaries(workdir)

  ours = logging_utils.read_metrics(workdir)
  theirs = logging_utils.read_metrics(reference)
  assert [r["step"] for r in theirs if "train_loss" in r] == list(range(1, STEPS + 1))
  assert _without_timings(ours) == _without_timings(theirs)
  assert model_store.read_best_meta(workdir) == model_store.read_best_meta(reference)
  with np.load(out) as a, np.load(os.path.join(tmp, "reference.npz")) as b:
    assert sorted(a.files) == sorted(b.files)
    for key in b.files:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
