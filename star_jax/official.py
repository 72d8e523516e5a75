"""Reading official STAR (PyTorch) checkpoints as data, without PyTorch, into flax variables.

The official trainer writes `torch.save({"net": state_dict, "net_ema": state_dict, "optimizer":
..., "scheduler": ..., "epoch": ...})`. That file is a zip archive holding `data.pkl` (a pickle
whose tensors point, by key, at raw storages) and one `data/<key>` file of raw bytes per
storage. It is read here without PyTorch: a restricted unpickler resolves only the few globals a
state dict needs (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`, the typed storage
classes); any other global becomes an inert placeholder, so nothing in the file is executed.
Tensors stay lazy (storage key, offset, shape, strides) until the chosen state dict is converted.

The architecture (stacks, levels, channels, points, use of AAM heads and the E2H edge membership)
is read from the state dict itself. Conversion turns OIHW kernels into HWIO, BatchNorm running
statistics into the `batch_stats` collection, and permutes the first convolution's three image
input channels (BGR -> RGB) so that RGB input here equals the official model on BGR input.

`python -m star_jax.convert` (star_jax/convert.py) writes the result as a star-jax checkpoint.
"""

from __future__ import annotations

import builtins
import collections
import dataclasses
import logging
import os
import pickle
import zipfile
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from star_jax import datasets
from star_jax.errors import CheckpointError, UsageError
from star_jax.models.hourglass import StackedHourglass, parameter_shapes

# The first convolution sees [B, G, R, xx, yy, rr] in the official net and [R, G, B, xx, yy, rr]
# here: input channel j here is official channel FIRST_CONV_INPUT_ORDER[j].
FIRST_CONV_INPUT_ORDER = (2, 1, 0, 3, 4, 5)

_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


# ---------------------------------------------------------------------------------------------
# Reading the torch.save zip format without torch.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _StorageType:
  name: str
  dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _StorageRef:
  key: str
  dtype: np.dtype
  numel: int


@dataclasses.dataclass(frozen=True)
class LazyTensor:
  """A tensor of the checkpoint, read from its storage only when `numpy()` is called."""

  storage: _StorageRef
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]
  reader: "_ArchiveReader" = dataclasses.field(compare=False, repr=False)

  @property
  def dtype(self) -> np.dtype:
    return self.storage.dtype

  def numpy(self) -> np.ndarray:
    flat = self.reader.storage_array(self.storage)
    if not self.shape:
      return np.array(flat[self.offset])
    extent = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride)) + 1
    if min(self.shape) > 0 and extent > flat.size:
      raise CheckpointError(f"{self.reader.path}: tensor of shape {self.shape} reaches past the "
                            f"end of storage data/{self.storage.key} ({flat.size} elements)")
    strides = tuple(s * flat.itemsize for s in self.stride)
    view = np.lib.stride_tricks.as_strided(flat[self.offset:], self.shape, strides)
    return np.array(view)


class _Opaque:
  """Stand-in for any global the checkpoint names that a state dict does not need."""

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    del state

  def __call__(self, *args, **kwargs):
    return _Opaque()


def _opaque_class(module: str, name: str) -> type:
  return type(f"Opaque[{module}.{name}]", (_Opaque,), {})


class _ArchiveReader:
  """Owns the open zip archive and the decoded storages (shared between tensors)."""

  def __init__(self, path: str, archive: zipfile.ZipFile, prefix: str, byteorder: str):
    self.path = path
    self.archive = archive
    self.prefix = prefix
    self.byteorder = byteorder
    self._cache: dict[str, np.ndarray] = {}

  def storage_array(self, ref: _StorageRef) -> np.ndarray:
    if ref.key not in self._cache:
      member = f"{self.prefix}data/{ref.key}"
      try:
        raw = self.archive.read(member)
      except KeyError:
        raise CheckpointError(f"{self.path}: storage {member} is missing from the archive "
                              "(truncated or incomplete file)") from None
      except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{self.path}: storage {member} is corrupt ({e})") from None
      dtype = ref.dtype.newbyteorder("<" if self.byteorder == "little" else ">")
      expected = ref.numel * dtype.itemsize
      if len(raw) != expected:
        raise CheckpointError(f"{self.path}: storage {member} has {len(raw)} bytes, expected "
                              f"{expected} ({ref.numel} x {ref.dtype})")
      self._cache[ref.key] = np.frombuffer(raw, dtype).astype(ref.dtype, copy=False)
    return self._cache[ref.key]


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles `data.pkl` resolving only what a state dict needs; executes nothing else."""

  def __init__(self, file, reader: _ArchiveReader):
    super().__init__(file)
    self.reader = reader

  def find_class(self, module: str, name: str):
    if module == "collections" and name in ("OrderedDict", "Counter"):
      return getattr(collections, name)
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return self._rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_tensor":
      return self._rebuild_tensor
    if module == "torch._utils" and name in ("_rebuild_parameter",
                                             "_rebuild_parameter_with_state"):
      return lambda data, *args: data
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name, _STORAGE_DTYPES[name])
    if module == "builtins" and name in ("set", "frozenset", "slice", "complex"):
      return getattr(builtins, name)
    return _opaque_class(module, name)

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
      raise CheckpointError(f"{self.reader.path}: unsupported persistent id {pid!r} in data.pkl")
    storage_type, key, _, numel = pid[1:5]
    if not isinstance(storage_type, _StorageType):
      raise CheckpointError(f"{self.reader.path}: unsupported storage type {storage_type!r} "
                            f"for storage {key}")
    return _StorageRef(str(key), storage_type.dtype, int(numel))

  def _rebuild_tensor(self, storage, offset, shape, stride, *args):
    del args  # requires_grad, backward hooks, metadata: irrelevant for weights
    if not isinstance(storage, _StorageRef):
      raise CheckpointError(f"{self.reader.path}: tensor without a storage in data.pkl")
    return LazyTensor(storage, int(offset), tuple(int(n) for n in shape),
                      tuple(int(s) for s in stride), self.reader)


def read_torch_checkpoint(path: str) -> Any:
  """Reads a `torch.save` zip file into Python objects with `LazyTensor` leaves (no torch)."""
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file")
  try:
    archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile:
    with open(path, "rb") as f:
      head = f.read(4)
    what = ("a zip archive truncated or damaged" if head.startswith(b"PK")
            else "not a zip archive; official checkpoints are torch.save zip files (torch >= 1.6)"
            if head[:1] != b"\x80" else
            "a legacy (pre-1.6) torch.save file; re-save it with a recent torch")
    raise CheckpointError(f"{path}: {what}") from None
  except OSError as e:
    raise CheckpointError(f"{path}: cannot read ({e})") from None
  pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
  if not pickles:
    raise CheckpointError(f"{path}: zip archive without <name>/data.pkl: not a torch.save file")
  prefix = pickles[0][: -len("data.pkl")]
  try:
    byteorder = archive.read(prefix + "byteorder").decode().strip()
  except KeyError:
    byteorder = "little"
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise CheckpointError(f"{path}: {prefix}byteorder is corrupt ({e})") from None
  reader = _ArchiveReader(path, archive, prefix, byteorder)
  try:
    with archive.open(pickles[0]) as f:
      return _RestrictedUnpickler(f, reader).load()
  except CheckpointError:
    raise
  except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, OSError, ValueError,
          TypeError, AttributeError, IndexError, KeyError) as e:
    raise CheckpointError(f"{path}: {pickles[0]} is corrupt ({type(e).__name__}: {e})") from None


def select_state_dict(obj: Any, *, ema: bool = False, path: str = "checkpoint"
                      ) -> dict[str, LazyTensor]:
  """Picks `"net"` (or `"net_ema"`) from a trainer checkpoint, or takes a bare state dict, and
  strips a DataParallel `module.` prefix."""
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict or state dict")
  key = "net_ema" if ema else "net"
  if "net" in obj or "net_ema" in obj:
    if key not in obj:
      raise CheckpointError(f"{path}: has no {key!r} entry (entries: {', '.join(map(str, obj))})")
    state = obj[key]
    if not isinstance(state, Mapping):
      raise CheckpointError(f"{path}: {key!r} is a {type(state).__name__}, not a state dict")
  else:
    if ema:
      raise CheckpointError(f"{path}: a bare state dict has no 'net_ema' weights; drop --ema")
    state = obj
  out = {}
  for name, value in state.items():
    name = str(name)
    if name.startswith("module."):
      name = name[len("module."):]
    if not isinstance(value, LazyTensor):
      raise CheckpointError(f"{path}: state-dict entry {name!r} is a {type(value).__name__}, "
                            "not a tensor")
    out[name] = value
  if not out:
    raise CheckpointError(f"{path}: the state dict is empty")
  return out


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
  edges = tuple(datasets.Edge(f"edge{k}", False, tuple(points))
                for k, points in enumerate(arch.edge_points))
  return datasets.DatasetSpec(name=f"official_{arch.num_points}pt", num_points=arch.num_points,
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
