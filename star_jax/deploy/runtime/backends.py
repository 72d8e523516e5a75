"""Exported models behind one call: `model(crops) -> landmarks in crop pixels`.

`load_model(PATH)` reads the sidecar (`star_jax.deploy.runtime.contract`) and opens `PATH` with
onnxruntime (`.onnx`) or the LiteRT interpreter (`.tflite`, from `ai-edge-litert`, with its
default XNNPACK CPU delegate). Neither JAX nor TensorFlow is imported; each engine is imported
only when a model of its format is opened. Fixed-batch models (TFLite, ONNX exported with
`--batch`) are fed in chunks of their batch, the last one padded. When a model is opened, the
sidecar's input size, batch and number of points are held to the graph's own input and output
shapes (`contract.check_against_graph`), before any input is allocated.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from star_jax.errors import CheckpointError, UsageError
from star_jax.deploy.runtime import contract


class LandmarkModel:
  """An exported model: `(B, S, S, 3)` RGB crops (uint8 or float32 0-255) -> `(B, N, 2)`."""

  def __init__(self, path: str, info: contract.ModelInfo):
    self.path = path
    self.info = info

  @property
  def num_points(self) -> int:
    return self.info.num_points

  @property
  def image_size(self) -> int:
    return self.info.input_size

  def _run(self, batch: np.ndarray) -> np.ndarray:
    raise NotImplementedError

  def __call__(self, crops: np.ndarray) -> np.ndarray:
    crops = np.asarray(crops)
    size = self.image_size
    if crops.ndim != 4 or crops.shape[1:] != (size, size, 3):
      raise ValueError(f"{self.path} expects crops of shape (B, {size}, {size}, 3), got "
                       f"{crops.shape}")
    crops = crops.astype(np.float32, copy=False)
    if len(crops) == 0:
      return np.zeros((0, self.num_points, 2), np.float32)
    fixed = self.info.batch
    if fixed is None:
      return self._run(np.ascontiguousarray(crops))
    out = []
    for start in range(0, len(crops), fixed):
      chunk = crops[start:start + fixed]
      n = len(chunk)
      if n < fixed:
        chunk = np.concatenate([chunk, np.zeros((fixed - n,) + chunk.shape[1:], np.float32)])
      out.append(self._run(np.ascontiguousarray(chunk))[:n])
    return np.concatenate(out)


class OnnxModel(LandmarkModel):
  """onnxruntime's CPU engine: all graph optimisations (its blocked NCHWc convolutions), and
  by default worker threads that sleep instead of spinning between operators. Spinning
  (`spin=True`) saves a wake-up per operator when the engine has its cores to itself, which
  counts for graphs of many small operators (HRNet's; benchmarks/RESULTS.md), but on a loaded
  machine (benchmarks/export.py, load average ~10 on 2 cores) it made the full model 1.2-2.1x
  slower and left it behind jitted JAX."""

  def __init__(self, path: str, info: contract.ModelInfo, threads: int | None = None,
               spin: bool = False):
    super().__init__(path, info)
    try:
      import onnxruntime as ort
    except ImportError:
      raise UsageError("running .onnx models needs onnxruntime: pip install 'star-jax[export]'"
                       ) from None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if threads:
      options.intra_op_num_threads = int(threads)
    try:
      self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for bad files
      raise CheckpointError(f"{path}: onnxruntime cannot load it "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                            ) from None
    inputs = {i.name: i.shape for i in self.session.get_inputs()}
    outputs = {o.name: o.shape for o in self.session.get_outputs()}
    contract.check_against_graph(path, info, *_named_shapes(path, inputs, outputs))

  def _run(self, batch: np.ndarray) -> np.ndarray:
    return self.session.run([contract.LANDMARKS_NAME], {contract.INPUT_NAME: batch})[0]


class LiteRtModel(LandmarkModel):
  """The LiteRT interpreter with XNNPACK, through the export's `serving_default` signature."""

  def __init__(self, path: str, info: contract.ModelInfo, threads: int | None = None,
               spin: bool = False):
    del spin   # XNNPACK's threads are its own
    super().__init__(path, info)
    try:
      from ai_edge_litert.interpreter import Interpreter
    except ImportError:
      raise UsageError("running .tflite models needs ai-edge-litert: pip install "
                       "'star-jax[export]'") from None
    try:
      self.interpreter = Interpreter(model_path=path, num_threads=threads or os.cpu_count())
      self.runner = self.interpreter.get_signature_runner("serving_default")
    except (ValueError, RuntimeError) as e:
      raise CheckpointError(f"{path}: the LiteRT interpreter cannot load it ({e})") from None
    inputs = {k: d["shape_signature"] for k, d in self.runner.get_input_details().items()}
    outputs = {k: d["shape_signature"] for k, d in self.runner.get_output_details().items()}
    contract.check_against_graph(path, info, *_named_shapes(path, inputs, outputs))

  def _run(self, batch: np.ndarray) -> np.ndarray:
    return np.array(self.runner(**{contract.INPUT_NAME: batch})[contract.LANDMARKS_NAME])


def _named_shapes(path: str, inputs: dict, outputs: dict) -> tuple:
  """The graph's (`image` input shape, `landmarks` output shape), CheckpointError when the
  graph lacks either."""
  for name, found, what in ((contract.INPUT_NAME, inputs, "input"),
                            (contract.LANDMARKS_NAME, outputs, "output")):
    if name not in found:
      raise CheckpointError(f"{path}: the graph has no '{name}' {what} (it has "
                            f"{', '.join(sorted(found)) or 'none'}): not a star-jax export")
  return list(inputs[contract.INPUT_NAME]), list(outputs[contract.LANDMARKS_NAME])


_ENGINES: dict[str, Callable[..., LandmarkModel]] = {"onnx": OnnxModel, "tflite": LiteRtModel}


def load_model(path: str, *, threads: int | None = None, spin: bool = False) -> LandmarkModel:
  """Opens an exported `.onnx` or `.tflite` model (its sidecar `PATH.json` must be beside it).

  `threads`: the engine's CPU threads (default: its choice); `spin`: ONNX Runtime's threads
  wait by spinning between operators (faster on cores of its own, slower on a shared machine).
  """
  if not os.path.exists(path):
    raise FileNotFoundError(2, "No such file or directory", path)
  info = contract.read_sidecar(path)
  engine = _ENGINES.get(info.format)
  if engine is None:
    raise UsageError(f"--model {path}: a {info.format} export needs "
                     f"{'TensorFlow' if info.format == 'savedmodel' else 'JAX'}; the runtime "
                     f"runs {' and '.join(contract.RUNTIME_FORMATS)} exports")
  if contract.LANDMARKS_NAME not in info.outputs:
    raise CheckpointError(f"{contract.sidecar_path(path)}: the model has no "
                          f"'{contract.LANDMARKS_NAME}' output")
  return engine(path, info, threads=threads, spin=spin)
