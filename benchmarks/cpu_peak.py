"""The CPU's arithmetic peak as ONNX Runtime reaches it: the floor under any per-face time.

    python -m benchmarks.cpu_peak [--threads 2] [--size 1024] [--repeats 20] [--record]

A network of F GFLOP cannot run faster than F / peak on this CPU, whatever its graph. This times
the two kernels ONNX Runtime's convolutions end in, on one large square product each (`--size`,
large enough that memory traffic is negligible beside the arithmetic), with `--threads` intra-op
threads:
- float32: `MatMul` (MLAS SGEMM), GFLOP/s with a multiply-add counted as 2;
- int8: `MatMulInteger` (uint8 activations x int8 weights, int32 accumulation, MLAS's
  quantised GEMM: what a QDQ `Conv` becomes), giga-operations/s counted the same way.
`benchmarks/hrnet.py` divides a model's GFLOP by these to state the floor next to its target.
The figure is the best of `--repeats` calls after warm-up (a peak, not a typical time).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if __package__ in (None, ""):  # run as `python benchmarks/cpu_peak.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from benchmarks import common


# HRNetV2-W18 at 256 px (benchmarks/hrnet.py), the network the floor column is given for.
HRNET_GFLOP = 9.80


def _product_model(kind: str, size: int) -> bytes:
  """A one-node ONNX model: `y = x @ W` (float32 MatMul) or its uint8 x int8 MatMulInteger."""
  import onnx
  from onnx import TensorProto, helper, numpy_helper

  rng = np.random.default_rng(0)
  if kind == "float32":
    weight = numpy_helper.from_array(rng.standard_normal((size, size)).astype(np.float32), "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    x_type, y_type = TensorProto.FLOAT, TensorProto.FLOAT
  else:
    weight = numpy_helper.from_array(rng.integers(-127, 128, (size, size), dtype=np.int8), "w")
    node = helper.make_node("MatMulInteger", ["x", "w"], ["y"])
    x_type, y_type = TensorProto.UINT8, TensorProto.INT32
  graph = helper.make_graph(
      [node], "product", [helper.make_tensor_value_info("x", x_type, [size, size])],
      [helper.make_tensor_value_info("y", y_type, [size, size])], initializer=[weight])
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
  model.ir_version = 8
  onnx.checker.check_model(model)
  return model.SerializeToString()


def peak_gops(kind: str, *, threads: int = 2, size: int = 1024, repeats: int = 20) -> float:
  """Best giga-operations per second of one `size`^3 product (`kind`: float32 or int8)."""
  import onnxruntime as ort

  options = ort.SessionOptions()
  options.intra_op_num_threads = threads
  options.inter_op_num_threads = 1
  session = ort.InferenceSession(_product_model(kind, size), options,
                                 providers=["CPUExecutionProvider"])
  rng = np.random.default_rng(1)
  x = (rng.standard_normal((size, size)).astype(np.float32) if kind == "float32"
       else rng.integers(0, 256, (size, size), dtype=np.uint8))
  for _ in range(3):
    session.run(None, {"x": x})
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    session.run(None, {"x": x})
    best = min(best, time.perf_counter() - t0)
  return 2.0 * size ** 3 / best / 1e9


def floor_ms(gflop: float, gops: float) -> float:
  """The least time in ms that `gflop` giga-operations take at `gops` per second."""
  return gflop / gops * 1e3


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
  parser.add_argument("--size", type=int, default=1024, help="side of the square product")
  parser.add_argument("--repeats", type=int, default=20)
  common.add_common_flags(parser, settings=False)
  args = parser.parse_args(argv)
  load = common.load_average()
  rows = []
  for kind in ("float32", "int8"):
    gops = peak_gops(kind, threads=args.threads, size=args.size, repeats=args.repeats)
    print(f"{kind}: {gops:.1f} G/s", flush=True)
    rows.append([kind, "MatMul" if kind == "float32" else "MatMulInteger (u8 x s8)",
                 f"{gops:.1f}", f"{floor_ms(HRNET_GFLOP, gops):.1f}"])
  common.record(
      "CPU arithmetic peak through ONNX Runtime (the floor under per-face times)",
      ["precision", "kernel", "peak G op/s (multiply-add = 2)",
       f"ms floor of a {HRNET_GFLOP:.2f} GFLOP network (HRNetV2-W18 at 256 px)"], rows,
      notes=(f"one {args.size}x{args.size}x{args.size} product, best of {args.repeats} after "
             f"warm-up, {args.threads} intra-op threads; {load} at start"),
      write=args.record)


if __name__ == "__main__":
  main()
