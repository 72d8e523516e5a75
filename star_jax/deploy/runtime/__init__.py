"""Inference with exported models, without JAX or TensorFlow (numpy, OpenCV and an engine).

Engines: onnxruntime for `.onnx`, the LiteRT interpreter (`ai-edge-litert`) for `.tflite`;
both come with `pip install 'star-jax[export]'`. Importing this package imports neither JAX nor
TensorFlow, nor an engine until a model is opened (tests/test_runtime.py checks it).

    from star_jax.deploy.runtime import RuntimePredictor, load_model
    predictor = RuntimePredictor("wflw.onnx")          # the sidecar wflw.onnx.json beside it
    faces = predictor.predict(image_rgb)               # list of (N, 2) arrays, pixels
    crops_px = load_model("wflw.onnx")(crops)          # (B, 256, 256, 3) -> (B, N, 2) crop px

The crop, the detector and the map back to the image are those of `star_jax.deploy.predict`.
"""

from star_jax.deploy.runtime.backends import LandmarkModel, load_model
from star_jax.deploy.runtime.contract import ModelInfo, read_sidecar
from star_jax.deploy.inference import Face
from star_jax.deploy.runtime.predictor import RuntimePredictor

__all__ = ["Face", "LandmarkModel", "ModelInfo", "RuntimePredictor", "load_model",
           "read_sidecar"]
