"""Face boxes for images without annotations, and the rule that turns a box into the crop.

Detector: the frontal-face LBP cascade that ships inside scikit-image
(`skimage.data.lbp_frontal_face_cascade_filename()`, trained by OpenCV), run with
`skimage.feature.Cascade`. It needs no download and no GPU. (OpenCV >= 5 wheels no longer
bundle Haar cascades, so `cv2.data.haarcascades` cannot be relied upon.) Any other detector can
be used by passing boxes, or a callable returning boxes, to the predictor.

Box -> crop (`scale`, `center` in the official convention: the crop spans `scale * 200` pixels
around `center`, see `crop_matrix`). The models are trained on crops whose centre is the centre
of the landmark bounding box and whose scale is `max(w, h) / 200 * 1.05` of that box. Two rules:

* `rule='official'` - for a box tight around the facial landmarks (what the official demo
  feeds: the bounding box of dlib's 68 points): `scale = min(w, h) / 200 * 1.05`, centre = box
  centre, exactly as the official demo.
* `rule='detector'` - for boxes from `detect_faces`. The LBP cascade's square box sits higher
  than the landmark box (it covers the forehead and stops near the chin) and is about as large.
  Calibrated against annotated faces: on the three WFLW-annotated images in
  tests/fixtures/official_wflw_data (synthetic drawings, rotated up to 10 degrees) and the
  scikit-image astronaut (a photograph; landmark box read off the image), the landmark-box
  centre lies 0.14-0.22 (median 0.15) box sizes below the detection centre, with no consistent
  horizontal offset (-0.05..0.13), and the landmark box's longer side is 0.91-1.17 box sizes
  (0.93 on the photograph). Hence `center = (cx, cy + 0.15 * size)` and
  `scale = 1.0 * size / 200`, i.e. 1.05 x a landmark box of 0.95 box sizes, erring on the
  loose side (training scale jitter is 10 %). `calibration_report` recomputes the ratios for
  any annotated images.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import cv2
import numpy as np

from star_jax.data import original_formats

# Calibrated detector-box -> crop rule (see module docstring).
DETECTOR_CENTER_SHIFT = 0.15   # landmark-box centre below the detection centre, x box size
DETECTOR_SCALE = 1.0           # crop scale = DETECTOR_SCALE * box size / 200
# Detection runs on a copy whose longer side is at most this many pixels (speed).
DETECTION_MAX_SIDE = 640


@dataclasses.dataclass(frozen=True)
class Box:
  """An axis-aligned face box in image pixels: (x1, y1) top-left, (x2, y2) bottom-right."""

  x1: float
  y1: float
  x2: float
  y2: float

  @property
  def width(self) -> float:
    return self.x2 - self.x1

  @property
  def height(self) -> float:
    return self.y2 - self.y1

  def as_list(self) -> list[float]:
    return [float(self.x1), float(self.y1), float(self.x2), float(self.y2)]

  @classmethod
  def parse(cls, text: str) -> "Box":
    """'x1,y1,x2,y2' -> Box; raises ValueError with the text when malformed."""
    try:
      values = [float(v) for v in text.split(",")]
    except ValueError:
      values = []
    if len(values) != 4 or values[2] <= values[0] or values[3] <= values[1]:
      raise ValueError(f"box {text!r} must be 'x1,y1,x2,y2' with x2 > x1 and y2 > y1")
    return cls(*values)


@functools.lru_cache(maxsize=1)
def _cascade():
  from skimage import data as skdata
  from skimage.feature import Cascade
  return Cascade(skdata.lbp_frontal_face_cascade_filename())


def _overlap_fraction(a: Box, b: Box) -> float:
  """Intersection area over the smaller box's area."""
  w = min(a.x2, b.x2) - max(a.x1, b.x1)
  h = min(a.y2, b.y2) - max(a.y1, b.y1)
  if w <= 0 or h <= 0:
    return 0.0
  return w * h / min(a.width * a.height, b.width * b.height)


def detect_faces(image_rgb: np.ndarray, *, min_size: int = 24, min_neighbors: int = 4,
                 scale_factor: float = 1.1, min_relative_size: float = 0.5,
                 max_side: int = DETECTION_MAX_SIDE) -> list[Box]:
  """Frontal faces in an RGB (or gray) uint8 image, largest first.

  Args:
    image_rgb: `(H, W, 3)` or `(H, W)` uint8.
    min_size: smallest face side searched, in pixels of the detection copy (whose longer side is
      at most `max_side`).
    min_neighbors: detections that must agree for a face to be kept (higher: fewer false alarms).
    scale_factor: window growth per search scale.
    min_relative_size: drop faces smaller than this fraction of the largest one (texture false
      alarms are usually small); 0 keeps all, e.g. for crowds at different depths.
    max_side: the image is shrunk to this longer side before searching, for speed.
  """
  image = np.asarray(image_rgb)
  if image.ndim == 3:
    gray = cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2GRAY)
  elif image.ndim == 2:
    gray = image
  else:
    raise ValueError(f"detect_faces: expected (H, W, 3) or (H, W), got {image.shape}")
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
    if all(_overlap_fraction(box, k) < 0.5 for k in kept):
      kept.append(box)
  if kept and min_relative_size > 0:
    largest = kept[0].width
    kept = [b for b in kept if b.width >= min_relative_size * largest]
  return kept


def box_to_crop(box: Box, rule: str = "detector") -> tuple[float, np.ndarray]:
  """A face box -> (`scale`, `center` (2,) float64) of the crop the model expects.

  `rule` is 'detector' (boxes from `detect_faces`) or 'official' (a box tight around the facial
  landmarks, as in the official demo); see the module docstring.
  """
  if rule == "official":
    scale, cx, cy = original_formats.crop_params(None, "min", rect=(box.x1, box.y1, box.x2, box.y2))
    return scale, np.array([cx, cy], np.float64)
  if rule == "detector":
    size = max(box.width, box.height)
    cx, cy = (box.x1 + box.x2) / 2.0, (box.y1 + box.y2) / 2.0
    return (float(DETECTOR_SCALE * size / 200.0),
            np.array([cx, cy + DETECTOR_CENTER_SHIFT * size], np.float64))
  raise ValueError(f"unknown box rule {rule!r}; use 'detector' or 'official'")


def calibration_report(images: Sequence[np.ndarray], landmarks: Sequence[np.ndarray],
                       detector: Callable[[np.ndarray], list[Box]] = detect_faces) -> np.ndarray:
  """Per annotated image: (dx/size, dy/size, landmark-box side / size) of the best detection.

  The quantities behind DETECTOR_CENTER_SHIFT and DETECTOR_SCALE; rows of NaN where no box
  contains the landmark-box centre.
  """
  rows = []
  for image, pts in zip(images, landmarks):
    lo, hi = np.min(pts, axis=0), np.max(pts, axis=0)
    centre = (lo + hi) / 2
    best = None
    for box in detector(image):
      if box.x1 <= centre[0] <= box.x2 and box.y1 <= centre[1] <= box.y2:
        best = box
        break
    if best is None:
      rows.append([np.nan] * 3)
      continue
    size = max(best.width, best.height)
    rows.append([(centre[0] - (best.x1 + best.x2) / 2) / size,
                 (centre[1] - (best.y1 + best.y2) / 2) / size, float(np.max(hi - lo)) / size])
  return np.array(rows, np.float64)
