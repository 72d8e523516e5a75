"""Out of space while saving: one line, nothing half-written kept, and an exact resume once
space is back, on a real small filesystem (a tmpfs this test mounts; skipped where mounting is
not permitted, with the reason)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.limits import LAST_GUARD_S

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.num_train_steps=6", "--config.log_every_steps=1",
        "--config.eval_every_steps=3", "--config.checkpoint_every_steps=3",
        "--config.model.num_stacks=1", "--config.model.num_levels=2",
        "--config.model.channels=16"]


def _train(workdir: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "train.py", "--config", "configs/demo.py",
                         "--workdir", workdir] + TINY, cwd=ROOT, capture_output=True, text=True,
                        timeout=LAST_GUARD_S, check=False)


def _mount(path: str, size: str, remount: bool = False) -> subprocess.CompletedProcess:
  options = f"remount,size={size}" if remount else f"size={size}"
  return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path],
                        capture_output=True, text=True, check=False)


def _metrics(workdir: str) -> dict[int, dict]:
  """Each step's logged values, timings left out (they differ between runs)."""
  by_step: dict[int, dict] = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      if line.strip():
        record = json.loads(line)
        by_step.setdefault(record["step"], {}).update(
            {k: v for k, v in record.items() if not k.endswith(("seconds", "time", "per_sec"))})
  return by_step


def test_out_of_space_is_one_line_and_the_run_resumes_exactly(tmp_path):
  small = tmp_path / "small"
  small.mkdir()
  mounted = _mount(str(small), "2m")
  if mounted.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
  try:
    workdir = str(small / "run")
    full = _train(workdir)
    assert full.returncode == 1, full.stderr[-2000:]
    lines = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "no space left" in lines[0] and workdir in lines[0], lines
    assert "Traceback" not in full.stderr
    assert not any("orbax-checkpoint-tmp" in name for _, dirs, _ in os.walk(workdir)
                   for name in dirs)
    # Space is back: the same command resumes and finishes as an uninterrupted run does.
    assert _mount(str(small), "64m", remount=True).returncode == 0
    resumed = _train(workdir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    reference = str(tmp_path / "reference")
    assert _train(reference).returncode == 0
    assert _metrics(workdir) == _metrics(reference)
  finally:
    subprocess.run(["umount", "-l", str(small)], capture_output=True, check=False)
