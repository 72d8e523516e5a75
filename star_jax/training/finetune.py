"""Starting a run from trained weights (`config.init_from`) and freezing parts of the network.

Everything network-specific is asked of the network class (the backbone contract of
`star_jax.models.base`), so any registered backbone fine-tunes and freezes the same way:

- `resolve_model_config`: the architecture fields (the class's `architecture_defaults`, e.g.
  the hourglass's `num_stacks`, `num_levels`, `channels`, `use_aam`, and the model name) come
  from the `init_from` checkpoint unless the config sets them; a set value that differs from
  the checkpoint's is a one-line error naming the fields. Without `init_from` unset fields take
  the class's defaults.
- `load_initial_variables`: every variable whose path and shape match the checkpoint's is
  loaded. When the run's landmark scheme differs from the checkpoint's (other points or edges),
  the top-level modules the class calls scheme-dependent (`is_scheme_dependent`: for the
  hourglass the heatmap, point-map and edge-map heads and the merge convolutions that read
  them) keep their fresh initialisation even where shapes happen to agree, since their
  channels would mean other points. A table of what was loaded and what was re-initialised is
  logged.
- `frozen_mask`: `config.freeze = "stem,stack0"` keeps the parameters of those groups
  (`freeze_groups` / `freeze_group` of the model) fixed; their BatchNorm statistics still
  follow the data, as in torch's train mode.
"""

from __future__ import annotations

import collections
import functools
import re
from typing import Any, Callable, Mapping

from absl import logging
import flax
import jax
import numpy as np

from star_jax.training import model_store
from star_jax.core import schemes as datasets
from star_jax import models
from star_jax.errors import UsageError

PyTree = Any


@functools.lru_cache(maxsize=2)
def _load(path: str, weights: str) -> model_store.LoadedModel:
  return model_store.load_model(path, weights=weights)


def init_checkpoint(config) -> model_store.LoadedModel:
  """The `init_from` checkpoint of `config` (loaded once per process)."""
  weights = str(config.init_weights)
  if weights not in model_store.WEIGHTS:
    raise UsageError(f"config.init_weights={weights!r}: use one of "
                     f"{', '.join(model_store.WEIGHTS)}")
  return _load(str(config.init_from), weights)


def resolve_model_config(config):
  """A copy of `config` whose architecture fields are all set (see the module docstring)."""
  config = config.copy_and_resolve_references()
  loaded = init_checkpoint(config) if config.init_from else None
  name = str(config.model.get("name", None) or models.DEFAULT_MODEL)
  if loaded is not None:
    theirs = getattr(type(loaded.model), "registry_name", "")
    if name != theirs:
      raise UsageError(f"config.init_from={config.init_from}: the config's architecture differs "
                       f"from the checkpoint's: model.name={name!r} (checkpoint: {theirs!r}); "
                       "drop this override to take the checkpoint's")
  cls = models.model_class(name)
  conflicts = []
  with config.unlocked():
    config.model.name = name
    for field, default in cls.architecture_defaults.items():
      value = config.model.get(field, None)
      if loaded is None:
        config.model[field] = default if value is None else value
        continue
      theirs = getattr(loaded.model, field)
      if value is None:
        config.model[field] = theirs
      elif value != theirs:
        conflicts.append(f"model.{field}={value} (checkpoint: {theirs})")
  if conflicts:
    raise UsageError(f"config.init_from={config.init_from}: the config's architecture differs "
                     f"from the checkpoint's: {', '.join(conflicts)}; drop these overrides to "
                     "take the checkpoint's")
  return config


def _same_scheme(a: datasets.DatasetSpec, b: datasets.DatasetSpec) -> bool:
  return (a.num_points == b.num_points
          and [tuple(e.points) for e in a.edges] == [tuple(e.points) for e in b.edges])


def merge_variables(fresh: PyTree, trained: PyTree, *,
                    reinitialise: Callable[[str], bool] | None = None
                    ) -> tuple[PyTree, dict[str, list[str]]]:
  """`fresh` with every leaf of `trained` whose path and shape match put in, except in the
  top-level modules for which `reinitialise(module)` is true (another landmark scheme: the
  model class's `is_scheme_dependent`), which keep their fresh values.

  Returns the merged variables and a report {'loaded', 'shape', 'scheme', 'missing'} of
  top-level module names (per collection).
  """
  report: dict[str, list[str]] = collections.defaultdict(list)
  merged = {}
  for collection, tree in fresh.items():
    flat = flax.traverse_util.flatten_dict(tree)
    theirs = flax.traverse_util.flatten_dict(trained.get(collection, {}))
    out = {}
    for path, value in flat.items():
      module = path[0]
      other = theirs.get(path)
      if reinitialise is not None and reinitialise(module):
        reason = "scheme"
      elif other is None:
        reason = "missing"
      elif tuple(np.shape(other)) != tuple(np.shape(value)):
        reason = "shape"
      else:
        out[path] = np.asarray(other, np.asarray(value).dtype)
        report["loaded"].append(f"{collection}/{module}")
        continue
      out[path] = value
      report[reason].append(f"{collection}/{module}")
    merged[collection] = flax.traverse_util.unflatten_dict(out)
  return merged, {k: sorted(set(v)) for k, v in report.items()}


def _compact(names: list[str]) -> str:
  """'params/heatmap_head0', 'params/heatmap_head1' -> 'params/heatmap_head{0,1}'."""
  groups: dict[str, list[str]] = collections.defaultdict(list)
  for name in names:
    match = re.match(r"^(.*?)(\d+)$", name)
    stem, index = (match.group(1), match.group(2)) if match else (name, "")
    groups[stem].append(index)
  parts = []
  for stem, indices in sorted(groups.items()):
    indices = sorted(i for i in indices if i)
    parts.append(f"{stem}{{{','.join(indices)}}}" if len(indices) > 1 else
                 f"{stem}{indices[0] if indices else ''}")
  return ", ".join(parts)


def load_initial_variables(config, model, spec: datasets.DatasetSpec, fresh: PyTree) -> PyTree:
  """The run's initial variables: `fresh` overwritten by the matching checkpoint variables."""
  loaded = init_checkpoint(config)
  reinit = None if _same_scheme(loaded.spec, spec) else type(model).is_scheme_dependent
  merged, report = merge_variables(fresh, jax.tree.map(np.asarray, loaded.variables),
                                   reinitialise=reinit)
  if not report.get("loaded"):
    raise UsageError(f"config.init_from={config.init_from}: no variable of the checkpoint fits "
                     "this network")
  logging.info("init_from %s (%s weights, scheme %s -> %s):", config.init_from, loaded.weights,
               loaded.spec.name, spec.name)
  logging.info("  loaded          %d modules", len(report["loaded"]))
  for reason, label in (("scheme", "new scheme"), ("shape", "other shape"),
                        ("missing", "not in checkpoint")):
    if report.get(reason):
      logging.info("  re-initialised  %s (%s)", _compact(report[reason]), label)
  return merged


def frozen_mask(config, model) -> Callable[[PyTree], PyTree] | None:
  """`params -> tree of bools` (True: frozen) for `config.freeze`, or None when nothing is."""
  text = str(config.get("freeze", "") or "").strip()
  if not text:
    return None
  groups = tuple(model.freeze_groups())
  chosen = set()
  for part in (p.strip() for p in text.split(",") if p.strip()):
    if part not in groups:
      raise UsageError(f"config.freeze: {part!r} is not a part of {type(model).__name__}; "
                       f"choose from {', '.join(groups)}")
    chosen.add(part)

  def mask(params: Mapping[str, Any]) -> PyTree:
    out = {}
    for module, subtree in params.items():
      flag = model.freeze_group(module) in chosen
      out[module] = jax.tree.map(lambda _, f=flag: f, subtree)
    return out

  return mask
