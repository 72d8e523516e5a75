"""The frontal-face LBP cascade that ships inside scikit-image (trained by OpenCV).

Run with `skimage.feature.Cascade`; no download, no extra package (scikit-image is a dependency
of star-jax). It is fast on small images but weak on real photos: it misses turned and old grey
faces and fires on textures (see benchmarks/RESULTS.md, "Face detectors"). It stays as the
fallback when no better detector is installed.
"""

from __future__ import annotations

import threading

import cv2
import numpy as np

from star_jax.deploy.detection.boxes import Box, overlap_of_smaller

# Detection runs on a copy whose longer side is at most this many pixels (speed).
MAX_SIDE = 640


_local = threading.local()


def _cascade():
  """One cascade per thread (the predictor detects in worker threads)."""
  cascade = getattr(_local, "cascade", None)
  if cascade is None:
    from skimage import data as skdata
    from skimage.feature import Cascade
    cascade = _local.cascade = Cascade(skdata.lbp_frontal_face_cascade_filename())
  return cascade


def to_gray(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] in (3, 4):
    return cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2GRAY)
  if image.ndim == 2:
    return image
  raise ValueError(f"expected an (H, W, 3) RGB or (H, W) gray image, got shape {image.shape}")


def detect(image_rgb: np.ndarray, *, min_size: int = 24, min_neighbors: int = 4,
           scale_factor: float = 1.1, min_relative_size: float = 0.5,
           max_side: int = MAX_SIDE) -> list[Box]:
  """Frontal faces in an RGB (or gray) uint8 image, largest first.

  Args:
    min_size: smallest face side searched, in pixels of the detection copy (whose longer side
      is at most `max_side`).
    min_neighbors: detections that must agree for a face to be kept (higher: fewer false alarms).
    scale_factor: window growth per search scale.
    min_relative_size: drop faces smaller than this fraction of the largest one (texture false
      alarms are usually small); 0 keeps all, e.g. for crowds at different depths.
  """
  gray = to_gray(image_rgb)
  h, w = gray.shape
  shrink = min(1.0, max_side / max(h, w))
  if shrink < 1.0:
    gray = cv2.resize(gray, (max(1, round(w * shrink)), max(1, round(h * shrink))),
                      interpolation=cv2.INTER_AREA)
  gh, gw = gray.shape
  if min(gh, gw) < min_size:
    return []
  found = _cascade().detect_multi_scale(
      img=gray, scale_factor=scale_factor, step_ratio=1, min_size=(min_size, min_size),
      max_size=(min(gh, gw), min(gh, gw)), min_neighbor_number=min_neighbors)
  boxes = [Box(d["c"] / shrink, d["r"] / shrink, (d["c"] + d["width"]) / shrink,
               (d["r"] + d["height"]) / shrink) for d in found]
  boxes.sort(key=lambda b: b.width * b.height, reverse=True)
  kept: list[Box] = []
  for box in boxes:
    # The cascade reports several windows on one face at neighbouring scales: keep the largest.
    if all(overlap_of_smaller(box, k) < 0.5 for k in kept):
      kept.append(box)
  if kept and min_relative_size > 0:
    largest = kept[0].width
    kept = [b for b in kept if b.width >= min_relative_size * largest]
  return kept
