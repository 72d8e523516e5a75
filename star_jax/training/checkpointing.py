"""Training checkpoints: the train state a run resumes from, and the orbax reading and writing
under every checkpoint of the project (free space first, data only, checksums).

Layout of a training workdir (the lock and config.json belong to `star_jax.training.workdir`):
  checkpoints/<step>/   orbax CheckpointManager steps, items `state` (the train state as a state
                        dict) and `meta` (JSON: step, checksum, config, model description, scheme,
                        logging accumulators, best NME so far)
  best/<step>/          the lowest validation NME's inference checkpoint
                        (`star_jax.training.model_store`, which also loads any checkpoint)
  corrupt_checkpoints/  steps that failed to restore, moved aside

Atomicity: orbax writes every step into `<step>.orbax-checkpoint-tmp-*` and renames it when
complete, and the managers ignore such directories, so a run killed at any moment leaves only
complete steps behind. Each training step also stores a CRC32 of the state; a step that fails to
restore or whose checksum differs is moved to `corrupt_checkpoints/` with a one-line warning and
the previous step is used.
"""

from __future__ import annotations

import json
import logging as py_logging
import os
import shutil
import time
import zlib
from typing import TYPE_CHECKING, Any, Mapping

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from star_jax.errors import CheckpointError

if TYPE_CHECKING:  # imported where used, so inference and the GPU check run without it
  import ml_collections

PyTree = Any

CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
CORRUPT_DIR = "corrupt_checkpoints"


# ---------------------------------------------------------------------------------------------
# Configurations as JSON.

def config_to_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True)


def _tuples(value: Any) -> Any:
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """A ConfigDict from `config_to_json` output (JSON lists become tuples, as configs write them)."""
  import ml_collections
  return ml_collections.ConfigDict(_tuples(json.loads(text)))


# ---------------------------------------------------------------------------------------------
# orbax helpers.

def host_tree(tree: PyTree) -> PyTree:
  return jax.tree.map(np.asarray, tree)


def tree_checksum(tree: PyTree) -> int:
  """CRC32 over the bytes of every leaf in flattening order (detects silent corruption)."""
  crc = 0
  for leaf in jax.tree.leaves(tree):
    crc = zlib.crc32(np.ascontiguousarray(leaf).tobytes(), crc)
  return crc


# What a save needs beyond its arrays' bytes: orbax's metadata, the OCDBT index, JSON items.
_SAVE_OVERHEAD_BYTES = 4 << 20
_SAVE_OVERHEAD_FACTOR = 1.1


def tree_bytes(tree: PyTree) -> int:
  return int(sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(tree)))


def check_free_space(directory: str, needed_bytes: int) -> None:
  """CheckpointError (one line, before anything is written) when the filesystem of `directory`
  lacks room for a save of `needed_bytes` of arrays: a save that runs out of space part-way
  fails in orbax's writer threads, each with its own traceback. The previous checkpoint stays
  as it was, and once space is freed the same command resumes from it."""
  existing = directory
  while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
    existing = os.path.dirname(existing)
  try:
    free = shutil.disk_usage(existing).free
  except OSError:
    return  # unknown: let the write itself report
  need = int(needed_bytes * _SAVE_OVERHEAD_FACTOR) + _SAVE_OVERHEAD_BYTES
  if free < need:
    raise CheckpointError(
        f"{directory}: no space left for the next checkpoint (needs about {need / 2**20:.1f} MiB, "
        f"{free / 2**20:.1f} MiB free); checkpoints written so far are intact: free some space and "
        "run the same command again to resume")


def process_local() -> ocp.options.MultiprocessingOptions:
  """Orbax options for reads/writes that one process does alone (no cross-process barriers)."""
  me = jax.process_index()
  return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})


class _QuietOrbaxFailures(py_logging.Filter):
  """Drops orbax's own error records while a failing read is reported by us in one line."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno < py_logging.ERROR


def _read_item(directory: str, handler: Any, target: PyTree | None = None) -> Any:
  """Restores one orbax item directory (JSON or arrays), raising CheckpointError when it fails."""
  checkpointer = ocp.Checkpointer(handler, multiprocessing_options=process_local())
  quiet = _QuietOrbaxFailures()
  root = py_logging.getLogger()
  root.addFilter(quiet)
  try:
    if isinstance(handler, ocp.JsonCheckpointHandler):
      return checkpointer.restore(directory)
    if target is not None:
      return host_tree(checkpointer.restore(directory, args=ocp.args.StandardRestore(
          host_tree(target))))
    return host_tree(checkpointer.restore(directory, args=ocp.args.StandardRestore()))
  except CheckpointError:
    raise
  except Exception as e:  # corrupt or truncated files surface as many error types
    raise CheckpointError(f"{directory}: cannot be restored ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})"[:500]) from None
  finally:
    root.removeFilter(quiet)
    checkpointer.close()


def read_json(directory: str) -> dict[str, Any]:
  data = _read_item(directory, ocp.JsonCheckpointHandler())
  if not isinstance(data, Mapping):
    raise CheckpointError(f"{directory}: holds JSON that is not an object")
  return dict(data)


def read_arrays(directory: str, target: PyTree | None = None) -> PyTree:
  return _read_item(directory, ocp.StandardCheckpointHandler(), target)


# ---------------------------------------------------------------------------------------------
# Training-state checkpoints.

class TrainCheckpoints:
  """Periodic training checkpoints under `<workdir>/checkpoints/`, keeping the newest N.

  `save` takes a host pytree (numpy leaves) and a JSON-serialisable `meta` dict; with
  `async_save` the write happens in the background while training continues.
  """

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, CHECKPOINTS_DIR)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep and keep > 0 else None,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,  # leftovers of a killed save
        create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: PyTree, meta: Mapping[str, Any]) -> None:
    state = host_tree(state)
    # An asynchronous save still in flight holds space the check cannot see yet.
    self.manager.wait_until_finished()
    check_free_space(self.directory, tree_bytes(state))
    meta = dict(meta, step=int(step), checksum=tree_checksum(state))
    self.manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def restore_step(self, step: int, target: PyTree | None = None
                   ) -> tuple[PyTree, dict[str, Any]]:
    """Restores one step (raises CheckpointError if unreadable or its checksum differs)."""
    return restore_step_dir(os.path.join(self.directory, str(step)), target)

  def restore_latest(self, target: PyTree | None = None
                     ) -> tuple[PyTree, dict[str, Any]] | None:
    """The newest step that restores cleanly, or None when there is no step at all.

    Newer steps that fail are reported with one warning line each and, once an older step has
    restored (proof that the failure is the files', not the reader's), moved to
    `<workdir>/corrupt_checkpoints/` so that training can write those step numbers again.
    Raises CheckpointError when steps exist but none can be read.
    """
    failures = []
    for step in reversed(self.all_steps()):
      try:
        restored = self.restore_step(step, target)
      except CheckpointError as e:
        logging.warning("%s; falling back to the previous checkpoint", e)
        failures.append((step, e))
        continue
      for bad_step, _ in failures:
        self._quarantine(bad_step)
      return restored
    if failures:
      raise CheckpointError(f"no checkpoint under {self.directory} can be restored (newest: "
                            f"{failures[0][1]}); move the directory away to start afresh")
    return None

  def _quarantine(self, step: int) -> None:
    if jax.process_index() != 0:
      return
    src = os.path.join(self.directory, str(step))
    dst_dir = os.path.join(self.workdir, CORRUPT_DIR)
    os.makedirs(dst_dir, exist_ok=True)
    dst = os.path.join(dst_dir, f"{step}-{int(time.time())}")
    try:
      shutil.move(src, dst)
      logging.warning("Moved the unreadable checkpoint to %s", dst)
    except OSError as e:
      logging.warning("Could not move %s aside: %s", src, e)
    self.manager.reload()


def restore_step_dir(step_dir: str, target: PyTree | None = None
                     ) -> tuple[PyTree, dict[str, Any]]:
  """Reads `state` and `meta` of one training step directory and checks the state's checksum.

  With `target` (a pytree of arrays of the expected structure, shapes and dtypes) the state is
  restored into that structure; without it, as nested dicts of numpy arrays.
  """
  meta_dir = os.path.join(step_dir, "meta")
  if not os.path.isdir(meta_dir):
    raise CheckpointError(f"{step_dir} has no 'meta' item: not a star-jax training checkpoint")
  meta = read_json(meta_dir)
  state = read_arrays(os.path.join(step_dir, "state"), target)
  expected = meta.get("checksum")
  if expected is not None and tree_checksum(state) != expected:
    raise CheckpointError(f"{step_dir}: checksum mismatch: the stored arrays were modified")
  return state, meta
