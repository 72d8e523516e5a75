"""Models on disk for inference: the inference checkpoint format, the best model of a run, and
`load_model`, the one loader of any checkpoint (eval, predict, export, convert).

An inference checkpoint is a directory with items `model` (JSON: the model description of
`star_jax.models.describe`, the landmark scheme, the input size, optionally the run's config and
extra facts such as the step and validation NME), `variables` ({"params", "batch_stats"}: the EMA
weights of a training run) and optionally `variables_raw` (the weights without EMA). Everything
in it is data: the network class comes from the model registry, never from the file.
`<workdir>/best/<step>/` is one (`BestCheckpoints`); training state is
`star_jax.training.checkpointing`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import TYPE_CHECKING, Any, Mapping

from absl import logging
import numpy as np
import orbax.checkpoint as ocp

from star_jax import __version__
from star_jax import models
from star_jax.core import schemes as datasets
from star_jax.errors import CheckpointError
from star_jax.training import checkpointing

if TYPE_CHECKING:
  import ml_collections

PyTree = Any

MODEL_ITEM = "model"
VARIABLES_ITEM = "variables"
RAW_VARIABLES_ITEM = "variables_raw"
INFERENCE_ITEMS = (MODEL_ITEM, VARIABLES_ITEM, RAW_VARIABLES_ITEM)
OFFICIAL_SUFFIXES = (".pkl", ".pth", ".pt")
DEFAULT_IMAGE_SIZE = 256

_LEGACY_MODEL_FILE = "model.json"
_LEGACY_CONFIG_FILE = "config.json"
_FORMAT = 2

# ---------------------------------------------------------------------------------------------
# What a loaded network comes with.

@dataclasses.dataclass
class LoadedModel:
  """A network ready for inference and the facts needed to use it."""

  model: Any                  # a registered flax module (`star_jax.models`)
  variables: PyTree           # {"params", "batch_stats"}
  spec: datasets.DatasetSpec  # the landmark scheme it predicts
  image_size: int             # square input side it was trained at
  config: Any = None          # the run's ConfigDict (star-jax training runs), else None
  source: str = ""            # the path it was loaded from
  weights: str = ""           # 'ema', 'raw', or the official state-dict key
  extra: dict = dataclasses.field(default_factory=dict)  # e.g. step and validation NME
  trained_on: str | None = None  # the dataset it learnt ('embedded': synthetic faces), if known

  @property
  def num_points(self) -> int:
    return int(self.spec.num_points)


def model_record(model, spec: datasets.DatasetSpec, image_size: int,
                 config: ml_collections.ConfigDict | None = None,
                 extra: Mapping[str, Any] | None = None,
                 trained_on: str | None = None) -> dict[str, Any]:
  """The JSON `model` item of an inference checkpoint (`trained_on`: by default what `config`
  trains on)."""
  description = models.describe(model, trained_on=trained_on or models.training_data(config))
  return {"format": _FORMAT, "star_jax_version": __version__, "model": description,
          "scheme": spec.to_dict(), "image_size": int(image_size),
          "config": None if config is None else checkpointing.config_to_json(config),
          "extra": dict(extra or {})}


def _from_record(record: Mapping[str, Any], variables: PyTree, where: str, weights: str
                 ) -> LoadedModel:
  model = models.from_description(record.get("model"), where)
  spec = datasets.scheme_from_dict(record.get("scheme"), where, for_training=False) if record.get(
      "scheme") is not None else datasets.spec_for_num_points(model.num_points)
  if int(spec.num_points) != int(model.num_points):
    raise CheckpointError(f"{where}: the scheme has {spec.num_points} points but the model "
                          f"description {model.num_points}")
  image_size = record.get("image_size", DEFAULT_IMAGE_SIZE)
  if isinstance(image_size, bool) or not isinstance(image_size, int) or not 0 < image_size < 8192:
    raise CheckpointError(f"{where}: image_size must be a positive integer, got {image_size!r}")
  config_text = record.get("config")
  config = checkpointing.config_from_json(config_text) if isinstance(config_text, str) else None
  extra = record.get("extra") if isinstance(record.get("extra"), Mapping) else {}
  return LoadedModel(model, variables, spec, image_size, config, where, weights, dict(extra),
                     trained_on=models.trained_on(record.get("model"), config))


# ---------------------------------------------------------------------------------------------
# Inference checkpoints.

def _inference_args(record: Mapping[str, Any], variables: PyTree,
                    raw_variables: PyTree | None) -> ocp.args.Composite:
  items = {MODEL_ITEM: ocp.args.JsonSave(dict(record)),
           VARIABLES_ITEM: ocp.args.StandardSave(checkpointing.host_tree(variables))}
  if raw_variables is not None:
    items[RAW_VARIABLES_ITEM] = ocp.args.StandardSave(checkpointing.host_tree(raw_variables))
  return ocp.args.Composite(**items)


def save_for_inference(out_dir: str, model, variables: PyTree, *, spec: datasets.DatasetSpec,
                       image_size: int, config: ml_collections.ConfigDict | None = None,
                       raw_variables: PyTree | None = None,
                       extra: Mapping[str, Any] | None = None,
                       trained_on: str | None = None) -> str:
  """Writes an inference checkpoint directory that `load_model(out_dir)` reads.

  `variables` ({"params", "batch_stats"}) are the default weights (EMA for a training run);
  `raw_variables`, when given, are what `load_model(..., weights="raw")` returns. An existing
  `out_dir` is replaced (orbax writes the new one under a temporary name first).
  """
  out_dir = os.path.abspath(out_dir.rstrip("/"))
  os.makedirs(os.path.dirname(out_dir), exist_ok=True)
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler(),
                                  multiprocessing_options=checkpointing.process_local())
  try:
    checkpointer.save(out_dir, _inference_args(
        model_record(model, spec, image_size, config, extra, trained_on), variables,
        raw_variables),
        force=True)
  finally:
    checkpointer.close()
  return out_dir


class BestCheckpoints:
  """`<workdir>/best/`: the inference checkpoint of the lowest validation NME seen so far.

  An orbax CheckpointManager with `best_fn` (keeps the one step with the lowest `val_nme`).
  """

  def __init__(self, workdir: str):
    self.directory = os.path.join(os.path.abspath(workdir), checkpointing.BEST_DIR)
    # Only process 0 keeps the best model: no cross-process barriers.
    os.makedirs(self.directory, exist_ok=True)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1, best_fn=lambda metrics: metrics["val_nme"], best_mode="min",
        enable_async_checkpointing=False, cleanup_tmp_directories=True, create=False,
        multiprocessing_options=checkpointing.process_local())
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=INFERENCE_ITEMS)

  def save(self, step: int, val_nme: float, model, variables: PyTree, *,
           spec: datasets.DatasetSpec, image_size: int, config: ml_collections.ConfigDict,
           raw_variables: PyTree | None = None, extra: Mapping[str, Any] | None = None) -> None:
    extra = dict(extra or {}, step=int(step), val_nme=float(val_nme))
    if self._keeps_existing(int(step), float(val_nme)):
      return
    checkpointing.check_free_space(self.directory, checkpointing.tree_bytes(variables) + (
        checkpointing.tree_bytes(raw_variables) if raw_variables is not None else 0))
    record = model_record(model, spec, image_size, config, extra)
    self.manager.save(int(step), args=_inference_args(record, variables, raw_variables),
                      metrics={"val_nme": float(val_nme)}, force=True)
    self.manager.wait_until_finished()

  def _keeps_existing(self, step: int, val_nme: float) -> bool:
    """Whether `best/<step>` already holds this step's model (a run killed after writing it,
    before its training checkpoint, repeats the step exactly): kept when it is complete and
    records the same validation NME; otherwise it is removed so that the step is written anew
    (never orbax's StepAlreadyExistsError)."""
    if step not in self.manager.all_steps():
      return False
    step_dir = os.path.join(self.directory, str(step))
    try:
      record = checkpointing.read_json(os.path.join(step_dir, MODEL_ITEM))
      recorded = float(record["extra"]["val_nme"])
      complete = _is_inference_dir(step_dir)
    except (CheckpointError, KeyError, TypeError, ValueError):
      recorded, complete = math.nan, False
    if complete and math.isclose(recorded, val_nme, rel_tol=1e-6, abs_tol=1e-9):
      logging.info("best/%d already holds this step's model (validation NME %.6f): kept",
                   step, recorded)
      return True
    logging.warning("best/%d exists but does not match this run (recorded validation NME %s, "
                    "now %.6f): replaced", step, recorded, val_nme)
    self.manager.delete(step)
    self.manager.reload()
    return False

  def close(self) -> None:
    self.manager.close()


def _is_inference_dir(path: str) -> bool:
  return (os.path.isdir(os.path.join(path, MODEL_ITEM))
          and os.path.isdir(os.path.join(path, VARIABLES_ITEM))) or os.path.isfile(
              os.path.join(path, _LEGACY_MODEL_FILE))


def _numbered_subdirs(path: str) -> list[int]:
  try:
    names = os.listdir(path)
  except OSError:
    return []
  return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(path, n)))


def _load_inference_dir(path: str, weights: str) -> LoadedModel:
  raw_dir = os.path.join(path, RAW_VARIABLES_ITEM)
  label = "raw" if weights == "raw" else "ema"
  if os.path.isfile(os.path.join(path, _LEGACY_MODEL_FILE)):
    record = _read_legacy_record(path)
  else:
    record = checkpointing.read_json(os.path.join(path, MODEL_ITEM))
  if weights == "raw" and os.path.isdir(raw_dir):
    variables = checkpointing.read_arrays(raw_dir)
  else:
    if weights == "raw":
      logging.info("%s stores one set of weights; --weights raw returns it", path)
      label = "single"
    variables = checkpointing.read_arrays(os.path.join(path, VARIABLES_ITEM))
  return _from_record(record, variables, path, label)


def _read_legacy_record(path: str) -> dict[str, Any]:
  """The `model` record of a directory written before the `model` item existed."""
  where = os.path.join(path, _LEGACY_MODEL_FILE)
  try:
    with open(where, encoding="utf-8") as f:
      description = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{where}: cannot be read ({e})") from None
  record: dict[str, Any] = {"model": description}
  model = models.from_description(description, where)
  config_path = os.path.join(path, _LEGACY_CONFIG_FILE)
  if os.path.isfile(config_path):
    with open(config_path, encoding="utf-8") as f:
      record["config"] = f.read()
    config = checkpointing.config_from_json(record["config"])
    record["image_size"] = int(config.data.image_size)
    record["scheme"] = datasets.get_spec(str(config.dataset)).to_dict()
  else:
    record["scheme"] = datasets.spec_for_num_points(model.num_points).to_dict()
  best = os.path.join(path, "best.json")
  if os.path.isfile(best):
    with open(best, encoding="utf-8") as f:
      record["extra"] = json.load(f)
  return record


def _best_step_dir(best_dir: str) -> str | None:
  """The step directory of `best/` with the lowest recorded validation NME (else the newest)."""
  candidates = []
  for step in _numbered_subdirs(best_dir):
    step_dir = os.path.join(best_dir, str(step))
    if not _is_inference_dir(step_dir):
      continue
    try:
      extra = checkpointing.read_json(os.path.join(step_dir, MODEL_ITEM)).get("extra", {})
      nme = float(extra.get("val_nme", np.inf))
    except (CheckpointError, TypeError, ValueError):
      nme = np.inf
    candidates.append((nme, -step, step_dir))
  return min(candidates)[2] if candidates else None


def read_best_meta(workdir: str) -> dict[str, Any] | None:
  """The `extra` facts (step, val_nme, ...) of `<workdir>/best`, or None when there is none."""
  step_dir = _best_step_dir(os.path.join(workdir, checkpointing.BEST_DIR))
  if step_dir is None:
    return None
  return dict(checkpointing.read_json(os.path.join(step_dir, MODEL_ITEM)).get("extra", {}))


def _from_train_state(state: Mapping[str, Any], meta: Mapping[str, Any], weights: str,
                      where: str) -> LoadedModel:
  if "config" not in meta:
    raise CheckpointError(f"{where}: the checkpoint stores no configuration")
  config = checkpointing.config_from_json(meta["config"])
  use_ema = weights != "raw" and "ema_params" in state
  prefix = "ema_" if use_ema else ""
  variables = {"params": state[prefix + "params"],
               "batch_stats": state.get(prefix + "batch_stats", {})}
  record = {"model": meta.get("model"), "scheme": meta.get("scheme"),
            "image_size": int(config.data.image_size), "config": meta["config"],
            "extra": {"step": int(meta.get("step", 0))}}
  if record["model"] is None:  # written before descriptions were stored
    spec = datasets.get_spec(str(config.dataset))
    record["model"] = models.describe(models.create_model(config.model, spec))
    record["scheme"] = spec.to_dict()
  return _from_record(record, variables, where, "ema" if use_ema else "raw")


def _latest_train_checkpoint(directory: str, weights: str) -> LoadedModel:
  steps = [s for s in reversed(_numbered_subdirs(directory))
           if os.path.isdir(os.path.join(directory, str(s), "meta"))]
  if not steps:
    raise CheckpointError(f"{directory}: no complete training checkpoint step in it")
  errors = []
  for step in steps:
    step_dir = os.path.join(directory, str(step))
    try:
      state, meta = checkpointing.restore_step_dir(step_dir)
      return _from_train_state(state, meta, weights, step_dir)
    except CheckpointError as e:
      logging.warning("%s; trying the previous checkpoint", e)
      errors.append(e)
  raise CheckpointError(f"{directory}: no training checkpoint can be restored (newest: "
                        f"{errors[0]})")


def is_official_checkpoint(path: str) -> bool:
  return os.path.isfile(path) and path.lower().endswith(OFFICIAL_SUFFIXES)


def _load_official(path: str, weights: str, trained_on: str | None = None) -> LoadedModel:
  from star_jax.foreign import official
  use_ema = weights == "ema"
  model, variables, spec = official.load_official(path, ema=use_ema, precision="highest")
  return LoadedModel(model, variables, spec, DEFAULT_IMAGE_SIZE, None, path,
                     "net_ema" if use_ema else "net", trained_on=trained_on)


WEIGHTS = ("default", "ema", "raw")


def load_model(path: str, *, weights: str = "default", check_finite: bool = True
               ) -> LoadedModel:
  """Any checkpoint, ready for inference; the one loader behind eval, predict, export, convert.

  `path` may be:
    - a training workdir: its best model when present, else the latest training checkpoint;
    - an inference checkpoint directory (`<workdir>/best/<step>`, the output of
      `python -m star_jax.convert`);
    - the `checkpoints/` or `best/` directory of a run, or one of their step directories;
    - an official STAR `.pkl` (read as data and converted on the fly);
    - the name of a released official model, 'wflw', '300w' or 'cofw' (when no such path
      exists): downloaded and checked on first use, then cached (`star_jax.deploy.released`).
  `weights`: 'default' (the EMA weights of star-jax runs; `"net"` of an official file, as the
  official tester and evaluate.py use), 'ema' or 'raw' (for an official file: `"net_ema"` or
  `"net"`). The model is built for inference (no BatchNorm synchronisation).
  The weights are held to the model description before the network is used
  (`models.check_variables`: every variable's path, shape and dtype; with `check_finite`, no
  NaN or infinity).
  Raises CheckpointError (one line, naming the path) for anything that is not a readable
  checkpoint or whose weights do not fit what it says it is.
  """
  if weights not in WEIGHTS:
    raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
  from star_jax.deploy import released
  release = released.lookup(path)
  if release is not None and not os.path.exists(os.path.expanduser(path)):
    loaded = _load_official(released.ensure(release.name), weights, trained_on=release.dataset)
  else:
    loaded = _load_unchecked(path, weights)
  models.check_variables(loaded.model, loaded.variables, loaded.source,
                         check_finite=check_finite)
  return loaded


def _load_unchecked(path: str, weights: str) -> LoadedModel:
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if os.path.isfile(path):
    if is_official_checkpoint(path):
      return _load_official(path, weights)
    raise CheckpointError(f"{path}: a file that is not an official STAR checkpoint "
                          f"({', '.join(OFFICIAL_SUFFIXES)}); star-jax checkpoints are "
                          "directories")
  if not os.path.isdir(path):
    from star_jax.deploy import released
    raise CheckpointError(f"{path}: no such checkpoint file or directory (or a released model: "
                          f"{', '.join(released.names())})")
  if _is_inference_dir(path):
    return _load_inference_dir(path, weights)
  if os.path.isdir(os.path.join(path, "meta")) and os.path.isdir(os.path.join(path, "state")):
    state, meta = checkpointing.restore_step_dir(path)
    return _from_train_state(state, meta, weights, path)
  best = _best_step_dir(os.path.join(path, checkpointing.BEST_DIR)) or _best_step_dir(path)
  if best is not None:
    return _load_inference_dir(best, weights)
  legacy_best = os.path.join(path, checkpointing.BEST_DIR)
  if _is_inference_dir(legacy_best):
    return _load_inference_dir(legacy_best, weights)
  ckpt_dir = os.path.join(path, checkpointing.CHECKPOINTS_DIR)
  if os.path.isdir(ckpt_dir):
    return _latest_train_checkpoint(ckpt_dir, weights)
  if _numbered_subdirs(path):
    return _latest_train_checkpoint(path, weights)
  raise CheckpointError(f"{path}: not a star-jax checkpoint (expected a training workdir, a "
                        "checkpoint directory or an official .pkl)")
