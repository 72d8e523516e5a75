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
  try:
    version = int(record["sidecar_version"])
    if version > SIDECAR_VERSION:
      raise CheckpointError(f"{path}: sidecar_version {version} is newer than this star-jax "
                            f"understands ({SIDECAR_VERSION}); upgrade star-jax")
    shape = record["input"]["shape"]
    return ModelInfo(format=str(record["format"]), num_points=int(record["num_points"]),
                     dataset=str(record["dataset"]), input_size=int(shape[1]),
                     batch=None if shape[0] is None else int(shape[0]),
                     outputs=tuple(str(o["name"]) for o in record["outputs"]), record=record)
  except (KeyError, TypeError, ValueError, IndexError) as e:
    if isinstance(e, CheckpointError):
      raise
    raise CheckpointError(f"{path}: not a star-jax export sidecar (missing or malformed "
                          f"field: {e})") from None


def describe(record: dict[str, Any]) -> str:
  """One line about an exported model, for logs."""
  quant = record.get("quantization") or record.get("precision", "float32")
  return (f"{record['format']} model, {record['num_points']} points ({record['dataset']}), "
          f"input {record['input']['shape']}, {quant}")
