"""The workdir's guards, fast: the lock is exclusive across processes, and a resume that
changes what the run computes (batch size, seed, model) is refused before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from configs import demo
from star_jax.training import workdir
from star_jax.errors import WorkdirError
from tests.limits import LAST_GUARD_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_lock_is_exclusive_across_processes(tmp_path):
  run_dir = str(tmp_path / "run")
  # A child takes the lock, says so, and holds it until its stdin closes.
  child = subprocess.Popen(
      [sys.executable, "-c", textwrap.dedent(f"""
          import sys
          from star_jax.training import workdir
          workdir.lock({run_dir!r})
          print("locked", flush=True)
          sys.stdin.read()
          """)],
      cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert child.stdout.readline().strip() == "locked"
    with pytest.raises(WorkdirError, match=f"pid {child.pid}"):
      workdir.lock(run_dir)
  finally:
    child.stdin.close()
    child.wait(timeout=LAST_GUARD_S)
  # Released with its process: the next run takes it.
  workdir.lock(run_dir)
  workdir.unlock(run_dir)


@pytest.mark.parametrize("field, value", [("batch_size", 8), ("seed", 1),
                                          ("model.channels", 16)])
def test_a_resume_that_changes_the_computation_is_refused(tmp_path, field, value):
  run_dir = str(tmp_path / "run")
  config = demo.get_config()
  assert workdir.prepare(run_dir, config) is False
  stored = open(os.path.join(run_dir, workdir.CONFIG_FILE)).read()
  changed = demo.get_config()
  section, _, name = field.rpartition(".")
  target = changed.get(section) if section else changed
  old = target[name]
  assert old != value
  target[name] = value
  with pytest.raises(WorkdirError, match=f"{field}: {old!r} -> {value!r}"):
    workdir.prepare(run_dir, changed)
  assert open(os.path.join(run_dir, workdir.CONFIG_FILE)).read() == stored
  # The same config resumes; a cadence change is allowed.
  again = demo.get_config()
  again.log_every_steps = 7
  assert workdir.prepare(run_dir, again) is True
  assert json.load(open(os.path.join(run_dir, workdir.CONFIG_FILE)))["log_every_steps"] == 7
