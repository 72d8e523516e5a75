"""Landmarks on whole images and video frames: the `Predictor` and the `Face` it returns.

The pipeline every front end shares (`python -m star_jax.predict`, the JAX-free
`star_jax.deploy.runtime`, the tracker): faces from a detector (`star_jax.deploy.detection`) or
given boxes,
each box turned into the crop the model was trained on by its rule, crops batched through the
network, landmarks mapped back to the image. The network is the only part that differs between
a checkpoint (`Predictor`, JAX) and an exported model (`runtime.RuntimePredictor`): a subclass
replaces `_network` and how the model is loaded.
"""

from __future__ import annotations

import logging
import dataclasses
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from star_jax.core import schemes as datasets
from star_jax.deploy import detection
from star_jax.core import landmark_mappings
from star_jax.deploy import tracking
from star_jax.deploy import video
from star_jax.data import transforms
from star_jax.deploy.detection import Box, CropRule
from star_jax.errors import UsageError
from star_jax.deploy.image_io import as_rgb_image

_log = logging.getLogger(__name__)

TTA_MODES = ("none", "flip")


@dataclasses.dataclass
class Face:
  """One face's prediction: landmarks in original pixels, and where the crop came from."""

  landmarks: np.ndarray        # (N, 2) x, y
  box: Box
  box_source: str              # 'detector' or 'given'
  scale: float
  center: np.ndarray           # (2,)

  def to_json(self, num_points: int | None = None, source_spec=None) -> dict:
    lm = self.landmarks
    if num_points is not None and source_spec is not None:
      lm = landmark_mappings.convert_landmarks(lm, source_spec, num_points)
    record = {"box": [round(v, 3) for v in self.box.as_list()], "box_source": self.box_source,
              "scale": round(float(self.scale), 6),
              "center": [round(float(c), 3) for c in self.center],
              "landmarks": np.round(lm.astype(np.float64), 3).tolist()}
    if self.box.score is not None:
      record["score"] = round(float(self.box.score), 4)
    return record


def _padded_size(n: int, batch_size: int) -> int:
  """The batch a call of n crops is padded to: the next power of two up to `batch_size`, so a
  video's one or two faces do not pay for a full batch and few shapes are compiled."""
  size = 1
  while size < n and size < batch_size:
    size *= 2
  return min(size, batch_size)


class Predictor:
  """Batched, jitted landmark prediction for whole images and videos.

  Args:
    checkpoint: path for `model_store.load_model`, or a `model_store.LoadedModel`.
    weights: 'default', 'ema' or 'raw' (see `model_store.load_model`).
    batch_size: faces per network call; calls are padded (to powers of two up to it) so few
      compilations serve all.
    detector: a name of `star_jax.deploy.detection` ('default', 'blazeface', 'lbp', ...) or a
    callable
      `image_rgb -> list[Box]` (whose boxes are then read with `detector_rule`).
    detector_rule: the box -> crop rule for a callable detector (default: the LBP rule).
    tta: 'none' or 'flip' (test-time flip augmentation, see `predict_crops`).

  The network is the only part a subclass replaces (`_network`; see
  `star_jax.deploy.runtime.RuntimePredictor` for exported models).

  A model trained only on the embedded synthetic faces (`trained_on == 'embedded'`) says so in
  one warning line on stderr the first time it runs.
  """

  trained_on: str | None = None  # the dataset the model learnt, when its checkpoint says
  model_label: str = "the model"

  def __init__(self, checkpoint, *, weights: str = "default", batch_size: int = 8,
               detector: str | Callable[[np.ndarray], list[Box]] = detection.DEFAULT,
               detector_rule: CropRule | str | None = None, tta: str = "none"):
    self._setup(batch_size, detector, detector_rule, tta)
    from star_jax.training import eval_lib, model_store# JAX, imported only by this network
    self.loaded = (checkpoint if isinstance(checkpoint, model_store.LoadedModel)
                   else model_store.load_model(checkpoint, weights=weights))
    self._normalize = eval_lib.normalize_crops
    self._landmark_fn = eval_lib.landmark_fn_for(self.loaded)
    # On the device once: a host copy of the weights would be sent with every call (68 MB for
    # the full model).
    import jax
    self._variables = jax.device_put(self.loaded.variables)
    self.spec = self.loaded.spec
    self.image_size = self.loaded.image_size
    self.trained_on = self.loaded.trained_on
    self.model_label = self.loaded.source or self.model_label

  def _setup(self, batch_size: int, detector, detector_rule, tta: str) -> None:
    """What every network shares: batching, the detector and its crop rule, test-time flip."""
    if int(batch_size) < 1:
      raise UsageError(f"batch_size must be at least 1, got {batch_size}")
    if tta not in TTA_MODES:
      raise UsageError(f"tta={tta!r}: use one of {', '.join(TTA_MODES)}")
    self.batch_size = int(batch_size)
    self.tta = tta
    self._told_training_data = False
    if callable(detector):
      self.detector_name = getattr(detector, "__name__", "custom")
      self.detector = detector
      self.detector_rule = detector_rule or detection.FALLBACK_DETECTOR
    else:
      self.detector_name = detection.resolve(detector)
      self.detector = detection.get_detector(self.detector_name)
      self.detector_rule = detector_rule or self.detector_name

  @property
  def num_points(self) -> int:
    return self.spec.num_points

  def _network(self, crops_rgb_u8: np.ndarray) -> np.ndarray:
    """One padded batch of uint8 crops -> landmarks in [-1, 1] (the JAX network)."""
    chunk = self._normalize(crops_rgb_u8)
    n = len(chunk)
    padded = _padded_size(n, self.batch_size)
    if n < padded:
      chunk = np.concatenate([chunk, np.zeros((padded - n,) + chunk.shape[1:], chunk.dtype)])
    return np.asarray(self._landmark_fn(self._variables, chunk))[:n]

  def predict_crops(self, crops_rgb_u8: np.ndarray) -> np.ndarray:
    """`(B, S, S, 3)` uint8 crops -> `(B, N, 2)` landmarks in [-1, 1] (in batches).

    With `tta='flip'` each landmark set is the mean of the crop's and the un-flipped one of the
    mirrored crop (the scheme's flip pairs swapped, x -> -x).
    """
    self._tell_training_data()
    crops = np.asarray(crops_rgb_u8)
    if not len(crops):
      return np.zeros((0, self.num_points, 2), np.float32)
    run = lambda c: np.concatenate([self._network(c[start:start + self.batch_size])
                                    for start in range(0, len(c), self.batch_size)])
    out = run(crops)
    if self.tta == "flip":
      if not self.spec.flip_pairs:
        raise UsageError(f"--tta flip: scheme {self.spec.name!r} has no flip pairs")
      mirrored = run(np.ascontiguousarray(crops[:, :, ::-1]))[:, self.spec.flip_permutation()]
      out = 0.5 * (out + mirrored * np.asarray([-1.0, 1.0], np.float32))
    return out.astype(np.float32)

  def _tell_training_data(self) -> None:
    """The synthetic-data warning, once per predictor."""
    if self._told_training_data:
      return
    self._told_training_data = True
    warning = datasets.synthetic_warning(self.trained_on, self.model_label)
    if warning:
      _log.warning(warning)

  def crops_at(self, image_rgb: np.ndarray, crops: Sequence[tuple[float, np.ndarray]]
               ) -> tuple[np.ndarray, list[np.ndarray]]:
    """The warped crops (K, S, S, 3) uint8 and their crop matrices for (scale, center) pairs."""
    pictures, matrices = [], []
    for scale, center in crops:
      matrix = transforms.crop_matrix(scale, center[0], center[1], self.image_size)
      pictures.append(transforms.warp(image_rgb, matrix, self.image_size))
      matrices.append(matrix)
    if not pictures:
      return np.zeros((0, self.image_size, self.image_size, 3), np.uint8), []
    return np.stack(pictures), matrices

  def landmarks_in_crops(self, image_rgb: np.ndarray,
                         crops: Sequence[tuple[float, np.ndarray]]) -> list[np.ndarray]:
    """Landmarks (N, 2) in image pixels of the face in each crop (one network call)."""
    pictures, matrices = self.crops_at(image_rgb, crops)
    landmarks = self.predict_crops(pictures)
    return [transforms.landmarks_to_original(lm, m, self.image_size)
            for lm, m in zip(landmarks, matrices)]

  def box_crop(self, box: Box, rule: str | CropRule | None = None) -> tuple[float, np.ndarray]:
    """A detector box -> its crop by `rule` ('detector' or None: this predictor's detector)."""
    if rule in (None, "detector"):
      rule = self.detector_rule
    return detection.box_to_crop(box, rule)

  def plan(self, image_rgb: np.ndarray, boxes: Sequence | None = None, *,
           box_rule: str | None = None) -> tuple[list[Box], str, list[tuple[float, np.ndarray]]]:
    """(boxes, their source, crops) of an image: detected, or the given boxes."""
    if boxes is None:
      found = list(self.detector(image_rgb))
      return found, "detector", [self.box_crop(b, box_rule) for b in found]
    parsed = [Box.checked(b.as_list() if isinstance(b, Box) else b, b) for b in boxes]
    rule = box_rule or "official"
    return parsed, "given", [self.box_crop(b, rule) for b in parsed]

  def predict_faces(self, images: Sequence, boxes: Sequence | None = None, *,
                    box_rule: str | None = None, color: str = "rgb") -> list[list[Face]]:
    """Faces of several images, batched together. `boxes[i]` (or None: detect) per image.

    Each image is what `predict` takes (an array, a PIL image or a path).
    """
    images = [as_rgb_image(image, color=color) for image in images]
    plans = [self.plan(image, None if boxes is None else boxes[i], box_rule=box_rule)
             for i, image in enumerate(images)]
    return self.predict_plans(images, plans)

  def predict_plans(self, images: Sequence[np.ndarray], plans: Sequence[tuple]
                    ) -> list[list[Face]]:
    """Faces of several RGB images whose crops are planned (`plan`), run as one batch.

    `plans[i]` is `plan(images[i], ...)`: the faces' boxes, their source and crops. The crops
    of all the images go through the network together; a face-less image gets `[]`. Callers
    that find faces ahead of the network (in threads, as `predict_files` does) batch here.
    """
    pictures, matrices = [], []
    for image, (_, _, crops) in zip(images, plans):
      p, m = self.crops_at(image, crops)
      pictures.append(p)
      matrices.extend(m)
    landmarks = self.predict_crops(np.concatenate(pictures)) if matrices else []
    results: list[list[Face]] = []
    k = 0
    for found, source, crops in plans:
      faces = []
      for box, (scale, center) in zip(found, crops):
        points = transforms.landmarks_to_original(landmarks[k], matrices[k], self.image_size)
        faces.append(Face(points, box, source, float(scale), center))
        k += 1
      results.append(faces)
    return results

  def predict(self, image, boxes: Sequence | None = None, *, box_rule: str | None = None,
              num_points: int | None = None, color: str = "rgb") -> list[np.ndarray]:
    """Landmarks `(N, 2)` (original pixels, x y) of each face in an image.

    `image`: an RGB uint8 array `(H, W, 3)` (BGR, as OpenCV reads it, with `color="bgr"`), a
    grey `(H, W)` or `(H, W, 1)` array, a PIL image or an image file's path (see
    `image_io.as_rgb_image`; anything else is a one-line `UsageError`).
    `boxes`: `(x1, y1, x2, y2)` per face, or None to detect. A given box is read with the
    official demo's rule (tight around the landmarks) unless `box_rule` says otherwise
    ('landmarks', 'detector' or a detector name). `num_points=68` maps 98-point output to the
    300W layout.
    """
    faces = self.predict_faces([image], None if boxes is None else [boxes], box_rule=box_rule,
                               color=color)[0]
    out = [f.landmarks for f in faces]
    if num_points is not None:
      out = [landmark_mappings.convert_landmarks(lm, self.spec, num_points) for lm in out]
    return out

  def tracker(self, config: tracking.TrackerConfig = tracking.TrackerConfig(),
              smoothing: tracking.SmoothingConfig = tracking.SmoothingConfig()
              ) -> tracking.FaceTracker:
    """A `tracking.FaceTracker` driven by this predictor's network and detector."""
    return tracking.FaceTracker(self.landmarks_in_crops, self.detector, self.box_crop,
                                config=config, smoothing=smoothing,
                                edges=[(e.points, e.closed) for e in self.spec.edges])

  def track(self, frames: Iterable, *, fps: float = video.DEFAULT_FPS,
            config: tracking.TrackerConfig = tracking.TrackerConfig(),
            smoothing: tracking.SmoothingConfig = tracking.SmoothingConfig(),
            color: str = "rgb") -> Iterator[list[tracking.TrackedFace]]:
    """Faces of each video frame, in order. `frames`: images as `predict` takes them (timed at
    `fps`) or `(time_s, image)` pairs; `color="bgr"` for OpenCV's frames."""
    face_tracker = self.tracker(config, smoothing)
    for index, item in enumerate(frames):
      time_s, frame = item if isinstance(item, tuple) else (index / fps, item)
      yield face_tracker.update(as_rgb_image(frame, color=color), float(time_s))


