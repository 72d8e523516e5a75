"""`export(...)`: one checkpoint -> one exported model file plus its sidecar JSON.

Routes (chosen by measurement, see docs/export.md):
  onnx        written node by node from the variables by the network's hand-written graph
              (the class's `onnx_graph`, e.g. `star_jax.deploy.export.onnx_graph` for the
              hourglass); a network without one (`onnx_graph = None`) is traced from its
              JAX program (`star_jax.deploy.export.onnx_traced`, at a fixed batch, 1 unless
              given); int8: ONNX Runtime's quantiser (`star_jax.deploy.export.quantize`)
  tflite      jax2tf (native StableHLO) at a fixed batch -> TFLite converter
  savedmodel  jax2tf (native StableHLO), batch polymorphic
  stablehlo   jax.export, batch polymorphic

Every export follows `star_jax.deploy.runtime.contract`; the sidecar records the checkpoint's sha256
(a file's bytes; for a directory, a digest of its files' relative paths and bytes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Sequence

import numpy as np

import star_jax
from star_jax.deploy import detection
from star_jax.data import transforms
from star_jax.errors import UsageError
from star_jax.deploy.runtime import contract

DTYPES = ("float32", "bfloat16", "float16")
# int8: ONNX static (calibrated) QDQ, TFLite dynamic range: the fast int8 of each engine here.
# int8-dynamic: dynamic range for both (ONNX Runtime runs it at 0.5-1.2x its float32 speed;
# see star_jax.deploy.export.quantize).
QUANTIZATIONS = ("int8", "int8-dynamic")
# What `--dtype` means per format: the compute dtype of the traced JAX model, or the storage
# dtype of the weights (computation stays float32: CPUs run float16 no faster, see docs).
WEIGHT_DTYPE_FORMATS = tuple(f for f in contract.FORMATS if contract.EXPORT_FORMATS[f].weight_dtype)
COMPUTE_DTYPE_FORMATS = tuple(f for f in contract.FORMATS if f not in WEIGHT_DTYPE_FORMATS)
BATCH_FORMATS = tuple(f for f in contract.FORMATS if contract.EXPORT_FORMATS[f].fixed_batch)
DEFAULT_TFLITE_BATCH = 1


@dataclasses.dataclass
class ExportResult:
  path: str
  sidecar: str
  record: dict
  seconds: float


def checkpoint_sha256(path: str) -> str:
  """sha256 of a checkpoint file, or of a directory's (relative path, bytes) in sorted order."""
  digest = hashlib.sha256()
  if os.path.isfile(path):
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()
  for root, dirs, files in os.walk(path):
    dirs.sort()
    for name in sorted(files):
      full = os.path.join(root, name)
      digest.update(os.path.relpath(full, path).replace(os.sep, "/").encode() + b"\0")
      with open(full, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          digest.update(block)
      digest.update(b"\0")
  return digest.hexdigest()


def _checkpoint_root(path: str) -> str:
  """The directory a star-jax load actually reads, for the digest: `<workdir>/best` if any."""
  best = os.path.join(path, "best")
  return best if os.path.isdir(best) and not os.path.exists(os.path.join(path, "model.json")) \
      else path


def check_options(fmt: str, *, dtype: str, quantize: str | None, batch: int | None) -> None:
  """Raises UsageError (naming the flag) for combinations a format does not support."""
  if fmt not in contract.FORMATS:
    raise UsageError(f"--format {fmt!r}: choose one of {', '.join(contract.FORMATS)}")
  if dtype not in DTYPES:
    raise UsageError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
  if quantize is not None and quantize not in QUANTIZATIONS:
    raise UsageError(f"--quantize {quantize!r}: choose one of {', '.join(QUANTIZATIONS)}")
  if quantize and fmt not in ("onnx", "tflite"):
    raise UsageError(f"--quantize {quantize} applies to onnx and tflite, not {fmt}")
  if quantize and dtype != "float32":
    raise UsageError("--quantize int8 and --dtype are exclusive (int8 models compute in float32 "
                     "between quantised operators)")
  if dtype == "bfloat16" and fmt in WEIGHT_DTYPE_FORMATS:
    raise UsageError(f"--dtype bfloat16 is not supported for {fmt} (use float16: half-size "
                     "weights)")
  if batch is not None:
    if fmt not in BATCH_FORMATS:
      raise UsageError(f"--batch applies to onnx and tflite; {fmt} exports take any batch size")
    if batch < 1:
      raise UsageError(f"--batch {batch}: must be at least 1")


def inference_model(model: Any, dtype: str = "float32") -> Any:
  """The module to export: full-precision convolutions, no cross-device BatchNorm (for the
  fields the network has: a backbone need not have a dtype, precision or BatchNorm axis)."""
  import jax.numpy as jnp
  wanted = {"dtype": jnp.dtype(dtype), "precision": "highest", "bn_axis_name": None}
  fields = {f.name for f in dataclasses.fields(model)}
  if dtype != "float32" and "dtype" not in fields:
    raise UsageError(f"--dtype {dtype}: {type(model).__name__} has no compute dtype to set")
  return model.clone(**{k: v for k, v in wanted.items() if k in fields})


def load_checkpoint(checkpoint: Any, weights: str = "default") -> Any:
  """`model_store.load_model` (its failures are one-line CheckpointErrors), or `checkpoint`
  itself when it is already loaded."""
  from star_jax.training import model_store
  if isinstance(checkpoint, model_store.LoadedModel):
    return checkpoint
  return model_store.load_model(checkpoint, weights=weights)


def onnx_graph_module(loaded: Any) -> Any:
  """The module that writes the ONNX graph of `loaded.model`: its class's hand-written writer
  (`onnx_graph`, a module path with `build_model`, `OPSET` and `IR_VERSION`), or, for a network
  without one, the traced route (`star_jax.deploy.export.onnx_traced`, fixed batch)."""
  import importlib
  name = getattr(type(loaded.model), "onnx_graph", None) or "star_jax.deploy.export.onnx_traced"
  return importlib.import_module(name)


def _architecture_record(model: Any) -> dict:
  """`{"architecture": registry name, <architecture field>: value, ...}` (the model class's own
  `architecture_defaults` fields)."""
  from star_jax import models
  summary = models.architecture(model)
  return {"architecture": summary.pop("name"), **summary}


def _sidecar_record(loaded: Any, fmt: str, out: str, *, batch: int | None, dtype: str,
                    quantize: str | None, heatmaps: bool, details: dict) -> dict:
  model = loaded.model
  size = loaded.image_size
  spec = loaded.spec
  source = loaded.source
  sha = checkpoint_sha256(_checkpoint_root(source)) if source and os.path.exists(source) else None
  from star_jax import models
  outputs = [{"name": contract.LANDMARKS_NAME, "shape": [batch, model.num_points, 2],
              "dtype": "float32", "units": "crop pixels, (x, y)",
              "convention": f"p = ((l + 1) * {size} - 1) / 2 for the final stack's soft-argmax "
                            "l in [-1, 1]"}]
  if heatmaps:
    outputs.append({"name": contract.HEATMAPS_NAME,
                    "shape": [batch, size // 4, size // 4, model.num_points], "dtype": "float32",
                    "units": "final stack's fused heatmaps (not normalised)"})
  if quantize:
    precision = f"int8 ({quantization_kind(fmt, quantize)}), float32 input and outputs"
  elif dtype != "float32" and fmt in WEIGHT_DTYPE_FORMATS:
    precision = f"{dtype} weights, float32 computation"
  else:
    precision = dtype
  return {
      "sidecar_version": contract.SIDECAR_VERSION,
      "format": fmt,
      "file": os.path.basename(os.path.normpath(out)),
      "star_jax_version": star_jax.__version__,
      "source": {"checkpoint": os.path.basename(os.path.normpath(source)) if source else None,
                 "sha256": sha, "weights": loaded.weights},
      "num_points": model.num_points,
      "dataset": spec.name,
      "trained_on": loaded.trained_on,
      "point_names": list(spec.point_names),
      "scheme": spec.to_dict(),
      "edges": [{"name": e.name, "closed": e.closed, "points": list(e.points)}
                for e in spec.edges],
      "model": {**_architecture_record(model),
                "parameters": models.count_parameters(loaded.variables["params"])},
      "input": {"name": contract.INPUT_NAME, "shape": [batch, size, size, 3], "dtype": "float32",
                "layout": "NHWC", "channels": "RGB", "range": [0, 255],
                "normalization": "x / 255 * 2 - 1, inside the model"},
      "outputs": outputs,
      "crop": {
          "size": size,
          "face_box_unit": transforms.FACE_BOX_UNIT,
          "matrix": "s = size / (scale * 200); x' = s * (x - cx) + (size - 1) / 2, "
                    "y' = s * (y - cy) + (size - 1) / 2",
          "interpolation": "bilinear", "border": "constant 0",
          "training_rule": "centre of the landmark box; scale = max(w, h) / 200 * 1.05",
          "box_rules": {
              "official": "a box tight around the landmarks: scale = min(w, h) / 200 * 1.05, "
                          "centre = box centre",
              "detectors": {
                  name: {"dx": info.rule.dx, "dy": info.rule.dy,
                         "size_factor": info.rule.size_factor}
                  for name, info in detection.DETECTORS.items()},
              "detector_rule": "crop side (scale * 200) = size_factor * max(w, h); centre = "
                               "(cx + dx * w, cy + dy * h) of the detector's box (x1, y1, x2, "
                               "y2) with w, h its width and height"},
          "map_back": "landmarks_original = inverse(crop matrix) applied to the crop pixels"},
      "precision": precision,
      "quantization": quantization_kind(fmt, quantize) if quantize else None,
      "details": details,
  }


def quantization_kind(fmt: str, quantize: str) -> str:
  """'int8-static' (ONNX --quantize int8) or 'int8-dynamic-range' (TFLite, int8-dynamic)."""
  return "int8-static" if fmt == "onnx" and quantize == "int8" else "int8-dynamic-range"


def check_output(fmt: str, out: str, inputs: Sequence[str] = ()) -> None:
  """UsageError unless `out` may be written: a SavedModel replaces only an earlier SavedModel
  (never another folder and its files), a file format never replaces a folder, and neither
  replaces an input or anything an export did not write (`star_jax.core.outputs`)."""
  if fmt == "savedmodel":
    if os.path.isfile(out):
      raise UsageError(f"--out {out}: a file; a SavedModel is a folder")
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(
        os.path.join(out, "saved_model.pb")):
      raise UsageError(f"--out {out}: a folder that is not a SavedModel; its files would be "
                       "replaced, choose another path")
  elif os.path.isdir(out):
    raise UsageError(f"--out {out}: a folder; a {fmt} export is a file")
  from star_jax.core import outputs
  outputs.check_outputs("--out", [out, contract.sidecar_path(out)], inputs=inputs,
                        is_own=lambda path: _exported_here(out), shown=out)


def _exported_here(out: str) -> bool:
  """Whether `out` and its sidecar were written by an export: the sidecar names `out`."""
  try:
    with open(contract.sidecar_path(out), encoding="utf-8") as f:
      record = json.load(f)
  except (OSError, ValueError):
    return False
  return (isinstance(record, dict) and "sidecar_version" in record
          and record.get("file") == os.path.basename(os.path.normpath(out)))


def export(checkpoint: Any, fmt: str, out: str, *, weights: str = "default",
           batch: int | None = None, dtype: str = "float32", quantize: str | None = None,
           heatmaps: bool = False, calibration: Any = None) -> ExportResult:
  """Exports `checkpoint` (a path `model_store.load_model` reads, or a LoadedModel) to `out`.

  Writes `out` (a file; a directory for savedmodel) and `out.json`. See `check_options` for
  what each format supports; TFLite takes `batch` (default 1), ONNX a fixed `batch` or None
  (symbolic). `calibration`: face crops `(K, S, S, 3)` 0-255, or a folder of face crops, for
  the static int8 ONNX quantisation (default: embedded-dataset crops).
  """
  check_options(fmt, dtype=dtype, quantize=quantize, batch=batch)
  out = os.path.normpath(out)
  check_output(fmt, out, [checkpoint] if isinstance(checkpoint, str) else [])
  start = time.perf_counter()
  loaded = load_checkpoint(checkpoint, weights)
  size = loaded.image_size
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  if fmt == "tflite" and batch is None:
    batch = DEFAULT_TFLITE_BATCH
  if fmt in ("savedmodel", "stablehlo"):
    batch = None

  if fmt == "onnx":
    onnx_graph = onnx_graph_module(loaded)
    if onnx_graph.__name__.endswith("onnx_traced") and batch is None:
      batch = 1  # a traced program has fixed shapes
    proto = onnx_graph.build_model(inference_model(loaded.model), loaded.variables, size,
                                   with_heatmaps=heatmaps, weight_dtype=dtype, batch=batch,
                                   doc="star-jax landmark model; contract in the sidecar JSON")
    details = {"opset": onnx_graph.OPSET, "ir_version": onnx_graph.IR_VERSION}
    if quantize:
      from star_jax.deploy.export import quantize as quantize_lib
      if isinstance(calibration, str):
        calibration = quantize_lib.folder_calibration_crops(calibration, size)
      method = "static" if quantize == "int8" else "dynamic"
      details.update(quantize_lib.quantize_onnx(
          proto, out, method=method, calibration=calibration, image_size=size,
          traced=onnx_graph.__name__.endswith("onnx_traced")))
    else:
      import onnx
      onnx.save(proto, out)
  else:
    from star_jax.deploy.export import jax_formats
    compute = dtype if fmt in COMPUTE_DTYPE_FORMATS else "float32"
    fn = jax_formats.contract_function(inference_model(loaded.model, compute), loaded.variables,
                                       size, with_heatmaps=heatmaps)
    if fmt == "stablehlo":
      details = jax_formats.export_stablehlo(fn, size, out)
    elif fmt == "savedmodel":
      details = jax_formats.export_savedmodel(fn, size, out, with_heatmaps=heatmaps)
    else:
      details = jax_formats.export_tflite(fn, size, out, batch=batch, with_heatmaps=heatmaps,
                                          quantize=quantize, weight_dtype=dtype)
  record = _sidecar_record(loaded, fmt, out, batch=batch, dtype=dtype, quantize=quantize,
                           heatmaps=heatmaps, details=details)
  sidecar = contract.sidecar_path(out)
  with open(sidecar, "w") as f:
    json.dump(record, f, indent=1)
    f.write("\n")
  return ExportResult(out, sidecar, record, time.perf_counter() - start)


def file_size(path: str) -> int:
  """Bytes of a file, or of all files under a directory (SavedModel)."""
  if os.path.isfile(path):
    return os.path.getsize(path)
  return int(np.sum([os.path.getsize(os.path.join(root, n))
                     for root, _, names in os.walk(path) for n in names] or [0]))
