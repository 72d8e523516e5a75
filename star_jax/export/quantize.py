"""int8 dynamic-range quantisation of the ONNX export (ONNX Runtime's quantiser).

Weights of the convolutions become 8-bit (uint8, per output channel: ONNX Runtime's x86
`ConvInteger` ran 2-3x slower with int8 weights here); the activations are quantised on the fly
(`DynamicQuantizeLinear`), so no calibration data is needed and the model's input and outputs
stay float32. The soft-argmax `MatMul` (whose grid weights
must stay exact: a quantised pixel grid moves every landmark) and the small CoordConv branches
(constants folded at load) are left in float32.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any


def _float_only_nodes(proto: Any) -> list[str]:
  """Nodes kept in float32: the decoder and the constant CoordConv branches."""
  keep = []
  for node in proto.graph.node:
    if node.op_type == "MatMul" or any(s in node.name for s in ("_coords", ".coords",
                                                                 ".boundary", "edge_gate")):
      keep.append(node.name)
  return keep


def quantize_onnx(proto: Any, out_path: str) -> dict:
  """Writes the int8 dynamic-range version of `proto` (an onnx.ModelProto) to `out_path`."""
  import onnx  # pylint: disable=g-import-not-at-top
  from onnxruntime.quantization import QuantType, quantize_dynamic  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory(prefix="star_jax_quant_") as tmp:
    source = os.path.join(tmp, "float.onnx")
    onnx.save(proto, source)
    quantize_dynamic(source, out_path, weight_type=QuantType.QUInt8, per_channel=True,
                     op_types_to_quantize=["Conv"],
                     nodes_to_exclude=_float_only_nodes(proto))
  return {"quantization": "onnxruntime quantize_dynamic, uint8 weights per output channel, Conv only"}
