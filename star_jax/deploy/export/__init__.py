"""Export of trained models to ONNX, TFLite, SavedModel and StableHLO.

    python -m star_jax.export --checkpoint CKPT --format {onnx,tflite,savedmodel,stablehlo} \
        --out PATH [--batch N] [--dtype float32|bfloat16|float16] \
        [--quantize int8|int8-dynamic] [--calibration FOLDER] [--heatmaps] [--check]

Every export follows one contract (`star_jax.deploy.runtime.contract`): input `image` float32
`[B, S, S, 3]` RGB 0-255, first output `landmarks` float32 `[B, N, 2]` in crop pixels, and a
sidecar `PATH.json`. `star_jax.deploy.runtime` runs the ONNX and TFLite exports without JAX. Routes
and
their measurements: docs/export.md.

    from star_jax.deploy.export import export
    result = export("runs/wflw", "onnx", "wflw.onnx")
"""

from star_jax.deploy.export.exporter import ExportResult, export

__all__ = ["ExportResult", "export"]
