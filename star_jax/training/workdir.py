"""A training workdir as one run's property: its lock, its config.json, and the check that a
resumed run is the same experiment.

- `lock(workdir)`: an advisory `fcntl.flock` on `<workdir>/.lock`, held for the life of the
  process; a second run on the same workdir stops at once naming the owner's pid.
- `prepare(workdir, config)`: before anything in the workdir is written, compares the stored
  `config.json` with the command's. Fields that change shapes or data (`RESUME_FIXED`) must
  agree, or the run is refused with the differing fields listed; other differences (longer
  training, another cadence, a moved image folder) are allowed and logged. Then the resolved
  config is written (atomically).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from typing import TYPE_CHECKING, Any, Mapping

from absl import logging

from star_jax.errors import UsageError, WorkdirError

if TYPE_CHECKING:
  import ml_collections

CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
# Dotted config fields that a resumed run may not change (prefix match: "model." covers the
# whole model). They decide parameter shapes, the data stream or the training examples.
RESUME_FIXED = ("dataset", "model.", "data.image_size", "data.source", "data.train_tsv",
                "data.val_tsv", "data.val_fraction", "data.embedded_dir", "data.tfds_data_dir",
                "batch_size", "seed", "init_from", "init_weights", "freeze")
# Within those, fields that only change how the same computation is carried out.
RESUME_ALLOWED = ("model.precision",)

_held_locks: dict[str, Any] = {}


def lock(workdir: str) -> None:
  """Takes `<workdir>/.lock` for this process (idempotent); WorkdirError if another run has it."""
  workdir = os.path.abspath(workdir)
  if workdir in _held_locks:
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UsageError(f"--workdir {workdir}: exists and is not a directory")
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  handle = open(path, "a+")
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
      handle.close()
      raise
    handle.seek(0)
    owner = handle.read().strip() or "unknown"
    handle.close()
    raise WorkdirError(f"{workdir} is in use by another training run (pid {owner}); wait for it "
                       "to finish or use another --workdir") from None
  handle.seek(0)
  handle.truncate()
  handle.write(f"{os.getpid()}\n")
  handle.flush()
  _held_locks[workdir] = handle


def unlock(workdir: str) -> None:
  handle = _held_locks.pop(os.path.abspath(workdir), None)
  if handle is not None:
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = tuple(value) if isinstance(value, list) else value
  return out


def _fixed(name: str) -> bool:
  if name in RESUME_ALLOWED:
    return False
  return any(name == f or (f.endswith(".") and name.startswith(f)) for f in RESUME_FIXED)


def config_differences(stored: Mapping[str, Any], new: Mapping[str, Any]
                       ) -> tuple[list[str], list[str]]:
  """(refused, allowed) differences between two configs as JSON-like dicts, one text each."""
  old_flat, new_flat = _flatten(stored), _flatten(new)
  refused, allowed = [], []
  for name in sorted(set(old_flat) | set(new_flat)):
    old, cur = old_flat.get(name, "<absent>"), new_flat.get(name, "<absent>")
    if old == cur:
      continue
    text = f"{name}: {old!r} -> {cur!r}"
    (refused if _fixed(name) else allowed).append(text)
  return refused, allowed


def _atomic_write(path: str, text: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def prepare(workdir: str, config: ml_collections.ConfigDict) -> bool:
  """Checks a stored config against `config` and writes `config.json`; True when resuming.

  Raises WorkdirError, before anything is written, when the workdir holds another experiment.
  """
  from star_jax.training import checkpointing
  path = os.path.join(workdir, CONFIG_FILE)
  text = checkpointing.config_to_json(config)
  resuming = os.path.exists(path)
  if resuming:
    try:
      with open(path, encoding="utf-8") as f:
        stored = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise WorkdirError(f"{path}: cannot be read ({e}); move the workdir away or repair "
                         "the file") from None
    refused, allowed = config_differences(stored, json.loads(text))
    if refused:
      raise WorkdirError(f"{workdir} holds a run with another setup ({'; '.join(refused)}); "
                         "use a new --workdir, or the stored values to resume")
    for line in allowed:
      logging.info("resuming with a changed setting: %s", line)
  os.makedirs(workdir, exist_ok=True)
  _atomic_write(path, text)
  return resuming
