"""Errors meant for people, and the exit codes the entry points map them to.

Every mistake a user can make (a wrong flag, a malformed TSV, an unreadable image, a tampered
checkpoint) raises one of these with a one-line message that names the file (and line) or the
flag and says what is wrong. `star_jax.commands.cli` turns them into `error: <message>` on stderr
and
the exit code below, without a traceback; anything else is a programming error and keeps its
traceback.

  UsageError       2   flags, arguments, configuration values
  DataError        1   input data: TSV annotations, images, dataset folders
  CheckpointError  1   checkpoints that cannot be read or do not fit
  WorkdirError     1   a training workdir that is locked or belongs to another run

The classes also derive from the built-in exception a caller would expect (ValueError,
OSError), so library code that catches those keeps working.
"""

from __future__ import annotations


class StarJaxError(Exception):
  """Base class: a problem with the user's input, reported as one line."""

  exit_code = 1


class UsageError(StarJaxError, ValueError):
  """A flag, argument or configuration value is invalid."""

  exit_code = 2


class DataError(StarJaxError, ValueError):
  """Input data (annotations, images, dataset folders) is missing or malformed."""

  exit_code = 1


class CheckpointError(DataError):
  """A checkpoint cannot be read, is not trusted data, or does not fit the request."""


class WorkdirError(StarJaxError, OSError):
  """A training workdir cannot be used by this run (locked, or holds another experiment)."""

  exit_code = 1
