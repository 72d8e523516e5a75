"""Official checkpoints (STAR, HRNet) read as data, without PyTorch, into flax variables.

This module owns the public entry points (`load_official`, `load_official_checkpoint`,
`read_official`) and the choice of the state dict inside a checkpoint (`select_state_dict`).
The work is split by what it knows:

- `star_jax.foreign.torch_files`: the torch.save formats (zip and legacy), read from a hostile
  file as data, never running code from it (`read_torch_checkpoint`, `LazyTensor`).
- `star_jax.foreign.star_layout`: the official STAR layout (StackedHGNetV1): the architecture
  read from the state dict and the conversion to star-jax's StackedHourglass.
- `star_jax.foreign.hrnet_layout`: HRNet's face-alignment HRNetV2 layout.

The official STAR trainer writes `torch.save({"net": state_dict, "net_ema": state_dict,
"optimizer": ..., "scheduler": ..., "epoch": ...})`; HRNet's tools `{"state_dict": ...}` or a
bare state dict. `python -m star_jax.convert` (star_jax/commands/convert.py) writes the result
as a star-jax checkpoint.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from star_jax.core import schemes as datasets
from star_jax.errors import CheckpointError
from star_jax.foreign import hrnet_layout
from star_jax.foreign.star_layout import (Architecture, _spec_or_none, convert_state_dict,
                                          infer_architecture, model_from_architecture)
from star_jax.foreign.torch_files import LazyTensor, _a_type, _short, read_torch_checkpoint
from star_jax.models.hourglass import StackedHourglass

# With the names callers take from here that the other modules define.
__all__ = ["Architecture", "CheckpointError", "LazyTensor", "infer_architecture",
           "load_official", "load_official_checkpoint", "read_official",
           "read_torch_checkpoint", "scheme_of_architecture", "select_state_dict"]


def select_state_dict(obj: Any, *, ema: bool = False, path: str = "checkpoint"
                      ) -> dict[str, LazyTensor]:
  """Picks `"net"` (or `"net_ema"`) from a trainer checkpoint, `"state_dict"` from HRNet's, or
  takes a bare state dict, and strips a DataParallel `module.` prefix."""
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path}: holds {_a_type(obj)}, not a dict or state dict")
  key = "net_ema" if ema else "net"
  if "state_dict" in obj and "net" not in obj and "net_ema" not in obj:
    # A training checkpoint of other projects (HRNet's tools: {'state_dict': ..., 'epoch': ...}).
    if ema:
      raise CheckpointError(f"{path}: a 'state_dict' checkpoint has no 'net_ema' weights; drop "
                            "--ema")
    state = obj["state_dict"]
    if not isinstance(state, Mapping):
      raise CheckpointError(f"{path}: 'state_dict' is {_a_type(state)}, not a state dict")
  elif "net" in obj or "net_ema" in obj:
    if key not in obj:
      entries = ", ".join(_short(k) for k in list(obj)[:8]) + (", ..." if len(obj) > 8 else "")
      raise CheckpointError(f"{path}: has no {key!r} entry (entries: {entries})")
    state = obj[key]
    if not isinstance(state, Mapping):
      raise CheckpointError(f"{path}: {key!r} is {_a_type(state)}, not a state dict")
  else:
    if ema:
      raise CheckpointError(f"{path}: a bare state dict has no 'net_ema' weights; drop --ema")
    state = obj
  out = {}
  for name, value in state.items():
    if type(name) is not str:
      raise CheckpointError(f"{path}: state-dict key {_short(name)} is {_a_type(name)}, "
                            "not a name")
    if name.startswith("module."):
      name = name[len("module."):]
    if not isinstance(value, LazyTensor):
      raise CheckpointError(f"{path}: state-dict entry {_short(name)} is "
                            f"{_a_type(value)}, not a tensor")
    if name in out:
      raise CheckpointError(f"{path}: state-dict entry {_short(name)} appears twice (with and "
                            "without the 'module.' prefix)")
    out[name] = value
  if not out:
    raise CheckpointError(f"{path}: the state dict is empty")
  return out


# ---------------------------------------------------------------------------------------------
# Public entry points.
# ---------------------------------------------------------------------------------------------


def read_official(path: str, *, ema: bool = False) -> tuple[Architecture, dict[str, Any]]:
  """`(architecture, variables)` of an official STAR checkpoint (see `load_official_checkpoint`)."""
  path = os.fspath(path)
  obj = read_torch_checkpoint(path)
  state = select_state_dict(obj, ema=ema, path=path)
  arch = infer_architecture(state, path)
  variables = convert_state_dict(state, arch, path)
  return arch, jax.tree_util.tree_map(jnp.asarray, variables)


def scheme_of_architecture(arch: Architecture) -> datasets.DatasetSpec:
  """The landmark scheme a converted official network predicts.

  A known dataset when its points and E2H edges match one; otherwise a scheme with the stored
  edges, no flip pairs and the box-diagonal NME (nothing else can be read from the weights).
  """
  if arch.dataset is not None:
    return datasets.get_spec(arch.dataset)
  return _stored_scheme(arch.num_points, arch.edge_points)


def _stored_scheme(num_points: int, edge_points: tuple[tuple[int, ...], ...]
                   ) -> datasets.DatasetSpec:
  """A scheme of `num_points` with the stored edges, no flip pairs and the box-diagonal NME."""
  edges = tuple(datasets.Edge(f"edge{k}", False, tuple(points))
                for k, points in enumerate(edge_points))
  return datasets.DatasetSpec(name=f"official_{num_points}pt", num_points=num_points,
                              edges=edges, flip_pairs=(), ocular=None, pupil=None,
                              default_norm="diagonal", failure_threshold=0.1)


def load_official_checkpoint(path: str, *, ema: bool = False,
                             precision: str | None = "highest"
                             ) -> tuple[StackedHourglass, dict[str, Any]]:
  """Reads an official STAR checkpoint into `(model, variables)`.

  `ema=False` takes `"net"` (what the official tester and evaluate.py load: the better of the
  plain and EMA networks at the best epoch); `ema=True` takes `"net_ema"`. A bare state dict
  (with or without a `module.` prefix) is accepted too. The model's convolutions default to
  `precision="highest"` so the official float32 outputs are reproduced on GPUs too (whose
  default is TF32); `model.clone(precision=None)` trades that for speed. Raises
  `CheckpointError` with a one-line message naming what is wrong.
  """
  arch, variables = read_official(path, ema=ema)
  return model_from_architecture(arch, precision=precision), variables


def load_official(path: str, *, ema: bool = False, precision: str | None = "highest"
                  ) -> tuple[Any, dict[str, Any], datasets.DatasetSpec]:
  """`(model, variables, scheme)` of a released checkpoint of a known layout, read as data.

  STAR's StackedHGNetV1 files (see `load_official_checkpoint`) and HRNet's face-alignment
  HRNetV2 files (`star_jax.models.hrnet`: a plain state dict with or without `module.`, or
  under `'state_dict'`; zip or legacy format). The scheme is the built-in dataset with the
  network's number of points (and, for STAR, its E2H edges) when one matches.
  """
  path = os.fspath(path)
  state = select_state_dict(read_torch_checkpoint(path), ema=ema, path=path)
  if hrnet_layout.is_official_state(state):
    model, variables = hrnet_layout.convert_official_state(state, path, precision=precision)
    spec = _spec_or_none(model.num_points) or _stored_scheme(model.num_points, ())
    return model, jax.tree_util.tree_map(jnp.asarray, variables), spec
  arch = infer_architecture(state, path)
  variables = convert_state_dict(state, arch, path)
  return (model_from_architecture(arch, precision=precision),
          jax.tree_util.tree_map(jnp.asarray, variables), scheme_of_architecture(arch))
