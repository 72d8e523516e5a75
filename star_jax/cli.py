"""The error contract shared by every entry point (train.py, eval.py, `python -m star_jax.*`).

A user mistake ends in one line on stderr and an exit code, never a traceback:

  error: data/wflw/train.tsv:12: landmark column: value 7 ('1.2.3') is not a number

- `star_jax.errors.StarJaxError` subclasses carry their exit code (2 usage, 1 data);
- an `OSError` about a path (missing file, permission denied, disk full) is exit 1;
- Ctrl-C is `interrupted` and exit 130 (training handles its signals itself: it saves first);
- flag-parsing errors of absl entry points are exit 2.

`STAR_JAX_DEBUG=1` re-raises instead, so the traceback is shown. Any other exception is a
programming error and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, NoReturn, Sequence

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


def _describe_os_error(e: OSError) -> str:
  if e.filename is not None:
    return f"{e.filename}: {e.strerror or e}"
  return str(e)


def run(fn: Callable[[], int | None]) -> int:
  """Calls `fn()` under the error contract; returns its exit status (None counts as 0).

  Known errors are printed as one line and turned into their exit code with `sys.exit`.
  """
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


def main_wrapper(fn: Callable[[Sequence[str] | None], int | None]
                 ) -> Callable[[Sequence[str] | None], int]:
  """Wraps an argparse `main(argv)` so that it follows the contract when called directly."""
  def wrapped(argv: Sequence[str] | None = None) -> int:
    return run(lambda: fn(argv))
  wrapped.__doc__ = fn.__doc__
  wrapped.__name__ = getattr(fn, "__name__", "main")
  return wrapped


def absl_run(main: Callable[[list[str]], int | None]) -> NoReturn:
  """`absl.app.run(main)` with flag errors as `error: ...` + exit 2 and `main` under `run`."""
  from absl import app
  from absl import flags

  def parse(argv: list[str]) -> list[str]:
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      if debug_enabled():
        raise
      error_exit(e, errors.UsageError.exit_code)

  def guarded(argv: list[str]) -> int:
    if len(argv) > 1:
      error_exit(f"unexpected arguments: {' '.join(argv[1:])}", errors.UsageError.exit_code)
    return run(lambda: main(argv))

  app.run(guarded, flags_parser=parse)
  sys.exit(0)  # app.run exits itself; this keeps type checkers and readers sure of it
