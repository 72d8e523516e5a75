"""The contract every exported model follows, and its sidecar JSON (read without JAX).

An exported model (ONNX, TFLite, SavedModel, StableHLO; see `star_jax.deploy.export`) takes

  `image`: float32 `[B, S, S, 3]`, RGB face crops with values 0-255 (the crop of
           `star_jax.data.transforms.crop_matrix`/`warp`); the model normalises them itself
           (`x / 255 * 2 - 1`, the evaluation normalisation);

and returns, first,

  `landmarks`: float32 `[B, N, 2]`, (x, y) in crop pixels, `p = ((l + 1) * S - 1) / 2` for the
           final stack's soft-argmax `l` in [-1, 1] (the official convention,
           `star_jax.data.transforms.denormalize_landmarks`);

and, when exported with `--heatmaps`, `heatmaps`: float32 `[B, S/4, S/4, N]`, the final stack's
fused heatmaps. S is 256 for every released model (the model's training image size in general).

Next to the model file `PATH` lies `PATH.json` (for a SavedModel directory `PATH/`, the file
`PATH.json` beside it): what a deployment needs to know without reading the model, including the
sha256 of the checkpoint it came from. `SIDECAR_VERSION` changes when a field changes meaning.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from star_jax.core import records
from star_jax.errors import CheckpointError
from star_jax.registry import Registry

SIDECAR_VERSION = 1
INPUT_NAME = "image"
LANDMARKS_NAME = "landmarks"
HEATMAPS_NAME = "heatmaps"


@dataclasses.dataclass(frozen=True)
class ExportFormat:
  """What one export format is: who runs it and what its options mean."""

  name: str
  runtime: bool       # the runtime (onnxruntime, LiteRT) runs it; else TensorFlow/JAX is needed
  weight_dtype: bool  # --dtype is the stored weights' dtype (else the traced compute dtype)
  fixed_batch: bool   # --batch is honoured (else the batch dimension stays symbolic)


EXPORT_FORMATS: Registry[ExportFormat] = Registry("export format")
for _format in (ExportFormat("onnx", runtime=True, weight_dtype=True, fixed_batch=True),
                ExportFormat("tflite", runtime=True, weight_dtype=True, fixed_batch=True),
                ExportFormat("savedmodel", runtime=False, weight_dtype=False, fixed_batch=False),
                ExportFormat("stablehlo", runtime=False, weight_dtype=False, fixed_batch=False)):
  EXPORT_FORMATS.register(_format.name, _format)
# In the order --format lists them.
FORMATS = ("onnx", "tflite", "savedmodel", "stablehlo")
RUNTIME_FORMATS = tuple(f for f in FORMATS if EXPORT_FORMATS[f].runtime)


def sidecar_path(model_path: str) -> str:
  """`PATH.json` for a model file or directory `PATH`."""
  return os.path.normpath(model_path).rstrip(os.sep) + ".json"


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """The sidecar's fields that inference needs (the whole record is in `record`)."""

  format: str
  num_points: int
  dataset: str
  input_size: int
  batch: int | None            # None: any batch size
  outputs: tuple[str, ...]
  record: dict

  @property
  def trained_on(self) -> str | None:
    """The dataset the model was trained on (None: not recorded, exports before it was)."""
    value = self.record.get("trained_on")
    return value if isinstance(value, str) and value else None

  @property
  def quantization(self) -> str | None:
    return self.record.get("quantization")


def read_sidecar(model_path: str) -> ModelInfo:
  """Reads and checks `PATH.json` of an exported model."""
  path = sidecar_path(model_path)
  try:
    with open(path) as f:
      record = json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"{path}: missing; an exported model needs the sidecar JSON written "
                          "beside it by `python -m star_jax.export`") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from None
  fields = records.check_record(record, _SIDECAR_RULES, path, error=_sidecar_error, extra=True)
  version = fields["sidecar_version"]
  if version > SIDECAR_VERSION:
    raise CheckpointError(f"{path}: sidecar_version {version} is newer than this star-jax "
                          f"understands ({SIDECAR_VERSION}); upgrade star-jax")
  shape = records.check_record(fields["input"], _INPUT_RULES, path, error=_sidecar_error,
                               label="input.{}".format, extra=True)["shape"]
  for k, dim in enumerate(shape):
    records.check_value(dim, _BATCH_RULE if k == 0 else _DIM_RULE, path, f"input.shape[{k}]",
                        _sidecar_error)
  names = []
  for k, output in enumerate(fields["outputs"]):
    names.append(records.check_record(output, _OUTPUT_RULES, path, error=_sidecar_error,
                                      label=f"outputs[{k}].{{}}".format, extra=True)["name"])
  return ModelInfo(format=fields["format"], num_points=fields["num_points"],
                   dataset=fields["dataset"], input_size=shape[1], batch=shape[0],
                   outputs=tuple(names), record=record)


def _sidecar_error(message: str) -> CheckpointError:
  return CheckpointError(f"{message} (not a star-jax export sidecar, or a damaged one)")


# What `read_sidecar` holds a sidecar's own fields to (types; bounds against the graph are
# `check_against_graph`'s, which names both values).
_SIDECAR_RULES = {
    "sidecar_version": records.Rule("int", required=True, low=1),
    "format": records.Rule("str", required=True, low=1),
    "num_points": records.Rule("int", required=True),
    "dataset": records.Rule("str", required=True),
    "input": records.Rule("object", required=True),
    "outputs": records.Rule("list", required=True, low=1),
}
_INPUT_RULES = {"shape": records.Rule("list", required=True, low=4, high=4)}
_BATCH_RULE = records.Rule("int", nullable=True)  # null: any batch size
_DIM_RULE = records.Rule("int")
_OUTPUT_RULES = {"name": records.Rule("str", required=True, low=1)}


# Bounds on what a sidecar may claim (beyond them a value is a damaged file, whatever the
# graph says): inputs of more than 8192 px a side, or batches of more than 4096 crops, would
# make the runtime allocate gigabytes for padding before the graph could refuse them.
MAX_INPUT_SIZE = 8192
MAX_BATCH = 4096
MAX_POINTS = 10000

Dim = Any  # int, or None / a name for a symbolic dimension


def _fixed(dim: Dim) -> int | None:
  """The size of a graph dimension, None when it is symbolic (a name, None, or -1)."""
  if dim is None or isinstance(dim, str):
    return None
  try:
    value = int(dim)
  except (TypeError, ValueError):
    return None
  return value if value > 0 else None


def check_against_graph(model_path: str, info: ModelInfo, input_shape: Any,
                        landmarks_shape: Any) -> None:
  """CheckpointError (one line naming the sidecar, the field and both values) unless the
  sidecar's input size, batch and number of points are those of the graph itself.

  `input_shape` / `landmarks_shape`: the graph's `image` input and `landmarks` output shapes as
  the engine reports them (a symbolic dimension as None, a name, or -1). Called when a model is
  opened, before any input is allocated from the sidecar's values.
  """
  path = sidecar_path(model_path)
  graph = f"the graph in {model_path}"
  shape = tuple(input_shape)
  lm = tuple(landmarks_shape)
  if len(shape) != 4 or _fixed(shape[3]) not in (None, 3):
    raise CheckpointError(f"{model_path}: input '{INPUT_NAME}' has shape {list(shape)}, not "
                          "[batch, size, size, 3]: not a star-jax export")
  if len(lm) != 3 or _fixed(lm[2]) not in (None, 2):
    raise CheckpointError(f"{model_path}: output '{LANDMARKS_NAME}' has shape {list(lm)}, not "
                          "[batch, points, 2]: not a star-jax export")
  height, width = _fixed(shape[1]), _fixed(shape[2])
  graph_batch = _fixed(shape[0])
  graph_points = _fixed(lm[1])

  def bad(field: str, value: Any, graph_value: Any) -> CheckpointError:
    return CheckpointError(f"{path}: {field} is {value!r} but {graph} has "
                           f"{'a symbolic one' if graph_value is None else repr(graph_value)}")

  # The sidecar's own values first: absurd ones are refused even where the graph is symbolic.
  side = info.record.get("input", {}).get("shape") if isinstance(
      info.record.get("input"), dict) else None
  if isinstance(side, list) and len(side) == 4 and side[1] != side[2]:
    raise bad("input size (input.shape[2])", side[2], width)
  graph_size = height if height == width else (height, width)
  if not 0 < info.input_size <= MAX_INPUT_SIZE or (
      graph_size is not None and graph_size != info.input_size):
    raise bad("input size (input.shape[1:3])", info.input_size, graph_size)
  if info.batch is not None and not 0 < info.batch <= MAX_BATCH or info.batch != graph_batch:
    raise bad("batch (input.shape[0])", info.batch, graph_batch)
  if not 0 < info.num_points <= MAX_POINTS or (
      graph_points is not None and info.num_points != graph_points):
    raise bad("num_points", info.num_points, graph_points)
  points = graph_points or info.num_points
  scheme = info.record.get("scheme")
  if isinstance(scheme, dict) and "num_points" in scheme and scheme["num_points"] != points:
    raise bad("scheme.num_points", scheme["num_points"], graph_points)
  for output in info.record.get("outputs", []):
    if isinstance(output, dict) and output.get("name") == LANDMARKS_NAME and isinstance(
        output.get("shape"), list) and len(output["shape"]) == 3 and (
            output["shape"][1] != points):
      raise bad("outputs.landmarks.shape[1]", output["shape"][1], graph_points)


def describe(record: dict[str, Any]) -> str:
  """One line about an exported model, for logs."""
  quant = record.get("quantization") or record.get("precision", "float32")
  return (f"{record['format']} model, {record['num_points']} points ({record['dataset']}), "
          f"input {record['input']['shape']}, {quant}")
