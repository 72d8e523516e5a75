"""The console of a training run: the progress bar's rate and ETA leave out compilation, the
validation line gives NME in % (as eval.py does), `make` installs quietly."""

from __future__ import annotations

from tests.limits import LAST_GUARD_S

import io
import os
import re
import subprocess

import pytest

from star_jax.training import logging_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Clock:
  def __init__(self):
    self.now = 1000.0

  def __call__(self) -> float:
    return self.now


def _bar(total: int, initial: int = 0, warmup_steps: int = 2):
  out = io.StringIO()
  bar = logging_utils.TrainingBar(total=total, initial=initial, file=out, unit="step",
                                  smoothing=0.1, mininterval=0, miniters=1,
                                  warmup_steps=warmup_steps)
  clock = Clock()
  bar._time = clock  # tqdm reads its clock through this attribute
  bar.start_t = bar.last_print_t = clock.now
  return bar, clock, out


def _last_line(out: io.StringIO) -> str:
  return out.getvalue().split("\r")[-1]


def test_eta_leaves_out_compilation():
  """A first step of an hour (compilation) then one step per second: the ETA is the
  remaining steps at one per second, not at the first step's pace."""
  bar, clock, out = _bar(10_000, initial=100)
  clock.now += 3600.0
  bar.update(1)
  line = _last_line(out)
  assert "compiling" in line and "101/10000" in line and "s/step" not in line
  clock.now += 5.0
  bar.update(1)
  for _ in range(20):
    clock.now += 1.0
    bar.update(1)
  line = _last_line(out)
  assert "compiling" not in line and "122/10000" in line
  assert bar.format_dict["rate"] == pytest.approx(1.0)
  # 9878 steps left at 1 step/s: 2:44:38, and 20 s elapsed since the warm-up ended.
  assert re.search(r"\[00:20<2:44:38, +1\.00step/s\]", line), line
  bar.close()


def test_without_warmup_the_bar_is_tqdms():
  bar, clock, out = _bar(100, warmup_steps=0)
  for _ in range(4):
    clock.now += 2.0
    bar.update(1)
  assert "compiling" not in _last_line(out) and bar.n == 4
  assert bar.format_dict["rate"] == pytest.approx(0.5)
  bar.close()


def test_disabled_bar_counts_quietly():
  out = io.StringIO()
  bar = logging_utils.TrainingBar(total=10, file=out, disable=True)
  for _ in range(5):
    bar.update(1)
  assert out.getvalue() == ""
  bar.close()


def test_validation_line_is_in_percent():
  line = logging_utils.format_validation(500, {"val_nme": 0.051234, "val_nme_raw": 0.06,
                                               "val_images": 12})
  assert line == ("step 500: validation NME 5.123 % (EMA weights), 6.000 % (raw weights) on "
                  "12 images")


def test_make_installs_quietly():
  """`make install` runs pip with -q and announces itself in one line."""
  run = subprocess.run(["make", "-n", "-B", "install"], cwd=ROOT, capture_output=True,
                       text=True, timeout=LAST_GUARD_S, check=False)
  if run.returncode != 0 and "make: not found" in run.stderr:
    pytest.skip("no make")
  assert run.returncode == 0, run.stderr
  pips = [line for line in run.stdout.splitlines() if " -m pip install" in line]
  assert pips and all(" -q " in line for line in pips), pips
  notes = [line for line in run.stdout.splitlines() if line.startswith("echo ")]
  assert len(notes) == 1 and "installing" in notes[0]
