"""dlib's face detectors: the HOG + linear SVM frontal detector and the MMOD CNN.

Both need the `dlib` module (binary wheels: `pip install dlib-bin`; the `dlib` sdist compiles
for minutes). The HOG detector's weights are compiled into dlib. The MMOD CNN's model file,
`mmod_human_face_detector.dat` (729,940 bytes), ships in `face_recognition_models` 0.3.0 (a
131 MB package, mostly other models); it is found through that distribution's metadata (its
own code is never imported: it needs `pkg_resources`) and checked against its SHA-256 first.

dlib's HOG finds faces down to 80x80 pixels at `upsample=0`; each upsampling step halves that
and costs about 4x the time. Images are first shrunk to a longer side of `max_side` pixels.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os

import cv2
import numpy as np

from star_jax.deploy.detection.boxes import Box

MMOD_DISTRIBUTION = "face_recognition_models"
MMOD_FILE = "face_recognition_models/models/mmod_human_face_detector.dat"
MMOD_SHA256 = "4cb19393e2fbaf2b1609a9319ad5386618c886a6234ec1b971f3e87c85d87fe6"
DLIB_HINT = "pip install dlib-bin==20.0.1.post1"
MMOD_HINT = f"pip install --no-deps {MMOD_DISTRIBUTION}==0.3.0"


class ModelUnavailable(RuntimeError):
  """dlib or a model file is not installed."""


def _dlib():
  try:
    import dlib
  except ImportError:
    raise ModelUnavailable(f"dlib detectors need dlib: {DLIB_HINT}") from None
  return dlib


def mmod_file() -> str:
  try:
    dist = importlib.metadata.distribution(MMOD_DISTRIBUTION)
  except importlib.metadata.PackageNotFoundError:
    raise ModelUnavailable(f"dlib's MMOD detector needs its model file: {MMOD_HINT}") from None
  path = str(dist.locate_file(MMOD_FILE))
  if not os.path.isfile(path):
    raise ModelUnavailable(f"{path}: missing from {MMOD_DISTRIBUTION} {dist.version}; "
                           f"{MMOD_HINT}")
  with open(path, "rb") as f:
    if hashlib.sha256(f.read()).hexdigest() != MMOD_SHA256:
      raise ModelUnavailable(f"{path}: not the expected MMOD model; {MMOD_HINT}")
  return path


def _shrunk(image_rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
  image = np.asarray(image_rgb)
  if image.ndim == 2:
    image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
  image = np.ascontiguousarray(image[..., :3])
  h, w = image.shape[:2]
  shrink = min(1.0, max_side / max(h, w))
  if shrink < 1.0:
    image = cv2.resize(image, (max(1, round(w * shrink)), max(1, round(h * shrink))),
                       interpolation=cv2.INTER_AREA)
  return image, shrink


class DlibHog:
  def __init__(self, *, upsample: int = 1, max_side: int = 640, threshold: float = 0.0):
    self.detector = _dlib().get_frontal_face_detector()
    self.upsample, self.max_side, self.threshold = upsample, max_side, threshold

  def __call__(self, image_rgb: np.ndarray) -> list[Box]:
    image, shrink = _shrunk(image_rgb, self.max_side)
    rects, scores, _ = self.detector.run(image, self.upsample, self.threshold)
    boxes = [Box(r.left() / shrink, r.top() / shrink, (r.right() + 1) / shrink,
                 (r.bottom() + 1) / shrink, score=float(s)) for r, s in zip(rects, scores)]
    return sorted(boxes, key=lambda b: -(b.score or 0.0))


class DlibMmod:
  def __init__(self, *, upsample: int = 0, max_side: int = 640):
    self.detector = _dlib().cnn_face_detection_model_v1(mmod_file())
    self.upsample, self.max_side = upsample, max_side

  def __call__(self, image_rgb: np.ndarray) -> list[Box]:
    image, shrink = _shrunk(image_rgb, self.max_side)
    found = self.detector(image, self.upsample)
    boxes = [Box(d.rect.left() / shrink, d.rect.top() / shrink, (d.rect.right() + 1) / shrink,
                 (d.rect.bottom() + 1) / shrink, score=float(d.confidence)) for d in found]
    return sorted(boxes, key=lambda b: -(b.score or 0.0))


@functools.lru_cache(maxsize=None)
def hog() -> DlibHog:
  return DlibHog()


@functools.lru_cache(maxsize=None)
def mmod() -> DlibMmod:
  return DlibMmod()
