"""The benchmark scripts' command lines: both ways of running them, --help, and --record."""

from __future__ import annotations

from tests.limits import LAST_GUARD_S

import hashlib
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, "benchmarks")
RESULTS = os.path.join(BENCHMARKS, "RESULTS.md")
# Every script in benchmarks/ (common.py is their shared module, not a script).
SCRIPTS = sorted(name[:-3] for name in os.listdir(BENCHMARKS)
                 if name.endswith(".py") and name not in ("__init__.py", "common.py"))


def _digest(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module", autouse=True)
def results_untouched():
  """Nothing in this module may change the tracked RESULTS.md."""
  before = _digest(RESULTS)
  yield
  assert _digest(RESULTS) == before, "a benchmark wrote to benchmarks/RESULTS.md"


def _run(command: list[str], cwd: str = REPO) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=LAST_GUARD_S, check=False)


def test_every_script_is_covered():
  assert {"star_loss", "model", "train_step", "input_pipeline", "eval_e2e", "official_step",
          "gpu_check"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("how", ["module", "file"])
def test_help_exits_zero_without_work(script, how, tmp_path):
  # From another folder too, for the file form: the script must find the repository itself.
  if how == "module":
    proc = _run([sys.executable, "-m", f"benchmarks.{script}", "--help"])
  else:
    proc = _run([sys.executable, os.path.join(BENCHMARKS, f"{script}.py"), "--help"],
                cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith("usage:"), proc.stdout[:200]
  assert "--record" in proc.stdout
  assert not list(tmp_path.iterdir())


def test_gpu_sh_help_does_nothing_else():
  proc = _run(["bash", os.path.join(BENCHMARKS, "gpu.sh"), "--help"])
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith("usage:")
  assert "== devices" not in proc.stdout


def test_results_are_appended_only_with_record(tmp_path, monkeypatch, capsys):
  import argparse
  from benchmarks import common, star_loss
  target = tmp_path / "RESULTS.md"
  monkeypatch.setattr(common, "RESULTS", str(target))
  # The measurement runs here rather than in a child process (same code, less start-up).
  monkeypatch.setattr(star_loss, "_child", lambda args, settings: star_loss.measure(
      argparse.Namespace(**{**vars(args), "process_settings": settings})))
  tiny = ["--batch=1", "--points=2", "--size=12", "--repeats=1", "--settings=default"]
  star_loss.main(tiny)
  assert not target.exists()
  assert "not recorded" in capsys.readouterr().out
  star_loss.main(tiny + ["--record"])
  text = target.read_text()
  assert text.count("### STAR loss") == 1
  # The comparison says under which process settings both sides ran.
  assert "process settings: default" in text
  assert "| default |" in text
