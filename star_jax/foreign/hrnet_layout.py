"""HRNet's face-alignment layout: official HRNetV2-W18 state dicts -> `star_jax.models.hrnet`.

This module owns what an HRNet state dict (HRNet/HRNet-Facial-Landmark-Detection,
lib/models/hrnet.py's module names) means: how it is recognised and how its entries map onto
the flax variables. Parameter names here are the official module paths with '.' written '_', so
the conversion is a rename plus the kernel transpose (OIHW -> HWIO).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.traverse_util
import numpy as np

from star_jax.errors import CheckpointError
from star_jax.models import base
from star_jax.models.hrnet import HRNetW18

# Keys every official HRNet face state dict has (and a STAR one has not).
OFFICIAL_MARKER_KEYS = ("conv1.weight", "transition1.0.0.weight", "head.3.weight")


def is_official_state(state: Mapping[str, Any]) -> bool:
  return all(key in state for key in OFFICIAL_MARKER_KEYS)


def convert_official_state(state: Mapping[str, Any], path: str = "checkpoint",
                           precision: str | None = "highest"
                           ) -> tuple["HRNetW18", dict[str, Any]]:
  """`(model, variables)` from an official state dict (keys without `module.`; values with
  `.shape` and `.numpy()`).

  The architecture (points, width) is read from the head and the first transition; every
  official entry must map onto a variable of that architecture with the same shape and every
  variable must be filled, otherwise a one-line `CheckpointError` names the entry.
  """
  head = state["head.3.weight"]
  transition = state["transition1.0.0.weight"]
  if len(head.shape) != 4 or len(transition.shape) != 4:
    raise CheckpointError(f"{path}: head.3.weight {tuple(head.shape)} and transition1.0.0.weight "
                          f"{tuple(transition.shape)} must be convolution kernels "
                          "(out, in, kh, kw)")
  model = HRNetW18(num_points=int(head.shape[0]), width=int(transition.shape[0]),
                   precision=precision)
  want = {c: flax.traverse_util.flatten_dict(tree)
          for c, tree in base.parameter_shapes(model).items()}
  variables: dict[str, dict[tuple[str, ...], np.ndarray]] = {c: {} for c in want}
  for key, tensor in state.items():
    module, _, leaf = key.rpartition(".")
    if leaf == "num_batches_tracked":
      continue
    ours = module.replace(".", "_")
    is_bn = f"{module}.running_mean" in state
    target = {("weight", False): ("params", "kernel"), ("bias", False): ("params", "bias"),
              ("weight", True): ("params", "scale"), ("bias", True): ("params", "bias"),
              ("running_mean", True): ("batch_stats", "mean"),
              ("running_var", True): ("batch_stats", "var")}.get((leaf, is_bn))
    name = (ours, target[1]) if target else None
    if target is None or name not in want[target[0]]:
      raise CheckpointError(f"{path}: unexpected state-dict entry {key!r} for HRNetV2-W"
                            f"{model.width} with {model.num_points} points")
    array = tensor.numpy()
    if not np.issubdtype(array.dtype, np.floating):
      raise CheckpointError(f"{path}: {key} has dtype {array.dtype}, expected floating point")
    array = np.asarray(array, np.float32)
    if target[1] == "kernel":
      if array.ndim != 4:
        raise CheckpointError(f"{path}: {key} has shape {array.shape}, expected a 4-d "
                              "convolution kernel (out, in, kh, kw)")
      array = array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    expected = tuple(want[target[0]][name].shape)
    if array.shape != expected:
      raise CheckpointError(f"{path}: {key} has the wrong shape: converts to {array.shape}, the "
                            f"architecture needs {expected}")
    variables[target[0]][name] = array
  for collection, leaves in want.items():
    missing = sorted(set(leaves) - set(variables[collection]))
    if missing:
      raise CheckpointError(f"{path}: state dict lacks the weights of {collection}/"
                            f"{'/'.join(missing[0])} (+{len(missing) - 1} more); a truncated "
                            "file or another architecture")
  return model, {c: flax.traverse_util.unflatten_dict(v) for c, v in variables.items()}
