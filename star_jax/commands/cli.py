"""The error contract shared by every entry point (train.py, eval.py, `python -m star_jax.*`),
and the argparse style they all parse their flags with.

A user mistake ends in one line on stderr and an exit code, never a traceback:

  error: data/wflw/train.tsv:12: landmark column: value 7 ('1.2.3') is not a number

- `star_jax.errors.StarJaxError` subclasses carry their exit code (2 usage, 1 data);
- an `OSError` about a path (missing file, permission denied, disk full) is exit 1;
- Ctrl-C is `interrupted` and exit 130 (training asks `graceful_stop` instead: it saves first,
  then exits 130, or 143 for SIGTERM);
- a wrong flag is exit 2: every command parses with `ArgumentParser` below (argparse, with
  `int_at_least` and `add_switch` for bounded integers and booleans; train.py and eval.py add
  their `--config` file and overrides with `config_args`).

`STAR_JAX_DEBUG=1` re-raises instead, so the traceback is shown. Any other exception is a
programming error and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import sys
from typing import Any, Callable, Iterator, NoReturn, Sequence

from star_jax import errors

DEBUG_ENV = "STAR_JAX_DEBUG"
EXIT_INTERRUPTED = 130


def debug_enabled() -> bool:
  return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def one_line(message: Any) -> str:
  """The first line of a message (the rest of a multi-line text is detail)."""
  text = str(message).strip()
  return text.splitlines()[0] if text else ""


def error_exit(message: Any, code: int) -> NoReturn:
  print(f"error: {one_line(message)}", file=sys.stderr)
  sys.stderr.flush()
  sys.exit(code)


# Modules of the training install (`pip install -e '.[train]'`) that the inference-only install
# (base + `[runtime]`) leaves out.
_TRAINING_MODULES = ("jax", "flax", "absl", "ml_collections", "tensorflow")


def require_training_install(command: str) -> None:
  """One line and exit 2 when `command` runs in the inference-only install (no JAX, absl...)."""
  import importlib.util
  missing = [m for m in _TRAINING_MODULES if importlib.util.find_spec(m) is None]
  if missing:
    error_exit(f"{command} needs the training install (missing: {', '.join(missing)}): "
               "pip install -e '.[train]' (this environment runs exported models only)",
               errors.UsageError.exit_code)


class ArgumentParser(argparse.ArgumentParser):
  """argparse under the error contract: a wrong flag is one line, `error: ...`, exit 2 (the
  usage text stays with --help)."""

  def error(self, message: str) -> NoReturn:
    if debug_enabled():
      super().error(message)
    error_exit(f"{message} (usage: {self.prog} --help)", errors.UsageError.exit_code)


def int_at_least(minimum: int) -> Callable[[str], int]:
  """An argparse type: an integer of at least `minimum`."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
      raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value
  return parse


def parse_bool(text: str) -> bool:
  """An argparse type: true / false / 1 / 0 / t / f, in any case."""
  if text.lower() in ("true", "t", "1"):
    return True
  if text.lower() in ("false", "f", "0"):
    return False
  raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true or false)")


def add_switch(parser: argparse.ArgumentParser, name: str, *, default: bool, help: str) -> None:
  """A boolean flag written any of the ways the training commands have always accepted:
  `--NAME`, `--NAME=true|false` (or 1/0) and `--noNAME`."""
  parser.add_argument(f"--{name}", dest=name, nargs="?", const=True, default=default,
                      type=parse_bool, metavar="BOOL", help=f"{help} (default: {default})")
  parser.add_argument(f"--no{name}", dest=name, action="store_false",
                      help=f"The same as --{name}=false.")


def _describe_os_error(e: OSError) -> str:
  if e.filename is not None:
    return f"{e.filename}: {e.strerror or e}"
  return str(e)


class CurrentStderrHandler(logging.StreamHandler):
  """A handler writing to whatever `sys.stderr` is when a message comes (it may be replaced)."""

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, value) -> None:
    del value


def show_library_messages() -> None:
  """The library's warnings and notices (`logging.getLogger("star_jax.*")`) as plain lines on
  stderr, as a command's own output. Entry points only: handlers belong to the process."""
  logger = logging.getLogger("star_jax")
  if not any(isinstance(h, CurrentStderrHandler) for h in logger.handlers):
    handler = CurrentStderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # not again through the root handler (absl's log lines)


def run(fn: Callable[[], int | None]) -> int:
  """Calls `fn()` under the error contract; returns its exit status (None counts as 0).

  Known errors are printed as one line and turned into their exit code with `sys.exit`.
  """
  show_library_messages()
  if debug_enabled():
    return int(fn() or 0)
  try:
    return int(fn() or 0)
  except errors.StarJaxError as e:
    error_exit(e, e.exit_code)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)
  except OSError as e:
    error_exit(_describe_os_error(e), 1)
  except (ValueError, RuntimeError) as e:
    # Out of space inside a library's writer (orbax/tensorstore report ENOSPC this way).
    if not _OUT_OF_SPACE.search(str(e)):
      raise
    path = _QUOTED_PATH.search(str(e))
    error_exit(f"{path.group(1) if path else 'a file'}: no space left on the device; free some "
               "space and run the same command again", 1)


_OUT_OF_SPACE = re.compile(r"RESOURCE_EXHAUSTED|No space left on device|ENOSPC")
_QUOTED_PATH = re.compile(r'local file "([^"]+)"')


def main_wrapper(fn: Callable[[Sequence[str] | None], int | None]
                 ) -> Callable[[Sequence[str] | None], int]:
  """Wraps an argparse `main(argv)` so that it follows the contract when called directly."""
  def wrapped(argv: Sequence[str] | None = None) -> int:
    return run(lambda: fn(argv))
  wrapped.__doc__ = fn.__doc__
  wrapped.__name__ = getattr(fn, "__name__", "main")
  return wrapped


class StopRequest:
  """Set by SIGTERM / SIGINT while `graceful_stop` is active; call it to ask whether to stop."""

  def __init__(self):
    self.signal: int | None = None

  def __call__(self) -> bool:
    return self.signal is not None

  @property
  def exit_code(self) -> int:
    """128 + the signal number (143 for SIGTERM, 130 for Ctrl-C), 0 when none came."""
    return 0 if self.signal is None else 128 + int(self.signal)


@contextlib.contextmanager
def graceful_stop() -> Iterator[StopRequest]:
  """SIGTERM and SIGINT ask the work to stop at its next safe point instead of killing it.

  The first signal sets the returned `StopRequest` (the training loop then saves a checkpoint
  and returns); a second one exits at once with 128 + its number. The previous handlers are
  restored on exit. Entry points only: signal handlers belong to the process.
  """
  stop = StopRequest()

  def handle(signum, frame):
    del frame
    if stop.signal is not None:
      print(f"\n{signal.Signals(signum).name} again: exiting now", file=sys.stderr)
      sys.stderr.flush()
      os._exit(128 + signum)
    stop.signal = signum
    print(f"\n{signal.Signals(signum).name}: finishing the current step and saving a "
          "checkpoint (send it again to exit at once)", file=sys.stderr)
    sys.stderr.flush()

  previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield stop
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
