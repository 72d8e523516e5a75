"""The landmark networks: a registry by name, and their description as plain data.

`config.model.name` picks the network class. A network is one module
`star_jax/models/<name>.py` that defines a flax `nn.Module` with a
`from_config(model_config, spec, *, bn_axis_name=None)` classmethod, registers it with
`@registry.register("<name>")` and returns a `ModelOutput`; `create_model` imports that module
the first time the name is asked for, so nothing else needs editing.

A trained network is stored as its description, `{"name": ..., "fields": {...}}`: the registry
name and the dataclass fields as JSON numbers, strings, booleans and lists. `from_description`
rebuilds it: the class comes from the registry of networks already imported (never from the
file, which cannot make star-jax import or call anything), every field is checked against
the type of the class's own default, and sizes against `SIZE_LIMITS` (before anything is built).
`check_variables` then holds the stored weights to the description: every variable's path,
shape and dtype, and (by default) that every value is finite.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
from typing import Any, Mapping

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from star_jax.core import records
from star_jax.errors import CheckpointError, UsageError
from star_jax.models import registry
from star_jax.models.hourglass import (ModelOutput, StackedHourglass, count_parameters,
                                       init_variables, parameter_shapes)

DEFAULT_MODEL = "stacked_hourglass"
# Compute dtypes a description may name.
DTYPES = ("float32", "bfloat16", "float16", "float64")
# Older checkpoints named the class by its import path; this one path is still accepted.
_LEGACY_CLASS_NAMES = {"star_jax.models.hourglass.StackedHourglass": DEFAULT_MODEL}
# Networks shipped with star-jax whose module is not named after them (`model_class` imports
# it for a config; `from_description` for a stored model, since the table, not the file, names
# the module).
_BUILTIN_MODULES = {"hrnet_w18": "star_jax.models.hrnet"}
# Fields that never travel with a description (flax's own and run-time-only settings).
_NOT_DESCRIBED = ("parent", "name", "bn_axis_name")
# Inclusive ranges of the size fields a description may give (any network with such a field),
# so that a file cannot ask for an absurd network: the released models use 4 stacks, 4 levels,
# 256 channels and 98 points.
SIZE_LIMITS = {"num_stacks": (1, 16), "num_levels": (1, 8), "channels": (1, 4096),
               "num_points": (1, 4096), "width": (1, 512), "blocks": (1, 16)}
# Any other integer field.
_INT_LIMIT = 1 << 20


def model_class(name: str) -> type:
  """The registered network `name`, importing `star_jax.models.<name>` if needed (config use)."""
  if registry.lookup(name) is None and name in _BUILTIN_MODULES:
    importlib.import_module(_BUILTIN_MODULES[name])
  if registry.lookup(name) is None and name.isidentifier():
    try:
      importlib.import_module(f"star_jax.models.{name}")
    except ModuleNotFoundError as e:
      if e.name != f"star_jax.models.{name}":
        raise
  cls = registry.lookup(name)
  if cls is None:
    raise UsageError(f"config.model.name={name!r} is not a registered model; known: "
                     f"{', '.join(registry.names())}")
  return cls


def create_model(model_config: Any, spec: Any, *, bn_axis_name: str | None = None):
  """The network `model_config.name` (default: the stacked hourglass) for a landmark scheme."""
  get = model_config.get if hasattr(model_config, "get") else (
      lambda k, d=None: getattr(model_config, k, d))
  dtype = get("dtype", "float32")
  if str(dtype) not in DTYPES:
    raise UsageError(f"config.model.dtype={dtype!r} is not one of {', '.join(DTYPES)}")
  cls = model_class(str(get("name", DEFAULT_MODEL) or DEFAULT_MODEL))
  return cls.from_config(model_config, spec, bn_axis_name=bn_axis_name)


# ---------------------------------------------------------------------------------------------
# Description <-> model.

def _plain(value: Any) -> Any:
  if isinstance(value, (tuple, list)):
    return [_plain(v) for v in value]
  if hasattr(value, "item") and not isinstance(value, (str, bytes)):
    return value.item()
  return value


def describe(model, *, trained_on: str | None = None) -> dict[str, Any]:
  """`{"name", "fields"}`: what `from_description` needs to rebuild `model` (for inference);
  with `trained_on` (see `training_data`) also `"trained_on"`, which the rebuild ignores."""
  name = getattr(type(model), "registry_name", None)
  if name is None or registry.lookup(name) is not type(model):
    raise ValueError(f"{type(model).__name__} is not a registered model")
  fields = {}
  for field in dataclasses.fields(model):
    if field.name in _NOT_DESCRIBED:
      continue
    value = getattr(model, field.name)
    if field.name == "dtype":
      value = jnp.dtype(value).name
    fields[field.name] = _plain(value)
  description = {"name": name, "fields": fields}
  if trained_on:
    description["trained_on"] = str(trained_on)
  return description


def architecture(model) -> dict[str, Any]:
  """`{"name": registry name, <field>: value, ...}` for the fields the class says describe its
  architecture (`architecture_defaults`, the backbone contract), as JSON values: the short
  summary an export's sidecar carries (the full description is `describe`)."""
  fields = describe(model)["fields"]
  summary = {"name": type(model).registry_name}
  for field in getattr(type(model), "architecture_defaults", {}):
    if field in fields:
      summary[field] = fields[field]
  return summary


def training_data(config: Any) -> str | None:
  """What a run's model learns from: `embedded` (`datasets.SYNTHETIC_DATASET`, the synthetic
  faces) when `config.data.source` is the embedded dataset, else `config.dataset`."""
  from star_jax.core import schemes as datasets
  if config is None:
    return None
  try:
    source, dataset = str(config.data.source), config.dataset
  except (AttributeError, KeyError):
    return None
  if source == "embedded":
    return datasets.SYNTHETIC_DATASET
  return str(dataset) if dataset else None


def trained_on(description: Any, config: Any = None) -> str | None:
  """The dataset a stored model was trained on: its description's `trained_on`, else (older
  checkpoints) what its run's config says, else None (unknown)."""
  value = description.get("trained_on") if isinstance(description, Mapping) else None
  if isinstance(value, str) and value:
    return value
  return training_data(config)


def _int_tuple(value: Any, depth: int) -> tuple | None:
  """A (nested) tuple of ints from lists, or None when `value` has another shape."""
  if not isinstance(value, list):
    return None
  if depth == 1:
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
      return tuple(value)
    return None
  items = [_int_tuple(v, depth - 1) for v in value]
  return None if any(i is None for i in items) else tuple(items)


@functools.lru_cache(maxsize=None)
def _field_rules(cls: type) -> dict[str, records.Rule]:
  """The rule of each described field of `cls`: the type of its default, sizes bounded by
  `SIZE_LIMITS` (other integers by `_INT_LIMIT`), the dtype one of `DTYPES`."""
  rules = records.rules_from_dataclass(cls, {"dtype": records.Rule("str", choices=DTYPES)},
                                       skip=_NOT_DESCRIBED)
  for name, rule in rules.items():
    if rule.kind == "int":
      low, high = SIZE_LIMITS.get(name, (0, _INT_LIMIT - 1))
      rules[name] = records.Rule("int", low=low, high=high)
    elif rule.required:  # the description may leave any field at its default
      rules[name] = dataclasses.replace(rule, required=False)
  return rules


def _field_value(cls: type, name: str, value: Any, where: str) -> Any:
  """A checked field's value converted to what the network takes (dtypes, nested tuples)."""
  bad = lambda want: CheckpointError(
      f"{where}: field {name!r} of model {cls.registry_name!r} must be {want}, got "
      f"{value!r}"[:300])
  kind = _field_rules(cls)[name].kind
  if name == "dtype":
    return jnp.dtype(value)
  if kind == "list":
    depth = 2 if name.endswith("points") else 1
    converted = _int_tuple(value, depth)
    if converted is None or len(converted) > _INT_LIMIT or (depth == 2 and any(
        len(v) > _INT_LIMIT for v in converted)):
      raise bad("a list of lists of integers" if depth == 2 else "a list of integers")
    return converted
  if kind in ("any", "float"):
    raise bad("a value of a type descriptions do not carry")
  return value


def from_description(description: Mapping[str, Any], where: str = "model description"):
  """Rebuilds a network from `describe` output; any unknown name, field or type is an error."""
  if not isinstance(description, Mapping):
    raise CheckpointError(f"{where}: not a JSON object")
  name = description.get("name")
  if name is None and "class" in description:
    name = _LEGACY_CLASS_NAMES.get(description["class"])
    if name is None:
      raise CheckpointError(f"{where}: names class {str(description['class'])[:200]!r}, which "
                            "is not a star-jax model; nothing was imported")
  if isinstance(name, str) and registry.lookup(name) is None and name in _BUILTIN_MODULES:
    importlib.import_module(_BUILTIN_MODULES[name])
  cls = registry.lookup(name) if isinstance(name, str) else None
  if cls is None:
    raise CheckpointError(f"{where}: model {str(name)[:200]!r} is not registered (known: "
                          f"{', '.join(registry.names())})")
  fields = description.get("fields", {})
  if not isinstance(fields, Mapping):
    raise CheckpointError(f"{where}: 'fields' must be a JSON object")
  # Descriptions written before the registry carried `bn_axis_name: null`; the loader, not the
  # file, decides BatchNorm synchronisation.
  fields = {k: v for k, v in fields.items() if not (k in _NOT_DESCRIBED and v is None)}
  checked = records.check_record(fields, _field_rules(cls), where, error=CheckpointError,
                                 label=f"field {{!r}} of model {cls.registry_name!r}".format)
  kwargs = {key: _field_value(cls, key, checked[key], where) for key in fields}
  num_points = kwargs.get("num_points", getattr(cls, "num_points", None))
  for edge in kwargs.get("edge_points", ()) if isinstance(num_points, int) else ():
    outside = [p for p in edge if not 0 <= p < num_points]
    if outside:
      raise CheckpointError(f"{where}: edge_points name landmark {outside[0]}, outside the "
                            f"model's {num_points} points")
  return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Stored weights against the description.

def _path_name(path: tuple) -> str:
  return "/".join(str(k) for k in path)


@functools.lru_cache(maxsize=8)
def _expected_variables(description_json: str, where: str) -> dict[tuple, jax.ShapeDtypeStruct]:
  """Path -> shape and dtype of every variable of the described network (traced, not built)."""
  model = from_description(json.loads(description_json), where)  # sizes bounded first
  shapes = parameter_shapes(model)  # at the model's smallest input (`min_image_size`)
  return {path: leaf for path, leaf in flax.traverse_util.flatten_dict(dict(shapes)).items()}


def check_variables(model, variables: Mapping[str, Any], where: str, *,
                    check_finite: bool = True) -> None:
  """CheckpointError (one line naming the variable) unless `variables` are exactly what `model`
  declares: the same paths, each with the model's shape and dtype, and (with `check_finite`)
  no NaN or infinity. Nothing is allocated for the model: its variables are traced.
  """
  try:
    expected = _expected_variables(json.dumps(describe(model), sort_keys=True), where)
  except ValueError as e:  # the network refuses its own description (e.g. AAM without edges)
    raise CheckpointError(f"{where}: the model description does not make a network "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
  if not isinstance(variables, Mapping):
    raise CheckpointError(f"{where}: the weights are not a tree of named variables")
  stored = flax.traverse_util.flatten_dict(
      {k: dict(v) if isinstance(v, Mapping) else v for k, v in variables.items()})
  missing = sorted(set(expected) - set(stored))
  extra = sorted(set(stored) - set(expected))
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise CheckpointError(f"{where}: variable {_path_name(missing[0])} is missing{more}; the "
                          "weights do not belong to this model description")
  if extra:
    more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
    raise CheckpointError(f"{where}: variable {_path_name(extra[0])} is not part of the "
                          f"described model{more}")
  for path in sorted(expected):
    want, leaf = expected[path], stored[path]
    name = _path_name(path)
    shape, dtype = tuple(getattr(leaf, "shape", ())), getattr(leaf, "dtype", None)
    if dtype is None or not hasattr(leaf, "__array__"):
      raise CheckpointError(f"{where}: variable {name} is a {type(leaf).__name__}, not an array")
    if shape != tuple(want.shape):
      raise CheckpointError(f"{where}: variable {name} has shape {shape}; the model "
                            f"description needs {tuple(want.shape)}")
    if np.dtype(dtype) != np.dtype(want.dtype):
      raise CheckpointError(f"{where}: variable {name} is {np.dtype(dtype).name}; the model "
                            f"needs {np.dtype(want.dtype).name}")
    if check_finite:
      bad = int(np.size(leaf) - np.count_nonzero(np.isfinite(np.asarray(leaf))))
      if bad:
        raise CheckpointError(f"{where}: variable {name} holds {bad} non-finite value(s) "
                              "(NaN or infinity); refusing weights that cannot predict")


__all__ = ["DEFAULT_MODEL", "SIZE_LIMITS", "ModelOutput", "StackedHourglass", "architecture",
           "check_variables",
           "count_parameters", "create_model", "describe", "from_description", "init_variables",
           "model_class", "parameter_shapes", "trained_on", "training_data"]
