"""star_jax.commands.host: the process settings the entry points apply before JAX starts.

Each case runs in a fresh interpreter, because XLA reads XLA_FLAGS once per process.
"""

from __future__ import annotations

from tests.limits import LAST_GUARD_S

import json
import re
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEDULER = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
YNN_REDUCE = "--xla_cpu_experimental_ynn_fusion_type=reduce"


def _expected_options() -> list[str]:
  """The options tune_xla_cpu sets with the installed jaxlib (the YNN one is release-bound)."""
  import jaxlib.version
  return [SCHEDULER] + ([YNN_REDUCE] if jaxlib.version.__version__.startswith("0.10.") else [])

_PROBE = """
import json, os
from star_jax.commands import host
import jax
before = host.tune_xla_cpu()
flags = os.environ.get("XLA_FLAGS", "")
value = float(jax.numpy.arange(4.0).sum())  # XLA accepts the flags it was given
after_start = host.tune_xla_cpu()
print(json.dumps({"applied": before, "flags": flags, "value": value, "after": after_start,
                  "allocator": host.tune_allocator()}))
"""


def _probe(**env_overrides) -> dict:
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "STAR_JAX_DEFAULT_XLA_CPU", "STAR_JAX_DEFAULT_MALLOC")}
  env.update(env_overrides)
  run = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=LAST_GUARD_S, check=False)
  assert run.returncode == 0, run.stderr[-2000:]
  return json.loads(run.stdout.strip().splitlines()[-1])


def test_options_are_added_before_jax_starts_and_xla_accepts_them():
  result = _probe()
  assert result["applied"] == _expected_options()
  assert result["flags"].split() == _expected_options()
  assert result["value"] == 6.0
  assert result["after"] == _expected_options()  # idempotent: already in effect


def test_user_flags_are_kept_and_a_user_choice_of_the_same_flag_wins():
  kept = _probe(XLA_FLAGS="--xla_cpu_enable_fast_math=false")
  assert kept["flags"].split() == ["--xla_cpu_enable_fast_math=false"] + _expected_options()
  own = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT"
  chosen = _probe(XLA_FLAGS=own)
  assert SCHEDULER not in chosen["applied"]
  assert chosen["flags"].split() == [own] + _expected_options()[1:]


@pytest.mark.parametrize("variable", ["STAR_JAX_DEFAULT_XLA_CPU", "STAR_JAX_DEFAULT_MALLOC"])
def test_opt_out_variables(variable):
  result = _probe(**{variable: "1"})
  if variable == "STAR_JAX_DEFAULT_XLA_CPU":
    assert result["applied"] == [] and result["flags"] == ""
  else:
    assert result["allocator"] is False and result["applied"] == _expected_options()


def test_too_late_once_jax_has_started():
  code = ("import jax, os\njax.devices()\nfrom star_jax.commands import host\n"
          "print(len(host.tune_xla_cpu()), repr(os.environ.get('XLA_FLAGS', '')))")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=LAST_GUARD_S, check=True)
  assert run.stdout.split() == ["0", "''"]


_LOG_PROBE = """
from star_jax.commands import host
host.show_absl_logs()
host.show_absl_logs()  # idempotent: still one line per record
host.configure_process()
from absl import logging
logging.info("an info line")
logging.warning("a warning line")
logging.debug("a debug line")
"""


def test_training_commands_show_absl_lines_as_absl_app_did():
  """INFO and above, each once, with absl's prefix (level, date, time, thread, file:line), and
  no complaint that absl's flags were not parsed (the commands parse with argparse)."""
  run = subprocess.run([sys.executable, "-c", _LOG_PROBE], cwd=ROOT, capture_output=True,
                       text=True, timeout=LAST_GUARD_S, check=True)
  lines = run.stderr.splitlines()
  assert len(lines) == 2, run.stderr
  prefix = r"\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ <string>:\d+\] "
  assert re.fullmatch("I" + prefix + "an info line", lines[0]), lines
  assert re.fullmatch("W" + prefix + "a warning line", lines[1]), lines
