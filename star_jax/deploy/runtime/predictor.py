"""Landmarks on images and videos with an exported model, without JAX or TensorFlow.

`RuntimePredictor` is `star_jax.deploy.inference.Predictor` with another network: an exported
`.onnx` or
`.tflite` model (`star_jax.deploy.runtime.backends`) instead of the JAX one. Detection, the crop
(`transforms.crop_matrix`, `transforms.warp`), batching, test-time flip, tracking and the map
back to the image are the predictor's own code, so the two agree by construction. The exported
model returns crop pixels, which are brought back to the normalised coordinates the predictor
works in (`l = (2p + 1) / S - 1`, exact to about 1e-5 px).

    predictor = RuntimePredictor("model.onnx")
    faces = predictor.predict(image_rgb)                 # list of (N, 2) arrays, pixels

`predict` and `track` take what the JAX predictor's take (arrays, grey, `color="bgr"`, PIL
images, paths), through the same `image_io.as_rgb_image`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from star_jax.core import schemes as datasets
from star_jax.deploy import detection
from star_jax.deploy import inference
from star_jax.deploy.detection import Box, CropRule
from star_jax.deploy.runtime import backends


class RuntimePredictor(inference.Predictor):
  """`star_jax.deploy.inference.Predictor` (what `star_jax.deploy.predict` uses) on an exported
  model.

  Args:
    model: path of the exported model (its sidecar JSON beside it), or a loaded
      `backends.LandmarkModel`.
    batch_size: faces per network call (a fixed-batch model is fed in its own batch).
    detector, detector_rule, tta: as for `Predictor`.
    threads: CPU threads of the engine (default: the engine's choice).
    spin: ONNX Runtime's threads spin between operators instead of sleeping: faster when the
      engine has its cores to itself (real-time video), slower on a shared machine.
  """

  def __init__(self, model, *, batch_size: int = 8,
               detector: str | Callable[[np.ndarray], list[Box]] = detection.DEFAULT,
               detector_rule: CropRule | str | None = None, tta: str = "none",
               threads: int | None = None, spin: bool = False):
    self._setup(batch_size, detector, detector_rule, tta)
    self.model = (model if isinstance(model, backends.LandmarkModel)
                  else backends.load_model(model, threads=threads, spin=spin))
    scheme = self.model.info.record.get("scheme")
    self.spec = (datasets.scheme_from_dict(scheme, self.model.path, for_training=False)
                 if scheme else datasets.spec_for_num_points(self.model.num_points))
    self.image_size = self.model.image_size
    self.trained_on = self.model.info.trained_on
    self.model_label = str(self.model.path)

  def _network(self, crops_rgb_u8: np.ndarray) -> np.ndarray:
    pixels = self.model(np.asarray(crops_rgb_u8)).astype(np.float64)
    return ((2 * pixels + 1) / self.image_size - 1).astype(np.float32)
