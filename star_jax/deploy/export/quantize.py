"""int8 quantisation of the ONNX export (ONNX Runtime's quantiser).

Two methods, measured on this project's 2-core x86 CPU (AVX-512 VNNI; docs/export.md):

- `static` (what `--quantize int8` does for ONNX): int8 weights per output channel, uint8
  activations with ranges calibrated on face crops, QDQ format, which ONNX Runtime fuses into
  `QLinearConv` and keeps in uint8 between operators: 1.1-2.7x faster than float32 at batch 1,
  1.6-2.3x at batch 32.
- `dynamic` (`--quantize int8-dynamic`): 8-bit weights, activations quantised on the fly by
  `DynamicQuantizeLinear` before every `ConvInteger`; no calibration, but each convolution pays
  extra passes over its activations: 0.5-1.0x the float32 speed on the small models, 1.1-1.2x
  on the full one. It is kept for runtimes whose dynamic kernels are better.

The TFLite export's int8 is the converter's dynamic-range quantisation, which XNNPACK runs
1.7-2.3x faster than float32: dynamic quantisation is fast there.

Kept in float32 in both: the decoder (soft-argmax `MatMul`: a quantised pixel grid would move
every landmark), the constant CoordConv branches (folded at load) and everything from the heads'
outputs to the fused heatmaps (instance norm, sigmoids, E2H gate), whose small values decide the
landmarks and the boundary switch.
A traced graph (`onnx_traced`, the route of backbones without a hand-written graph, e.g.
HRNet) has generic node names: there the nodes after the last convolutions stay float32, the
output convolutions included (a uint8 heatmap has ties at its peak, so the argmax decode would
jump) and the decode (its coordinate arithmetic would be rounded to 256 levels).

Calibration crops (static): the caller's `(K, S, S, 3)` 0-255 array, else crops of the
embedded synthetic dataset's training split with the official evaluation crop
(`star_jax.data.embedded`, generated once and cached). A model trained on real photos is better
calibrated on crops of its own domain: `python -m star_jax.export --calibration FOLDER` takes a
folder of face crops.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np

METHODS = ("static", "dynamic")
# Min-max ranges need enough crops: from 32 crops the demo model's NME moved by -0.09 points
# of %, from 64 by +0.0002 (full-range weights; +0.05 with the 7-bit range used below).
DEFAULT_CALIBRATION_CROPS = 64
# Operators quantised by the static method (ONNX Runtime keeps uint8 tensors between them).
# A Relu after a quantised Conv or Add is folded into that output's range by the quantiser (a
# uint8 zero point of 0 does the clamping); left out, each became a dequantise-requantise pair.
STATIC_OPERATORS = ("Conv", "Add", "MaxPool", "Resize", "Concat", "Relu")


def _tail_nodes(proto: Any) -> set[str]:
  """Names of the nodes after the last convolutions: those from which no `Conv` is reached
  (the decode, and the output convolutions themselves).

  A traced graph (`onnx_traced`) has no names to go by; this is its heads-to-landmarks part.
  """
  nodes = list(proto.graph.node)
  consumers: dict[str, list[int]] = {}
  for index, node in enumerate(nodes):
    for name in node.input:
      consumers.setdefault(name, []).append(index)
  reaches_conv = [False] * len(nodes)
  # ONNX nodes are stored in topological order: walking back, every consumer is decided.
  for index in range(len(nodes) - 1, -1, -1):
    reaches_conv[index] = any(
        nodes[user].op_type == "Conv" or reaches_conv[user]
        for output in nodes[index].output for user in consumers.get(output, ()))
  return {node.name for node, reaches in zip(nodes, reaches_conv) if not reaches}


def _name_nodes(proto: Any) -> Any:
  """A copy of `proto` whose unnamed nodes are named `<op>_<index>` (the quantiser excludes
  nodes by name; the traced graph leaves them unnamed)."""
  import onnx
  named = onnx.ModelProto()
  named.CopyFrom(proto)
  taken = {node.name for node in named.graph.node if node.name}
  for index, node in enumerate(named.graph.node):
    if not node.name:
      name = f"{node.op_type.lower()}_node{index}"
      while name in taken:
        name += "_"
      node.name = name
      taken.add(name)
  return named


def _float_only_nodes(proto: Any, traced: bool = False) -> list[str]:
  """Node names kept in float32 (see the module docstring); with `traced`, the nodes after
  the last convolutions (`_tail_nodes`)."""
  keep = []
  float_parts = ("soft_argmax", "_coords", ".coords", ".boundary", "edge_gate", "instance_norm",
                 "heatmaps", "pointmaps", "edgemaps", "gated", "fused", "last_heatmap",
                 "threshold")
  tail = _tail_nodes(proto) if traced else set()
  for node in proto.graph.node:
    if (node.op_type == "MatMul" or node.name in tail
        or any(part in node.name for part in float_parts)):
      keep.append(node.name)
  return keep


def embedded_calibration_crops(image_size: int, count: int = DEFAULT_CALIBRATION_CROPS
                               ) -> np.ndarray:
  """`(count, S, S, 3)` float32 0-255 crops of the embedded training split (official crop)."""
  from star_jax.data import annotations, embedded, transforms
  from star_jax.core.schemes import WFLW
  from star_jax.deploy.image_io import load_image
  files = embedded.ensure_embedded_dataset()
  rows = annotations.read_tsv(files.train_tsv, WFLW, image_dir=files.image_dir)
  picks = np.linspace(0, len(rows) - 1, num=min(count, len(rows))).astype(int)
  crops = []
  for i in picks:
    matrix = transforms.crop_matrix(rows.scale[i], rows.center[i, 0], rows.center[i, 1],
                                    image_size)
    crops.append(transforms.warp(load_image(rows.image_paths[i]), matrix, image_size))
  return np.stack(crops).astype(np.float32)


def folder_calibration_crops(folder: str, image_size: int,
                             count: int = 4 * DEFAULT_CALIBRATION_CROPS) -> np.ndarray:
  """Every image of `folder` (at most `count`), resized to S x S as one face crop each."""
  import cv2
  from star_jax.errors import UsageError
  from star_jax.deploy.image_io import ImageError, load_image
  from star_jax.deploy.predict import IMAGE_SUFFIXES
  if not os.path.isdir(folder):
    raise UsageError(f"--calibration {folder}: not a folder of face crops")
  names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))[:count]
  crops = []
  for name in names:
    try:
      image = load_image(os.path.join(folder, name))
    except ImageError:
      continue
    crops.append(cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_AREA))
  if not crops:
    raise UsageError(f"--calibration {folder}: no readable images")
  return np.stack(crops).astype(np.float32)


def quantize_onnx(proto: Any, out_path: str, *, method: str = "static",
                  calibration: np.ndarray | None = None, image_size: int | None = None,
                  traced: bool = False) -> dict:
  """Writes the int8 version of `proto` (an onnx.ModelProto) to `out_path`; returns details.

  `traced`: `proto` comes from `onnx_traced` (generic node names): its nodes after the last
  convolutions stay float32.
  """
  import onnx
  from onnxruntime import quantization as q
  if method not in METHODS:
    raise ValueError(f"quantisation method {method!r}: choose one of {METHODS}")
  if traced:
    proto = _name_nodes(proto)
  excluded = _float_only_nodes(proto, traced)
  with tempfile.TemporaryDirectory(prefix="star_jax_quant_") as tmp:
    source = os.path.join(tmp, "float.onnx")
    onnx.save(proto, source)
    if method == "dynamic":
      q.quantize_dynamic(source, out_path, weight_type=q.QuantType.QUInt8, per_channel=True,
                         op_types_to_quantize=["Conv"], nodes_to_exclude=excluded)
      return {"quantization": "onnxruntime quantize_dynamic: uint8 weights per output channel, "
                              "activations quantised at run time (Conv)"}
    if calibration is None:
      calibration = embedded_calibration_crops(image_size)
      where = f"{len(calibration)} crops of the embedded dataset's training split"
    else:
      where = f"{len(calibration)} given crops"
    crops = np.asarray(calibration, np.float32)

    class Reader(q.CalibrationDataReader):
      def __init__(self):
        self._batches = iter([{"image": crops[i:i + 1]} for i in range(len(crops))])

      def get_next(self):
        return next(self._batches, None)

    # reduce_range (7-bit weights): ONNX Runtime's x86 uint8 x int8 kernels can saturate the
    # 16-bit sums of VPMADDUBSW with full-range weights (the case reduce_range exists for). On
    # this CPU they did: native ONNX Runtime was 0.94 px away from the same model in the
    # browser (WASM); with 7-bit weights 0.0001 px.
    # uint8 weights avoid the overflow too, with a smaller NME change (+0.012 against +0.051
    # points on the demo model), but ran only 1.1x faster than float32 (7-bit: 1.8-2.1x).
    q.quantize_static(source, out_path, Reader(), quant_format=q.QuantFormat.QDQ,
                      per_channel=True, reduce_range=True, activation_type=q.QuantType.QUInt8,
                      weight_type=q.QuantType.QInt8, op_types_to_quantize=list(STATIC_OPERATORS),
                      nodes_to_exclude=excluded, calibrate_method=q.CalibrationMethod.MinMax)
  return {"quantization": "onnxruntime quantize_static (QDQ): int8 weights per output channel, "
                          "uint8 activations, min-max calibration, 7-bit weight range",
          "calibration": where}
