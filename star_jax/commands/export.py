"""The `python -m star_jax.export` command line.

    python -m star_jax.export --checkpoint CKPT --format onnx --out wflw.onnx [--check]

CKPT is anything eval.py accepts (a training workdir, a checkpoint directory, an official
`.pkl`). `--check` runs the export in its own engine on random crops and prints its distance
to the JAX model in float32 and float64 (see `star_jax.deploy.export.parity`). Exit status: 0 done,
1 unreadable checkpoint, 2 invalid flags or an --out that would replace the checkpoint or a
file an export did not write (checked before the checkpoint is read).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from star_jax.commands import cli
from star_jax.deploy.runtime import contract


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = cli.ArgumentParser(
      prog="python -m star_jax.export",
      description="Export a landmark model to ONNX, TFLite, SavedModel or StableHLO (input "
                  "float32 [B, S, S, 3] RGB 0-255, first output 'landmarks' [B, N, 2] in crop "
                  "pixels) with a sidecar PATH.json.")
  parser.add_argument("--checkpoint", required=True,
                      help="a released model (wflw, 300w, cofw), a training workdir, a checkpoint "
                           "directory or an official STAR .pkl")
  parser.add_argument("--format", required=True, choices=contract.FORMATS)
  parser.add_argument("--out", required=True,
                      help="output file (a directory for savedmodel); the sidecar is OUT.json")
  parser.add_argument("--weights", choices=("default", "ema", "raw"), default="default",
                      help="EMA or raw weights (default: EMA; an official .pkl's 'net')")
  parser.add_argument("--batch", type=int, default=None,
                      help="fixed batch size (tflite: default 1; onnx: default symbolic)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                      help="savedmodel/stablehlo: compute dtype; onnx/tflite: float16 stores "
                           "half-size weights (computation in float32)")
  parser.add_argument("--quantize", default=None, choices=("int8", "int8-dynamic"),
                      help="onnx: int8 = static (calibrated) int8, int8-dynamic = dynamic "
                           "range; tflite: dynamic range (both names)")
  parser.add_argument("--calibration", default=None, metavar="FOLDER",
                      help="onnx --quantize int8: a folder of face crops to calibrate on "
                           "(default: crops of the embedded synthetic dataset)")
  parser.add_argument("--heatmaps", action="store_true",
                      help="add the final fused heatmaps [B, S/4, S/4, N] as a second output")
  parser.add_argument("--check", action="store_true",
                      help="run the export on random crops and print its distance (px) to "
                           "the JAX model")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(lambda: _main(argv))


def _main(argv: Sequence[str] | None) -> int:
  args = _parse_args(argv)
  cli.require_training_install("python -m star_jax.export")
  from star_jax.commands import host
  host.hide_xla_flags_from_tensorflow()
  from star_jax.deploy.export import exporter
  exporter.check_options(args.format, dtype=args.dtype, quantize=args.quantize,
                         batch=args.batch)
  if args.calibration and not (args.format == "onnx" and args.quantize == "int8"):
    from star_jax.errors import UsageError
    raise UsageError("--calibration applies to --format onnx --quantize int8")
  exporter.check_output(args.format, os.path.normpath(args.out), [args.checkpoint])
  loaded = exporter.load_checkpoint(args.checkpoint, args.weights)
  result = exporter.export(loaded, args.format, args.out, batch=args.batch, dtype=args.dtype,
                           quantize=args.quantize, heatmaps=args.heatmaps,
                           calibration=args.calibration)
  size_mb = exporter.file_size(result.path) / 2 ** 20
  print(f"wrote {result.path} ({size_mb:.1f} MiB) and {result.sidecar} in "
        f"{result.seconds:.1f} s: {contract.describe(result.record)}")
  if args.check:
    from star_jax.deploy.export import parity
    batch = result.record["input"]["shape"][0] or 2
    images = parity.random_crops(batch, loaded.image_size)
    exported = parity.exported_landmarks(result.path, images)
    for name, float64 in (("float32", False), ("float64", True)):
      reference = parity.jax_landmarks(loaded.model, loaded.variables, images,
                                       loaded.image_size, float64=float64)
      d = parity.difference(exported, reference)
      print(f"check: vs the JAX model in {name}: mean {d['mean_px']:.4f} px, max "
            f"{d['max_px']:.4f} px ({batch} random crops)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
