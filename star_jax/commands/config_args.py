"""`--config PATH[:ARG]` and `--config.FIELD=VALUE` overrides for argparse commands.

The training commands (train.py, eval.py) take their recipe from a config file:

  python train.py --config configs/wflw.py --config.optim.lr=1e-4 --config.data.image_size 128

A config file is the user's own Python code (as with ml_collections' config files): it is
loaded as a module from its path and `get_config()` returns an `ml_collections.ConfigDict`;
`--config PATH:ARG` calls `get_config(ARG)` instead. Each `--config.a.b=VALUE` (or
`--config.a.b VALUE`) then sets an existing field, in command-line order, with VALUE read by the
type of the value it replaces:

  bool           true / false / 1 / 0 / t / f (any case); a bare `--config.a.b` is true
  int, float     Python numbers (an integer is fine for a float field)
  str            the text as given
  tuple, list    a Python literal (`'(200, 350)'`, `'[1, 2]'`); a single value is one element
  None           a Python literal, else the text
  ConfigDict     a Python dict literal (replaces the whole group)

A field declared with `ml_collections.config_dict.placeholder(T)` is read as a T. Afterwards
the config is locked, so code that sets a field the config does not declare fails instead of
adding it. Every mistake (no such field, a value of the wrong type, a missing or failing config
file) is a `star_jax.errors.UsageError` naming the flag: one `error:` line and exit 2 under
`cli.run`.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib.machinery
import importlib.util
import os
import sys
from typing import Any, Sequence

from star_jax.commands import cli
from star_jax.errors import UsageError

FLAG = "--config"
_PREFIX = FLAG + "."

OVERRIDES_HELP = (
    "Any field of the config can be overridden: --config.FIELD=VALUE or --config.FIELD VALUE "
    "(e.g. --config.optim.lr=1e-4 --config.data.image_size 128); the value is read by the "
    "field's type (true/false for booleans, Python literals for tuples such as "
    "--config.optim.milestones='(200, 350)'). Overrides apply in command-line order.")


def add_config_argument(parser: argparse.ArgumentParser) -> None:
  """Adds the required `--config PATH[:ARG]` flag; `parse_args` then loads it."""
  parser.add_argument(FLAG, required=True, metavar="PATH[:ARG]",
                      help="Path to a config file (configs/*.py); PATH:ARG passes ARG to its "
                           "get_config (e.g. configs/realtime_1x64.py:demo).")


def parse_args(parser: argparse.ArgumentParser,
               argv: Sequence[str] | None = None) -> argparse.Namespace:
  """`parser.parse_args(argv)` with the `--config.*` overrides taken out first; `args.config`
  is then the loaded, overridden and locked ConfigDict."""
  argv = sys.argv[1:] if argv is None else list(argv)
  rest, overrides = split_overrides(argv)
  args = parser.parse_args(rest)
  args.config = load_config(args.config, overrides)
  return args


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str | None]]]:
  """Separates `--config.FIELD[=VALUE]` (and `--config.FIELD VALUE`) from the other arguments.

  Returns the other arguments and the overrides as (field path, value text or None for a bare
  flag), in command-line order. A bare flag is one followed by nothing or by another `--` flag;
  a value that starts with `--` must be given as `--config.FIELD=VALUE`. Everything after a
  lone `--` is left to the parser.
  """
  rest: list[str] = []
  overrides: list[tuple[str, str | None]] = []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg == "--":
      rest.extend(argv[i:])
      break
    if not arg.startswith(_PREFIX):
      rest.append(arg)
      i += 1
      continue
    name, equals, value = arg[len(_PREFIX):].partition("=")
    if equals:
      overrides.append((name, value))
    elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
      overrides.append((name, argv[i + 1]))
      i += 1
    else:
      overrides.append((name, None))
    i += 1
  return rest, overrides


def load_config(spec: str, overrides: Sequence[tuple[str, str | None]] = ()):
  """The ConfigDict of `--config spec` (PATH or PATH:ARG), `overrides` applied, locked."""
  config = load_config_file(spec)
  for path, value in overrides:
    apply_override(config, path, value)
  config.lock()
  return config


def load_config_file(spec: str):
  """Runs the config file of `spec` (PATH or PATH:ARG) and returns its `get_config(...)`."""
  import ml_collections
  path, colon, arg = spec.partition(":")
  where = f"{FLAG} {spec}"
  if not path:
    raise UsageError(f"{FLAG}: give the path of a config file (configs/*.py)")
  if not os.path.exists(path):
    raise UsageError(f"{FLAG} {path}: no such config file")
  if os.path.isdir(path):
    raise UsageError(f"{FLAG} {path}: is a directory, not a config file")
  # A file of any name is Python source here (config files are not always named *.py).
  loader = importlib.machinery.SourceFileLoader("star_jax_config_file", path)
  module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
  # Registered as an import would be (dataclasses, pickle look a class's module up there).
  sys.modules[loader.name] = module
  try:
    loader.exec_module(module)
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
      raise UsageError(f"{FLAG} {path}: defines no get_config() function")
    config = get_config(arg) if colon else get_config()
  except Exception as e:  # config files are user code: any failure is theirs
    sys.modules.pop(loader.name, None)
    if isinstance(e, UsageError):
      raise
    raise UsageError(f"{where}: {type(e).__name__}: {cli.one_line(e)}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise UsageError(f"{where}: get_config() returned {type(config).__name__}, not an "
                     "ml_collections.ConfigDict")
  return config


def apply_override(config, path: str, text: str | None) -> None:
  """Sets the existing field `path` ("a.b.c") of `config` from the command-line text `text`
  (None: the flag was given bare)."""
  import ml_collections
  flag = _PREFIX + path
  names = path.split(".")
  node = config
  for depth, name in enumerate(names):
    if not isinstance(node, ml_collections.ConfigDict):
      parent = ".".join(["config"] + names[:depth])
      raise UsageError(f"{flag}: no such config field ({parent} is {node!r}, not a group "
                       "of fields)")
    if not name or name not in node:
      raise UsageError(f"{flag}: no such config field{_suggestion(node, names, depth)}")
    if depth < len(names) - 1:
      node = node[name]
  leaf = names[-1]
  value = parse_value(flag, text, node.get_type(leaf), node[leaf])
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise UsageError(f"{flag}: {cli.one_line(e)}") from e


def _suggestion(node, names: list[str], depth: int) -> str:
  close = difflib.get_close_matches(names[depth], [str(k) for k in node.keys()], n=1)
  if not close:
    return ""
  return f"; did you mean {_PREFIX}{'.'.join(names[:depth] + close)}?"


def parse_value(flag: str, text: str | None, field_type: type, current: Any) -> Any:
  """The value of `text` for a field of `field_type` (whose value is now `current`)."""
  import ml_collections
  if field_type is bool:
    try:
      return True if text is None else cli.parse_bool(text)
    except argparse.ArgumentTypeError as e:
      raise UsageError(f"{flag}: {e}") from None
  if text is None:
    raise UsageError(f"{flag}: needs a value ({flag}=VALUE)")
  if field_type is int:
    try:
      return int(text)
    except ValueError:
      raise UsageError(f"{flag}: {text!r} is not an integer") from None
  if field_type is float:
    try:
      return float(text)
    except ValueError:
      raise UsageError(f"{flag}: {text!r} is not a number") from None
  if field_type is str:
    return text
  if field_type in (tuple, list):
    return field_type(_sequence(flag, text, field_type))
  if field_type is type(None) and current is None:
    return _literal_or_text(text)
  if isinstance(field_type, type) and issubclass(field_type, ml_collections.ConfigDict):
    try:
      value = ast.literal_eval(text)
    except (SyntaxError, ValueError):
      value = None
    if not isinstance(value, dict):
      raise UsageError(f"{flag}: {text!r} is not a dict literal (this field is a group of "
                       "fields; set one with --config.GROUP.FIELD=VALUE)")
    return ml_collections.ConfigDict(value)
  raise UsageError(f"{flag}: a field of type {getattr(field_type, '__name__', field_type)} "
                   "cannot be set on the command line")


def _literal_or_text(text: str) -> Any:
  if text in ("true", "false"):
    return text == "true"
  try:
    return ast.literal_eval(text)
  except (SyntaxError, ValueError):
    return text


def _sequence(flag: str, text: str, kind: type) -> tuple | list:
  """A tuple or list field's value: a literal sequence, or one value as one element (an
  unquoted word such as a path is a string)."""
  try:
    value = ast.literal_eval(text)
  except ValueError:
    value = text
  except SyntaxError:
    if "," in text or " " in text:
      raise UsageError(f"{flag}: {text!r} is not a {kind.__name__} literal (quote string "
                       f"elements and separate them with commas, e.g. '(1, 2)')") from None
    value = text
  if isinstance(value, (tuple, list)):
    return value
  return (value,)
