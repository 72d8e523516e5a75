"""`--config PATH[:ARG]` and `--config.FIELD=VALUE` (star_jax.commands.config_args): values read
by the field's type, overrides in command-line order, the config locked afterwards, and every
mistake one `error:` line naming the flag (exit 2), in-process and through train.py / eval.py.
"""

from __future__ import annotations

from tests.limits import LAST_GUARD_S

import os
import subprocess
import sys
import textwrap

import pytest

from star_jax.commands import cli
from star_jax.commands import config_args
from star_jax.commands import eval as eval_command
from star_jax.commands import train as train_command
from star_jax.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG_FILE = """
import ml_collections
from ml_collections.config_dict import placeholder


def get_config(variant="plain"):
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.flag = False
  c.count = 3
  c.rate = 0.5
  c.name = "x"
  c.steps = (1, 2)
  c.sizes = [4]
  c.anything = None
  c.width = placeholder(int)
  c.group = ml_collections.ConfigDict(dict(a=1, b=ml_collections.ConfigDict(dict(c="deep"))))
  return c
"""


@pytest.fixture
def config_file(tmp_path):
  path = tmp_path / "my_config.py"
  path.write_text(CONFIG_FILE)
  return str(path)


def _load(config_file, *flags):
  _, overrides = config_args.split_overrides(list(flags))
  return config_args.load_config(config_file, overrides)


def _usage_error(config_file, *flags) -> str:
  with pytest.raises(UsageError) as caught:
    _load(config_file, *flags)
  message = str(caught.value)
  assert "\n" not in message
  return message


# --------------------------------------------------------------------------------------------
# Values by the field's type.

@pytest.mark.parametrize("text, value", [
    ("true", True), ("True", True), ("TRUE", True), ("1", True), ("t", True),
    ("false", False), ("False", False), ("0", False), ("F", False)])
def test_booleans(config_file, text, value):
  assert _load(config_file, f"--config.flag={text}").flag is value
  assert _load(config_file, "--config.flag", text).flag is value


def test_a_bare_boolean_is_true(config_file):
  assert _load(config_file, "--config.flag").flag is True
  # Followed by another flag, it still takes no value.
  c = _load(config_file, "--config.flag", "--config.count=5")
  assert c.flag is True and c.count == 5


def test_numbers_strings_and_sequences(config_file):
  c = _load(config_file, "--config.count=-7", "--config.rate", "2", "--config.name=a b=c",
            "--config.steps=(10, 20, 30)", "--config.sizes=[7, 8]")
  assert c.count == -7 and isinstance(c.count, int)
  assert c.rate == 2.0 and isinstance(c.rate, float)      # an integer for a float field
  assert c.name == "a b=c"                                 # the text after the first '='
  assert c.steps == (10, 20, 30) and c.sizes == [7, 8]
  c = _load(config_file, "--config.rate=1e-4", "--config.steps=5", "--config.sizes=(1, 2)",
            "--config.name=12")
  assert c.rate == pytest.approx(1e-4)
  assert c.steps == (5,)                                   # one value is one element
  assert c.sizes == [1, 2] and isinstance(c.sizes, list)  # the field's own sequence type
  assert c.name == "12"                                    # a str field stays text
  assert _load(config_file, "--config.steps=1,2").steps == (1, 2)
  assert _load(config_file, "--config.steps=a/b.tsv").steps == ("a/b.tsv",)


def test_a_none_field_takes_a_literal_or_the_text(config_file):
  assert _load(config_file, "--config.anything=(1, 2)").anything == (1, 2)
  assert _load(config_file, "--config.anything=3.5").anything == 3.5
  assert _load(config_file, "--config.anything=true").anything is True
  assert _load(config_file, "--config.anything=some/path.tsv").anything == "some/path.tsv"


def test_a_placeholder_field_takes_its_declared_type(config_file):
  assert _load(config_file).width is None
  c = _load(config_file, "--config.width=64")
  assert c.width == 64 and isinstance(c.width, int)
  message = _usage_error(config_file, "--config.width=wide")
  assert message.startswith("--config.width: 'wide'") and "integer" in message


def test_nested_fields_and_whole_groups(config_file):
  c = _load(config_file, "--config.group.b.c=changed", "--config.group.a", "9")
  assert c.group.b.c == "changed" and c.group.a == 9
  c = _load(config_file, "--config.group={'a': 5}")
  assert c.group.to_dict() == {"a": 5}


def test_the_repository_configs_take_the_real_overrides():
  c = _load(os.path.join(ROOT, "configs", "base.py"), "--config.model.num_stacks=2",
            "--config.model.use_aam=false", "--config.optim.milestones=(5, 8)",
            "--config.data.check_images=True", "--config.ema.half_life_examples=100")
  assert (c.model.num_stacks, c.model.use_aam, c.optim.milestones) == (2, False, (5, 8))
  assert c.data.check_images is True and c.ema.half_life_examples == 100.0


# --------------------------------------------------------------------------------------------
# Order, PATH:ARG, locking.

def test_overrides_apply_in_command_line_order(config_file):
  assert _load(config_file, "--config.count=1", "--config.count=2").count == 2
  assert _load(config_file, "--config.count=2", "--config.count=1").count == 1
  # A group then one of its fields: the field wins; the other way round, the group does.
  c = _load(config_file, "--config.group={'a': 5, 'z': 0}", "--config.group.a=6")
  assert c.group.to_dict() == {"a": 6, "z": 0}
  assert _load(config_file, "--config.group.a=6", "--config.group={'a': 5}").group.a == 5


def test_path_with_an_argument_calls_get_config_with_it(config_file):
  assert _load(config_file).variant == "plain"
  assert _load(f"{config_file}:special").variant == "special"
  assert _load(f"{config_file}:").variant == ""       # an empty argument is still passed
  assert _load(f"{config_file}:a:b").variant == "a:b"  # split at the first colon only
  realtime = os.path.join(ROOT, "configs", "realtime_1x64.py")
  assert _load(f"{realtime}:demo").data.source == "embedded"
  assert _load(realtime).data.source == "tsv"
  assert _load(os.path.join(ROOT, "configs", "hrnet.py") + ":300w").dataset == "300w"


def test_the_config_is_locked_after_the_overrides(config_file):
  c = _load(config_file, "--config.count=4")
  assert c.is_locked
  with pytest.raises(AttributeError):
    c.new_field = 1
  with pytest.raises(AttributeError):
    c.group.new_field = 1
  c.count = 5   # an existing field can still be set
  assert c.count == 5


# --------------------------------------------------------------------------------------------
# Mistakes: one line naming the flag.

def test_an_unknown_field_names_the_flag_and_suggests_a_sibling(config_file):
  message = _usage_error(config_file, "--config.cout=3")
  assert message == "--config.cout: no such config field; did you mean --config.count?"
  message = _usage_error(config_file, "--config.group.b.cc=1")
  assert message == "--config.group.b.cc: no such config field; did you mean --config.group.b.c?"
  message = _usage_error(config_file, "--config.zzzzzz=1")
  assert message == "--config.zzzzzz: no such config field"
  message = _usage_error(config_file, "--config.count.x=1")
  assert message.startswith("--config.count.x: no such config field") and "config.count" in message
  assert _usage_error(config_file, "--config.=1").startswith("--config.: no such config field")


@pytest.mark.parametrize("flag, words", [
    ("--config.count=3.5", ("--config.count", "'3.5'", "integer")),
    ("--config.rate=fast", ("--config.rate", "'fast'", "number")),
    ("--config.flag=maybe", ("--config.flag", "'maybe'", "boolean")),
    ("--config.steps=a b", ("--config.steps", "tuple")),
    ("--config.group=5", ("--config.group", "dict")),
])
def test_a_value_of_the_wrong_type_names_the_flag(config_file, flag, words):
  message = _usage_error(config_file, flag)
  for word in words:
    assert word in message, message


def test_a_field_other_than_a_bool_needs_a_value(config_file):
  message = _usage_error(config_file, "--config.count")
  assert message.startswith("--config.count: needs a value")


def test_config_file_mistakes(tmp_path, config_file):
  missing = str(tmp_path / "nope.py")
  assert _usage_error(missing) == f"--config {missing}: no such config file"
  assert "is a directory" in _usage_error(str(tmp_path))
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config():\n  raise KeyError('no dataset here')\n")
  assert _usage_error(str(broken)) == f"--config {broken}: KeyError: 'no dataset here'"
  syntax = tmp_path / "syntax.py"
  syntax.write_text("def get_config(:\n")
  assert _usage_error(str(syntax)).startswith(f"--config {syntax}: SyntaxError: ")
  empty = tmp_path / "empty.py"
  empty.write_text("X = 1\n")
  assert "defines no get_config()" in _usage_error(str(empty))
  wrong = tmp_path / "wrong.py"
  wrong.write_text("def get_config():\n  return {'a': 1}\n")
  assert "returned dict, not an ml_collections.ConfigDict" in _usage_error(str(wrong))
  # An argument the function does not take: the config file's TypeError, named.
  message = _usage_error(f"{wrong}:x")
  assert message.startswith(f"--config {wrong}:x: TypeError: ")


def test_the_config_file_failure_is_the_cause(tmp_path):
  """Under STAR_JAX_DEBUG=1 the traceback shown is the config file's own."""
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config():\n  return 1 / 0\n")
  with pytest.raises(UsageError) as caught:
    config_args.load_config_file(str(broken))
  assert isinstance(caught.value.__cause__, ZeroDivisionError)


def test_split_overrides_keeps_everything_else_in_order():
  rest, overrides = config_args.split_overrides(
      ["--config", "c.py", "--config.a=1", "--workdir", "w", "--config.b", "two",
       "--config.c", "--other", "--config.d", "-1", "--config.e", "--", "--config.f=3"])
  assert rest == ["--config", "c.py", "--workdir", "w", "--other", "--", "--config.f=3"]
  assert overrides == [("a", "1"), ("b", "two"), ("c", None), ("d", "-1"), ("e", None)]


# --------------------------------------------------------------------------------------------
# The commands' parsers.

def _parse_error(capsys, parser, argv) -> str:
  with pytest.raises(SystemExit) as caught:
    config_args.parse_args(parser, argv)
  assert caught.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: "), err
  return err


def test_eval_flags_keep_their_forms_defaults_and_bounds(capsys, config_file):
  base = ["--config", config_file, "--checkpoint", "c", "--output_dir", "o"]
  args = config_args.parse_args(eval_command._parser(), base)
  assert (args.split, args.norm, args.weights, args.batch_size, args.threshold) == (
      "test", None, "default", None, None)
  assert (args.auc_even_rule, args.tta, args.check_images) == ("average", "none", True)
  assert args.config.is_locked and args.config.variant == "plain"
  for form, value in (("--nocheck_images", False), ("--check_images=false", False),
                      ("--check_images=0", False), ("--check_images", True),
                      ("--check_images=True", True)):
    assert config_args.parse_args(eval_command._parser(), base + [form]).check_images is value
  args = config_args.parse_args(eval_command._parser(), base + [
      "--batch_size=2", "--threshold", "0.08", "--norm=pupil", "--tta=flip", "--split", "val",
      "--weights=raw", "--auc_even_rule=cartwright", "--config.count=9"])
  assert (args.batch_size, args.threshold, args.norm, args.tta, args.split) == (
      2, 0.08, "pupil", "flip", "val")
  assert (args.weights, args.auc_even_rule, args.config.count) == ("raw", "cartwright", 9)
  assert "--batch_size" in _parse_error(capsys, eval_command._parser(), base + ["--batch_size=0"])
  assert "'nope'" in _parse_error(capsys, eval_command._parser(), base + ["--norm=nope"])
  assert "--check_images" in _parse_error(capsys, eval_command._parser(),
                                          base + ["--check_images=perhaps"])
  assert "stray" in _parse_error(capsys, eval_command._parser(), base + ["stray"])
  assert "--output_dir" in _parse_error(capsys, eval_command._parser(), base[:4])


def test_train_flags(capsys, config_file):
  args = config_args.parse_args(train_command._parser(),
                                ["--config", config_file, "--workdir", "w", "--config.flag"])
  assert args.workdir == "w" and args.config.flag is True
  err = _parse_error(capsys, train_command._parser(), ["--workdir", "w"])
  assert "--config" in err
  err = _parse_error(capsys, train_command._parser(), ["--config", config_file])
  assert "--workdir" in err
  err = _parse_error(capsys, train_command._parser(),
                     ["--config", config_file, "--workdir", "w", "extra"])
  assert "unrecognized arguments: extra" in err


def test_cli_run_turns_a_config_mistake_into_one_line(capsys, config_file, monkeypatch):
  monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
  with pytest.raises(SystemExit) as caught:
    cli.run(lambda: _load(config_file, "--config.cout=3"))
  assert caught.value.code == 2
  assert capsys.readouterr().err == ("error: --config.cout: no such config field; did you mean "
                                     "--config.count?\n")
  monkeypatch.setenv(cli.DEBUG_ENV, "1")
  with pytest.raises(UsageError):
    cli.run(lambda: _load(config_file, "--config.cout=3"))


# --------------------------------------------------------------------------------------------
# End to end: the scripts refuse before any training or evaluation work.

def _run(*args, **env):
  environment = {k: v for k, v in os.environ.items() if k != cli.DEBUG_ENV}
  environment.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", **env)
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=LAST_GUARD_S, env=environment, check=False)


def _one_line(proc, code: int) -> str:
  assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
  return lines[0]


@pytest.mark.parametrize("script, flags", [
    ("train.py", ["--workdir", "unused"]),
    ("eval.py", ["--checkpoint", "unused", "--output_dir", "unused"])])
def test_scripts_report_config_mistakes_in_one_line(tmp_path, script, flags):
  broken = tmp_path / "broken.py"
  broken.write_text(textwrap.dedent("""
      def get_config():
        raise RuntimeError("this recipe needs a dataset\\nsecond line")
  """))
  line = _one_line(_run(script, "--config", "configs/demo.py", *flags, "--config.optim.lrr=1"), 2)
  assert line == "error: --config.optim.lrr: no such config field; did you mean --config.optim.lr?"
  line = _one_line(_run(script, "--config", "configs/nope.py", *flags), 2)
  assert line == "error: --config configs/nope.py: no such config file"
  line = _one_line(_run(script, "--config", str(broken), *flags), 2)
  assert line == f"error: --config {broken}: RuntimeError: this recipe needs a dataset"
  line = _one_line(_run(script, "--config", "configs/demo.py", *flags,
                        "--config.data.image_size=abc"), 2)
  assert line == "error: --config.data.image_size: 'abc' is not an integer"
  line = _one_line(_run(script, *flags), 2)
  assert "required" in line and "--config" in line
  line = _one_line(_run(script, "--config", "configs/demo.py", *flags, "stray"), 2)
  assert "unrecognized arguments: stray" in line
  debug = _run(script, "--config", str(broken), *flags, STAR_JAX_DEBUG="1")
  assert debug.returncode != 0 and "Traceback" in debug.stderr
  assert "RuntimeError: this recipe needs a dataset" in debug.stderr


def test_scripts_help_lists_their_flags():
  for script, flags in (("train.py", ("--config", "--workdir")),
                        ("eval.py", ("--config", "--checkpoint", "--output_dir", "--split",
                                     "--norm", "--weights", "--batch_size", "--threshold",
                                     "--auc_even_rule", "--tta", "--check_images",
                                     "--nocheck_images"))):
    proc = _run(script, "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for flag in flags + ("--config.FIELD=VALUE",):
      assert flag in proc.stdout, (script, flag)
