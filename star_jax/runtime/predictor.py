"""Landmarks on whole images with an exported model, without JAX or TensorFlow.

The pipeline is the JAX predictor's (`star_jax.predict.Predictor`), step for step and with the
same functions: faces from the detector (or given boxes), `face_detection.box_to_crop`,
`transforms.crop_matrix` and `transforms.warp` for the crop, the exported network, and
`transforms.landmarks_to_original` to map back. Only the network differs: an exported model
(`star_jax.runtime.backends`) that returns crop pixels, which are brought back to the
normalised coordinates `landmarks_to_original` reads (`l = (2p + 1) / S - 1`, exact to about
1e-5 px).

    predictor = RuntimePredictor("model.onnx")
    faces = predictor.predict(image_rgb)                 # list of (N, 2) arrays, pixels
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from star_jax import face_detection
from star_jax import landmark_mappings
from star_jax.data import transforms
from star_jax.datasets import DatasetSpec, spec_for_num_points
from star_jax.face_detection import Box
from star_jax.runtime import backends


def default_detector() -> Callable[[np.ndarray], list[Box]]:
  """The face detector used when no boxes are given (the JAX predictor's default)."""
  return face_detection.detect_faces


@dataclasses.dataclass
class Face:
  """One face: landmarks in original pixels, and where the crop came from.

  The fields and JSON of `star_jax.predict.Face` (that module imports JAX, so it is mirrored
  here rather than imported).
  """

  landmarks: np.ndarray        # (N, 2) x, y
  box: Box
  box_source: str              # 'detector' or 'given'
  scale: float
  center: np.ndarray           # (2,)

  def to_json(self, num_points: int | None = None, source_spec: DatasetSpec | None = None
              ) -> dict:
    lm = self.landmarks
    if num_points is not None and source_spec is not None:
      lm = landmark_mappings.convert_landmarks(lm, source_spec, num_points)
    return {"box": self.box.as_list(), "box_source": self.box_source,
            "scale": self.scale, "center": [float(c) for c in self.center],
            "landmarks": np.round(lm.astype(np.float64), 3).tolist()}


class RuntimePredictor:
  """`star_jax.predict.Predictor`'s interface on an exported `.onnx` or `.tflite` model.

  Args:
    model: path of the exported model (its sidecar JSON beside it), or a loaded
      `backends.LandmarkModel`.
    batch_size: faces per network call (a fixed-batch model is fed in its own batch).
    detector: `image_rgb -> list[Box]` used when no boxes are given.
    threads: CPU threads of the engine (default: the engine's choice).
  """

  def __init__(self, model, *, batch_size: int = 8,
               detector: Callable[[np.ndarray], list[Box]] | None = None,
               threads: int | None = None):
    self.model = (model if isinstance(model, backends.LandmarkModel)
                  else backends.load_model(model, threads=threads))
    self.spec = spec_for_num_points(self.model.num_points)
    self.image_size = self.model.image_size
    self.batch_size = int(batch_size)
    self.detector = detector or default_detector()

  @property
  def num_points(self) -> int:
    return self.model.num_points

  def predict_crops(self, crops_rgb_u8: np.ndarray) -> np.ndarray:
    """`(B, S, S, 3)` uint8 crops -> `(B, N, 2)` landmarks in [-1, 1] (as the JAX predictor)."""
    crops = np.asarray(crops_rgb_u8)
    out = [self.model(crops[start:start + self.batch_size])
           for start in range(0, len(crops), self.batch_size)]
    if not out:
      return np.zeros((0, self.num_points, 2), np.float32)
    pixels = np.concatenate(out).astype(np.float64)
    return ((2 * pixels + 1) / self.image_size - 1).astype(np.float32)

  def faces_to_crops(self, image_rgb: np.ndarray, boxes: Sequence[Box], box_rule: str
                     ) -> tuple[np.ndarray, list[tuple[float, np.ndarray, np.ndarray]]]:
    """Crops (K, S, S, 3) uint8 and (scale, center, matrix) per box."""
    crops, geometry = [], []
    for box in boxes:
      scale, center = face_detection.box_to_crop(box, box_rule)
      matrix = transforms.crop_matrix(scale, center[0], center[1], self.image_size)
      crops.append(transforms.warp(image_rgb, matrix, self.image_size))
      geometry.append((scale, center, matrix))
    shape = (0, self.image_size, self.image_size, 3)
    return (np.stack(crops) if crops else np.zeros(shape, np.uint8)), geometry

  def _boxes(self, image_rgb: np.ndarray, boxes) -> tuple[list[Box], str, str]:
    if boxes is None:
      return list(self.detector(image_rgb)), "detector", "detector"
    parsed = [b if isinstance(b, Box) else Box(*map(float, b)) for b in boxes]
    return parsed, "given", "official"

  def predict_faces(self, images: Sequence[np.ndarray], boxes: Sequence | None = None, *,
                    box_rule: str | None = None) -> list[list[Face]]:
    """Faces of several images, batched together. `boxes[i]` (or None: detect) per image."""
    all_crops, plans, count = [], [], 0
    for i, image in enumerate(images):
      found, source, default_rule = self._boxes(image, None if boxes is None else boxes[i])
      crops, geometry = self.faces_to_crops(image, found, box_rule or default_rule)
      all_crops.append(crops)
      count += len(found)
      plans.append((found, source, geometry))
    landmarks = self.predict_crops(np.concatenate(all_crops)) if count else None
    results: list[list[Face]] = [[] for _ in images]
    k = 0
    for i, (found, source, geometry) in enumerate(plans):
      for box, (scale, center, matrix) in zip(found, geometry):
        pts = transforms.landmarks_to_original(landmarks[k], matrix, self.image_size)
        results[i].append(Face(pts, box, source, scale, center))
        k += 1
    return results

  def predict(self, image_rgb: np.ndarray, boxes: Sequence | None = None, *,
              box_rule: str | None = None, num_points: int | None = None) -> list[np.ndarray]:
    """Landmarks `(N, 2)` (original pixels, x y) of each face in an RGB uint8 image; the
    arguments of `star_jax.predict.Predictor.predict`."""
    faces = self.predict_faces([np.asarray(image_rgb)], None if boxes is None else [boxes],
                               box_rule=box_rule)[0]
    out = [f.landmarks for f in faces]
    if num_points is not None:
      out = [landmark_mappings.convert_landmarks(lm, self.spec, num_points) for lm in out]
    return out
