"""Checkpoints: training state (resume), the best model by validation NME, inference checkpoints.

Layout of a training workdir:
  config.json                 the resolved configuration of the run
  checkpoints/<step>/         orbax CheckpointManager step directories, items `state` (the full
                              train state as a state dict) and `meta` (JSON: step, checksum,
                              config, logging accumulators, best NME so far)
  best/                       an inference checkpoint (below) of the best validation NME
  metrics.jsonl, tensorboard/ logs (star_jax.logging_utils)

An inference checkpoint directory (`save_for_inference`) holds `model.json` (the model class and
its fields), `config.json`, `variables/` (orbax; {"params", "batch_stats"}, the EMA weights for a
training run) and optionally `variables_raw/` (the weights without EMA).

Atomicity: orbax writes every step into `<step>.orbax-checkpoint-tmp-*` and renames it when
complete, and the manager ignores such directories, so a run killed at any moment leaves only
complete steps behind. The best model is written the same way (temporary directory, rename).
On top of that each step stores a CRC32 of the state; a step that fails to restore or whose
checksum differs is moved to `<workdir>/corrupt_checkpoints/` with a warning and the previous
step is used.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import time
import zlib
from typing import TYPE_CHECKING, Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

if TYPE_CHECKING:  # imported where used, so inference and the GPU check run without it
  import ml_collections

PyTree = Any

CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
CORRUPT_DIR = "corrupt_checkpoints"
MODEL_FILE = "model.json"
VARIABLES_DIR = "variables"
RAW_VARIABLES_DIR = "variables_raw"
BEST_META_FILE = "best.json"


# ---------------------------------------------------------------------------------------------
# Configuration files.

def config_to_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True)


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """A ConfigDict from `config_to_json` output, typed like the base config where it can be."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  values = json.loads(text)
  try:
    from configs import base
    config = base.get_base_config(values.get("dataset", "wflw"))
    _merge(config, values)
    return config
  except ImportError:  # installed without the configs package
    return ml_collections.ConfigDict(values)


def _merge(config: ml_collections.ConfigDict, values: Mapping[str, Any]) -> None:
  import ml_collections  # pylint: disable=g-import-not-at-top
  for key, value in values.items():
    if isinstance(value, Mapping) and key in config and isinstance(
        config[key], ml_collections.ConfigDict):
      _merge(config[key], value)
      continue
    if key in config and isinstance(config[key], tuple) and isinstance(value, list):
      value = tuple(value)
    with config.unlocked():
      config[key] = value


def write_config(workdir: str, config: ml_collections.ConfigDict) -> str:
  """Writes the resolved configuration to `<workdir>/config.json` (atomically)."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  _write_text_atomic(path, config_to_json(config))
  return path


def read_config(path: str) -> ml_collections.ConfigDict:
  with open(path) as f:
    return config_from_json(f.read())


def _write_text_atomic(path: str, text: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Training-state checkpoints.

def tree_checksum(tree: PyTree) -> int:
  """CRC32 over the bytes of every leaf in flattening order (detects silent corruption)."""
  crc = 0
  for leaf in jax.tree.leaves(tree):
    crc = zlib.crc32(np.ascontiguousarray(leaf).tobytes(), crc)
  return crc


def _host_tree(tree: PyTree) -> PyTree:
  return jax.tree.map(np.asarray, tree)


def _process_local() -> ocp.options.MultiprocessingOptions:
  """Orbax options for reads/writes that one process does alone (no cross-process barriers)."""
  me = jax.process_index()
  return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})


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
    state = _host_tree(state)
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
    """Restores one step (raises if unreadable or its checksum differs)."""
    return restore_step_dir(os.path.join(self.directory, str(step)), target)

  def restore_latest(self, target: PyTree | None = None
                     ) -> tuple[PyTree, dict[str, Any]] | None:
    """The newest step that restores cleanly, or None when there is no step at all.

    Newer steps that fail are reported with a warning and, once an older step has restored
    (proof that the failure is the files', not the reader's), moved to
    `<workdir>/corrupt_checkpoints/` so that training can write those step numbers again.
    Raises when steps exist but none can be read.
    """
    failures = []
    for step in reversed(self.all_steps()):
      try:
        restored = self.restore_step(step, target)
      except Exception as e:  # corrupt or truncated files surface as many error types
        path = os.path.join(self.directory, str(step))
        logging.warning("Checkpoint %s cannot be restored (%s: %s); falling back to the "
                        "previous one.", path, type(e).__name__, e)
        failures.append((step, e))
        continue
      for bad_step, _ in failures:
        self._quarantine(bad_step)
      return restored
    if failures:
      details = "; ".join(f"step {s}: {type(e).__name__}: {e}" for s, e in failures)
      raise IOError(f"no checkpoint under {self.directory} can be restored ({details}); move "
                    "the directory away to start afresh")
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
  """Reads `state` and `meta` of one step directory and checks the state's checksum.

  With `target` (a pytree of arrays of the expected structure, shapes and dtypes) the state is
  restored into that structure; without it, as nested dicts of numpy arrays.
  """
  meta = _read_meta(step_dir)
  checkpointer = ocp.StandardCheckpointer(multiprocessing_options=_process_local())
  try:
    if target is not None:
      state = checkpointer.restore(os.path.join(step_dir, "state"), _host_tree(target))
    else:
      state = checkpointer.restore(os.path.join(step_dir, "state"))
  finally:
    checkpointer.close()
  state = _host_tree(state)
  expected = meta.get("checksum")
  if expected is not None and tree_checksum(state) != expected:
    raise IOError(f"checksum mismatch in {step_dir}: the stored arrays were modified")
  return state, meta


def _read_meta(step_dir: str) -> dict[str, Any]:
  meta_dir = os.path.join(step_dir, "meta")
  if not os.path.isdir(meta_dir):
    raise FileNotFoundError(f"{step_dir} has no 'meta' item: not a star-jax training checkpoint")
  checkpointer = ocp.Checkpointer(ocp.JsonCheckpointHandler(),
                                  multiprocessing_options=_process_local())
  try:
    return dict(checkpointer.restore(meta_dir))
  finally:
    checkpointer.close()


# ---------------------------------------------------------------------------------------------
# Inference checkpoints.

def _model_fields(model) -> dict[str, Any]:
  fields = {}
  for field in dataclasses.fields(model):
    if field.name in ("parent", "name"):
      continue
    value = getattr(model, field.name)
    if field.name == "dtype" or field.name.endswith("_dtype"):
      value = None if value is None else jnp.dtype(value).name
    elif field.name == "bn_axis_name":
      value = None  # inference never synchronises statistics
    fields[field.name] = _jsonable(value)
  return fields


def _jsonable(value: Any) -> Any:
  if isinstance(value, (tuple, list)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def _tuples(value: Any) -> Any:
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def _model_from_description(description: Mapping[str, Any]):
  module_name, _, class_name = description["class"].rpartition(".")
  cls = getattr(importlib.import_module(module_name), class_name)
  fields = {}
  for name, value in description["fields"].items():
    if name == "dtype" or name.endswith("_dtype"):
      value = None if value is None else jnp.dtype(value)
    else:
      value = _tuples(value)
    fields[name] = value
  return cls(**fields)


def _save_variables(directory: str, variables: PyTree) -> None:
  checkpointer = ocp.StandardCheckpointer(multiprocessing_options=_process_local())
  try:
    checkpointer.save(directory, _host_tree(variables))
    checkpointer.wait_until_finished()
  finally:
    checkpointer.close()


def _load_variables(directory: str) -> PyTree:
  checkpointer = ocp.StandardCheckpointer(multiprocessing_options=_process_local())
  try:
    return _host_tree(checkpointer.restore(directory))
  finally:
    checkpointer.close()


def save_for_inference(out_dir: str, model, variables: PyTree,
                       config: ml_collections.ConfigDict | None = None, *,
                       raw_variables: PyTree | None = None,
                       extra: Mapping[str, Any] | None = None) -> str:
  """Writes a standalone inference checkpoint that `load_for_inference(out_dir)` reads.

  `variables` ({"params", "batch_stats"}) are the default weights (EMA for a training run);
  `raw_variables`, when given, are what `load_for_inference(..., ema=False)` returns. `extra`
  is stored in `best.json` (e.g. step and validation NME). An existing `out_dir` is replaced
  only once the new one is complete.
  """
  out_dir = os.path.abspath(out_dir.rstrip("/"))
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = f"{out_dir}.tmp-{os.getpid()}-{int(time.time() * 1e3)}"
  os.makedirs(tmp)
  description = {"class": f"{type(model).__module__}.{type(model).__qualname__}",
                 "fields": _model_fields(model)}
  _write_text_atomic(os.path.join(tmp, MODEL_FILE), json.dumps(description, indent=2))
  if config is not None:
    _write_text_atomic(os.path.join(tmp, CONFIG_FILE), config_to_json(config))
  if extra is not None:
    _write_text_atomic(os.path.join(tmp, BEST_META_FILE), json.dumps(dict(extra), indent=2))
  _save_variables(os.path.join(tmp, VARIABLES_DIR), variables)
  if raw_variables is not None:
    _save_variables(os.path.join(tmp, RAW_VARIABLES_DIR), raw_variables)
  # Swap in: the old directory survives under `.old` until the new one is in place.
  old = f"{out_dir}.old"
  if os.path.exists(old):
    shutil.rmtree(old)
  if os.path.exists(out_dir):
    os.replace(out_dir, old)
  os.replace(tmp, out_dir)
  if os.path.exists(old):
    shutil.rmtree(old)
  return out_dir


def read_best_meta(workdir: str) -> dict[str, Any] | None:
  """`best.json` of `<workdir>/best` (step, val_nme), or None when no best model exists yet."""
  for name in (BEST_DIR, BEST_DIR + ".old"):
    path = os.path.join(workdir, name, BEST_META_FILE)
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)
  return None


def _load_inference_dir(path: str, ema: bool):
  with open(os.path.join(path, MODEL_FILE)) as f:
    model = _model_from_description(json.load(f))
  config_path = os.path.join(path, CONFIG_FILE)
  config = read_config(config_path) if os.path.exists(config_path) else None
  raw_dir = os.path.join(path, RAW_VARIABLES_DIR)
  if not ema and os.path.isdir(raw_dir):
    variables = _load_variables(raw_dir)
  else:
    if not ema:
      logging.info("%s stores one set of weights; ema=False returns it", path)
    variables = _load_variables(os.path.join(path, VARIABLES_DIR))
  return model, variables, config


def _is_step_dir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "state")) and os.path.isdir(os.path.join(path, "meta"))


def _model_from_config(config: ml_collections.ConfigDict):
  from star_jax import datasets
  from star_jax.models import create_model
  return create_model(config.model, datasets.get_spec(config.dataset))


def _from_train_state(state: Mapping[str, Any], meta: Mapping[str, Any], ema: bool, where: str):
  config = config_from_json(meta["config"]) if "config" in meta else None
  if config is None:
    raise ValueError(f"{where}: the checkpoint stores no configuration")
  prefix = "ema_" if ema and "ema_params" in state else ""
  variables = {"params": state[prefix + "params"],
               "batch_stats": state.get(prefix + "batch_stats", {})}
  return _model_from_config(config), variables, config


def _latest_train_checkpoint(directory: str):
  steps = sorted((int(n) for n in os.listdir(directory)
                  if n.isdigit() and _is_step_dir(os.path.join(directory, n))), reverse=True)
  if not steps:
    raise FileNotFoundError(f"{directory} contains no complete checkpoint step directory")
  for step in steps:
    step_dir = os.path.join(directory, str(step))
    try:
      return restore_step_dir(step_dir), step_dir
    except Exception as e:
      logging.warning("Checkpoint %s cannot be restored (%s: %s); trying the previous one.",
                      step_dir, type(e).__name__, e)
  raise IOError(f"no checkpoint in {directory} could be restored")


def load_for_inference(path: str, *, ema: bool | None = None):
  """`(model, variables, config)` for evaluation or prediction from any star-jax checkpoint.

  `path` may be:
    - a training workdir: its best model when present, else the latest training checkpoint;
    - an inference directory written by `save_for_inference` (e.g. `<workdir>/best`, or the
      output of `python -m star_jax.convert`);
    - the `checkpoints/` directory of a run (latest readable step) or one step directory;
    - an official STAR `.pkl` checkpoint (converted on the fly; `"net"`, the weights the official
      tester and evaluate.py load, unless `ema=True` asks for `"net_ema"`).
  `ema=None` (default) means the EMA weights of star-jax runs and `"net"` of an official file;
  `ema=False` gives the raw weights of star-jax runs. The model is built for
  inference (no BatchNorm synchronisation); `config` is the run's configuration (for an
  official checkpoint, the dataset's base configuration).
  """
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isfile(path):
    if path.endswith((".pkl", ".pth", ".pt")):
      from star_jax import convert
      model, variables = convert.load_official_checkpoint(path, ema=bool(ema))
      return model, variables, convert.config_for_model(model)
    raise ValueError(f"{path} is a file but not an official .pkl checkpoint; pass a directory")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint path {path} does not exist")
  ema = True if ema is None else ema
  if os.path.exists(os.path.join(path, MODEL_FILE)):
    return _load_inference_dir(path, ema)
  for name in (BEST_DIR, BEST_DIR + ".old"):
    best = os.path.join(path, name)
    if os.path.exists(os.path.join(best, MODEL_FILE)):
      return _load_inference_dir(best, ema)
  if _is_step_dir(path):
    state, meta = restore_step_dir(path)
    return _from_train_state(state, meta, ema, path)
  ckpt_dir = os.path.join(path, CHECKPOINTS_DIR)
  directory = ckpt_dir if os.path.isdir(ckpt_dir) else path
  (state, meta), step_dir = _latest_train_checkpoint(directory)
  return _from_train_state(state, meta, ema, step_dir)
