"""The official STAR layout: StackedHGNetV1 state dicts -> star-jax's StackedHourglass.

This module owns what a STAR state dict means. The architecture (stacks, levels, channels,
points, use of AAM heads and the E2H edge membership) is read from the state dict itself.
Conversion turns OIHW kernels into HWIO, BatchNorm running statistics into the `batch_stats`
collection, and permutes the first convolution's three image input channels (BGR -> RGB) so
that RGB input here equals the official model on BGR input. The state dict's values are
`star_jax.foreign.torch_files.LazyTensor`s (anything with `.shape` and `.numpy()`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from star_jax.core import schemes as datasets
from star_jax.errors import CheckpointError, UsageError
from star_jax.foreign.torch_files import LazyTensor
from star_jax.models.hourglass import StackedHourglass, parameter_shapes

# The first convolution sees [B, G, R, xx, yy, rr] in the official net and [R, G, B, xx, yy, rr]
# here: input channel j here is official channel FIRST_CONV_INPUT_ORDER[j].
FIRST_CONV_INPUT_ORDER = (2, 1, 0, 3, 4, 5)

# ---------------------------------------------------------------------------------------------
# Architecture inference.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Architecture:
  num_stacks: int
  num_levels: int
  channels: int
  num_points: int
  edge_points: tuple[tuple[int, ...], ...]
  use_aam: bool
  dataset: str | None  # a known dataset whose edges match the E2H transform, if any


def _require(state: Mapping[str, LazyTensor], key: str, path: str) -> LazyTensor:
  if key not in state:
    raise CheckpointError(f"{path}: state dict lacks {key!r}; not an official StackedHGNetV1 "
                          "checkpoint (or a truncated one)")
  return state[key]


def infer_architecture(state: Mapping[str, LazyTensor], path: str = "checkpoint"
                       ) -> Architecture:
  """Reads stacks, levels, channels, points, edges and the E2H membership from a state dict."""
  coordconv = _require(state, "hgs.0.coordconv.conv.weight", path)
  if len(coordconv.shape) != 4:
    raise CheckpointError(f"{path}: hgs.0.coordconv.conv.weight has shape {coordconv.shape}, "
                          "expected (C, C + 3, 1, 1)")
  channels = coordconv.shape[0]
  num_stacks = 0
  while f"hgs.{num_stacks}.coordconv.conv.weight" in state:
    num_stacks += 1
  num_levels = 0
  while f"hgs.0{'.low2' * num_levels}.up1.bn1.weight" in state:
    num_levels += 1
  if num_levels == 0:
    raise CheckpointError(f"{path}: state dict lacks 'hgs.0.up1.bn1.weight' (hourglass blocks)")
  low1 = _require(state, "hgs.0.low1.conv3.conv.weight", path)
  if low1.shape[0] != channels:
    raise CheckpointError(f"{path}: hourglass width grows inside the hourglass (increase != 0: "
                          f"{channels} -> {low1.shape[0]} channels), which is not supported")
  num_points = _require(state, "out_heatmaps.0.conv.weight", path).shape[0]
  use_aam = "out_pointmaps.0.conv.weight" in state
  edge_points: tuple[tuple[int, ...], ...] = ()
  dataset = None
  if use_aam:
    weight = _require(state, "e2h_transform.weight", path)
    bias = _require(state, "e2h_transform.bias", path)
    num_edges = _require(state, "out_edgemaps.0.conv.weight", path).shape[0]
    if weight.shape != (num_points, num_edges, 1, 1) or bias.shape != (num_points,):
      raise CheckpointError(f"{path}: e2h_transform has weight {weight.shape} and bias "
                            f"{bias.shape}; expected ({num_points}, {num_edges}, 1, 1) and "
                            f"({num_points},)")
    edge_points, dataset = _edges_from_e2h(weight.numpy()[:, :, 0, 0], bias.numpy(), path)
  else:
    spec = _spec_or_none(num_points)
    dataset = spec.name if spec else None
  return Architecture(num_stacks, num_levels, channels, num_points, edge_points, use_aam, dataset)


def _spec_or_none(num_points: int) -> datasets.DatasetSpec | None:
  try:
    return datasets.spec_for_num_points(num_points)
  except UsageError:
    return None


def _edges_from_e2h(weight: np.ndarray, bias: np.ndarray, path: str
                    ) -> tuple[tuple[tuple[int, ...], ...], str | None]:
  """Edge membership from the official E2H buffers `weight (N, E)`, `bias (N,)`."""
  if not np.all((weight == 0) | (weight == 1)):
    raise CheckpointError(f"{path}: e2h_transform.weight holds values other than 0 and 1")
  expected_bias = (weight.sum(axis=1) < 0.5).astype(np.float32)
  if not np.array_equal(bias.astype(np.float32), expected_bias):
    raise CheckpointError(f"{path}: e2h_transform.bias is not 1 exactly on the points that lie "
                          "on no edge")
  membership = [frozenset(np.nonzero(weight[:, e])[0].tolist()) for e in range(weight.shape[1])]
  for spec in datasets.SPECS.values():
    if (spec.num_points == weight.shape[0]
        and [frozenset(edge.points) for edge in spec.edges] == membership):
      # The known table also keeps each edge's point order (the E2H matrix does not).
      return tuple(tuple(edge.points) for edge in spec.edges), spec.name
  logging.warning("%s: the E2H edges match no known dataset; using them as stored", path)
  return tuple(tuple(sorted(points)) for points in membership), None


def model_from_architecture(arch: Architecture, dtype: Any = jnp.float32,
                            precision: str | None = None) -> StackedHourglass:
  return StackedHourglass(num_stacks=arch.num_stacks, num_levels=arch.num_levels,
                          channels=arch.channels, num_points=arch.num_points,
                          edge_points=arch.edge_points, use_aam=arch.use_aam, dtype=dtype,
                          keep_unused_skip=True, precision=precision)


# ---------------------------------------------------------------------------------------------
# Name mapping official -> flax.
# ---------------------------------------------------------------------------------------------


def _res_block(official: str, flax_path: tuple[str, ...]) -> Iterator[tuple[str, str, tuple]]:
  for i in (1, 2, 3):
    yield "bn", f"{official}.bn{i}", flax_path + (f"bn{i}",)
    yield "conv", f"{official}.conv{i}.conv", flax_path + (f"conv{i}",)
  yield "conv", f"{official}.skip_layer.conv", flax_path + ("skip",)


def _hourglass(official: str, flax_path: tuple[str, ...], levels: int
               ) -> Iterator[tuple[str, str, tuple]]:
  yield from _res_block(f"{official}.up1", flax_path + ("up1",))
  yield from _res_block(f"{official}.low1", flax_path + ("low1",))
  if levels > 1:
    yield from _hourglass(f"{official}.low2", flax_path + ("low2",), levels - 1)
  else:
    yield from _res_block(f"{official}.low2", flax_path + ("low2",))
  yield from _res_block(f"{official}.low3", flax_path + ("low3",))


def layer_mapping(arch: Architecture) -> list[tuple[str, str, tuple[str, ...]]]:
  """(kind, official module prefix, flax module path) for every conv ('conv') and BN ('bn')."""
  layers = [("conv", "pre.0.conv", ("stem_conv",)), ("bn", "pre.0.bn", ("stem_bn",))]
  layers += _res_block("pre.1", ("stem_block1",))
  layers += _res_block("pre.3", ("stem_block2",))
  layers += _res_block("pre.4", ("stem_block3",))
  heads = [("out_heatmaps", "heatmap_head")]
  merges = [("merge_features", "merge_features"), ("merge_heatmaps", "merge_heatmaps")]
  if arch.use_aam:
    heads += [("out_pointmaps", "pointmap_head"), ("out_edgemaps", "edgemap_head")]
    merges += [("merge_pointmaps", "merge_pointmaps"), ("merge_edgemaps", "merge_edgemaps")]
  for i in range(arch.num_stacks):
    layers.append(("conv", f"hgs.{i}.coordconv.conv", (f"hourglass{i}", "coordconv")))
    layers += _hourglass(f"hgs.{i}", (f"hourglass{i}",), arch.num_levels)
    layers += _res_block(f"features.{i}.0", (f"features{i}",))
    layers.append(("conv", f"features.{i}.1.conv", (f"features_conv{i}",)))
    layers.append(("bn", f"features.{i}.1.bn", (f"features_bn{i}",)))
    for official, ours in heads:
      layers.append(("conv", f"{official}.{i}.conv", (f"{ours}{i}",)))
    if i < arch.num_stacks - 1:
      for official, ours in merges:
        layers.append(("conv", f"{official}.{i}.conv", (f"{ours}{i}",)))
  return layers


def convert_state_dict(state: Mapping[str, LazyTensor], arch: Architecture,
                       path: str = "checkpoint") -> dict[str, Any]:
  """Official state dict -> flax variables {"params", "batch_stats"} (float32 numpy arrays)."""
  params: dict[tuple[str, ...], np.ndarray] = {}
  stats: dict[tuple[str, ...], np.ndarray] = {}
  used = set()

  def take(key: str) -> np.ndarray:
    used.add(key)
    array = _require(state, key, path).numpy()
    if not np.issubdtype(array.dtype, np.floating):
      raise CheckpointError(f"{path}: {key} has dtype {array.dtype}, expected floating point")
    return np.asarray(array, np.float32)

  for kind, official, ours in layer_mapping(arch):
    if kind == "conv":
      weight = take(f"{official}.weight")
      if weight.ndim != 4:
        raise CheckpointError(f"{path}: {official}.weight has shape {weight.shape}, expected a "
                              "4-d convolution kernel (out, in, kh, kw)")
      kernel = weight.transpose(2, 3, 1, 0)  # OIHW -> HWIO
      if official == "pre.0.conv":
        if kernel.shape[2] != len(FIRST_CONV_INPUT_ORDER):
          raise CheckpointError(f"{path}: pre.0.conv.weight has {kernel.shape[2]} input "
                                "channels, expected 6 (BGR + CoordConv xx, yy, rr)")
        kernel = kernel[:, :, list(FIRST_CONV_INPUT_ORDER), :]
      params[ours + ("kernel",)] = kernel
      params[ours + ("bias",)] = take(f"{official}.bias")
    else:
      params[ours + ("scale",)] = take(f"{official}.weight")
      params[ours + ("bias",)] = take(f"{official}.bias")
      stats[ours + ("mean",)] = take(f"{official}.running_mean")
      stats[ours + ("var",)] = take(f"{official}.running_var")

  ignored = {"e2h_transform.weight", "e2h_transform.bias"}
  unexpected = sorted(k for k in state if k not in used and k not in ignored
                      and not k.endswith("num_batches_tracked"))
  if unexpected:
    more = f" (+{len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
    raise CheckpointError(f"{path}: unexpected state-dict entries {', '.join(unexpected[:3])}"
                          f"{more} for the inferred architecture {arch}")

  model = model_from_architecture(arch)
  expected = parameter_shapes(model, image_size=4 * 2 ** arch.num_levels)
  variables = {"params": params, "batch_stats": stats}
  for collection, arrays in variables.items():
    want = traverse_util.flatten_dict(expected[collection])
    for name, leaf in want.items():
      if name not in arrays:
        raise CheckpointError(f"{path}: no official weight maps to {collection}/{'/'.join(name)}")
      if tuple(arrays[name].shape) != tuple(leaf.shape):
        official = _official_name(arch, name)
        raise CheckpointError(f"{path}: {official} has the wrong shape: converts to "
                              f"{arrays[name].shape}, the architecture needs {leaf.shape}")
  return {c: traverse_util.unflatten_dict(a) for c, a in variables.items()}


def _official_name(arch: Architecture, flax_name: tuple[str, ...]) -> str:
  suffix = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
            "var": "running_var"}[flax_name[-1]]
  for _, official, ours in layer_mapping(arch):
    if ours == flax_name[:-1]:
      return f"{official}.{suffix}"
  return "/".join(flax_name)
