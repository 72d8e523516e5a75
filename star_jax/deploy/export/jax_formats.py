"""StableHLO, SavedModel and TFLite exports, traced from the JAX model itself.

- StableHLO: `jax.export` of the contract function (normalisation, network, pixel convention)
  with a symbolic batch `b`, serialised (`Exported.serialize()`), lowered for CPU, CUDA and
  TPU. Load it with `jax.export.deserialize(open(PATH, 'rb').read()).call(images)`; it returns
  a tuple whose first element is `landmarks`.
- SavedModel: `jax2tf.convert` with native serialisation: the same StableHLO module inside an
  `XlaCallModule` op, batch polymorphic, signature `serving_default(image) -> {landmarks[,
  heatmaps]}`. Runs in TensorFlow (and TF Serving) on CPU and GPU.
- TFLite: the same conversion at a fixed batch (TFLite runs one static shape best), then the
  TFLite converter, which legalises the StableHLO operators into TFLite builtins (CONV_2D,
  FULLY_CONNECTED, ...). At a symbolic batch the converter meets a `dynamic_gather` it cannot
  translate (TF 2.21); a fixed batch has none. `int8` is the converter's dynamic-range
  quantisation (int8 weights; XNNPACK quantises activations on the fly); `float16` stores the
  weights as float16.

The custom-VJP functions of the model (max-pool, BatchNorm) trace to their forward
computations at inference, so no gradient rule is exported (`with_gradient=False`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from star_jax.deploy.runtime import contract

# Platforms the StableHLO module is lowered for (one module, dispatched at load time).
STABLEHLO_PLATFORMS = ("cpu", "cuda", "tpu")


def contract_function(model: Any, variables: Any, image_size: int, *, with_heatmaps: bool
                      ) -> Callable[[jnp.ndarray], tuple[jnp.ndarray, ...]]:
  """`image (B, S, S, 3) float32 0-255 -> (landmarks (B, N, 2) crop px[, heatmaps])`."""
  size = np.float32(image_size)

  def fn(image):
    x = image.astype(jnp.float32) / np.float32(255) * np.float32(2) - np.float32(1)
    out = model.apply(variables, x, train=False)
    landmarks = out.landmarks[-1].astype(jnp.float32)
    pixels = ((landmarks + 1) * size - 1) / 2
    if with_heatmaps:
      return pixels, out.heatmaps[-1].astype(jnp.float32)
    return (pixels,)

  return fn


def export_stablehlo(fn: Callable, image_size: int, out_path: str) -> dict:
  from jax import export
  shape = export.symbolic_shape(f"b, {image_size}, {image_size}, 3")
  spec = jax.ShapeDtypeStruct(shape, jnp.float32)
  try:
    exported = export.export(jax.jit(fn), platforms=STABLEHLO_PLATFORMS)(spec)
    platforms = STABLEHLO_PLATFORMS
  except Exception:
    # A jaxlib without the lowering rules of some platform: CPU alone still serves.
    exported = export.export(jax.jit(fn), platforms=("cpu",))(spec)
    platforms = ("cpu",)
  with open(out_path, "wb") as f:
    f.write(exported.serialize())
  return {"platforms": list(platforms), "jax_version": jax.__version__,
          "load": "jax.export.deserialize(bytes).call(image) -> (landmarks[, heatmaps])"}


def _tf_module(fn: Callable, image_size: int, batch: int | None, with_heatmaps: bool,
               polymorphic: bool):
  import tensorflow as tf
  from jax.experimental import jax2tf
  converted = jax2tf.convert(
      fn, with_gradient=False,
      polymorphic_shapes=[f"(b, {image_size}, {image_size}, 3)"] if polymorphic else None,
      native_serialization_platforms=("cpu", "cuda") if polymorphic else ("cpu",))

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec([batch, image_size, image_size, 3], tf.float32, name=contract.INPUT_NAME)])
  def serve(image):
    outputs = converted(image)
    named = {contract.LANDMARKS_NAME: outputs[0]}
    if with_heatmaps:
      named[contract.HEATMAPS_NAME] = outputs[1]
    return named

  module = tf.Module()
  module.serve = serve
  return module, serve


def export_savedmodel(fn: Callable, image_size: int, out_path: str, *, with_heatmaps: bool
                      ) -> dict:
  import tensorflow as tf
  module, serve = _tf_module(fn, image_size, None, with_heatmaps, polymorphic=True)
  tmp = out_path.rstrip(os.sep) + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    tf.saved_model.save(module, tmp, signatures={"serving_default": serve})
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  # An earlier SavedModel only: `exporter.check_output` refuses any other folder.
  shutil.rmtree(out_path, ignore_errors=True)
  os.replace(tmp, out_path)
  return {"tensorflow_version": tf.__version__, "signature": "serving_default",
          "load": "tf.saved_model.load(PATH).signatures['serving_default'](image=x)"}


def export_tflite(fn: Callable, image_size: int, out_path: str, *, batch: int,
                  with_heatmaps: bool, quantize: str | None, weight_dtype: str) -> dict:
  import tensorflow as tf
  module, serve = _tf_module(fn, image_size, batch, with_heatmaps, polymorphic=False)
  with tempfile.TemporaryDirectory(prefix="star_jax_tflite_") as tmp:
    saved = os.path.join(tmp, "saved_model")
    tf.saved_model.save(module, saved, signatures={"serving_default": serve})
    converter = tf.lite.TFLiteConverter.from_saved_model(saved)
    if quantize:  # dynamic range: int8 weights, activations quantised by the kernels
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif weight_dtype == "float16":
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
      converter.target_spec.supported_types = [tf.float16]
    flatbuffer = converter.convert()
  with open(out_path, "wb") as f:
    f.write(flatbuffer)
  return {"tensorflow_version": tf.__version__, "signature": "serving_default",
          "load": "ai_edge_litert.interpreter.Interpreter(PATH).get_signature_runner()"}
