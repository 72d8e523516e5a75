"""Face boxes, and the rules that turn a box (or a set of landmarks) into the network's crop.

The crop is `(scale, center)` in the official convention: it spans `scale * 200` pixels around
`center` (see `star_jax.data.transforms.crop_matrix`). The models are trained on crops centred
on the landmark bounding box with `scale = max(w, h) / 200 * 1.05` of that box
(`crop_from_landmarks`). A detector's box sits elsewhere on the face, so each detector carries
a `CropRule`, fitted on annotated real faces (`star_jax.deploy.detection.calibration`), that maps
its
boxes onto that crop:

  center = (cx + dx * w, cy + dy * h),   scale = size_factor * max(w, h) / 200

with (cx, cy) the box centre and w, h its sides. `rule='official'` is the official demo's
reading of a box tight around the landmarks (`min(w, h) / 200 * 1.05`), used for `--box`.

Nothing here imports JAX or TensorFlow.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

# The official face box unit and the training crop's margin around the landmark box.
FACE_BOX_UNIT = 200.0
TRAINING_MARGIN = 1.05


@dataclasses.dataclass(frozen=True)
class Box:
  """An axis-aligned face box in image pixels: (x1, y1) top-left, (x2, y2) bottom-right.

  `score` is the detector's confidence where it has one (not part of equality).
  """

  x1: float
  y1: float
  x2: float
  y2: float
  score: float | None = dataclasses.field(default=None, compare=False)

  @property
  def width(self) -> float:
    return self.x2 - self.x1

  @property
  def height(self) -> float:
    return self.y2 - self.y1

  @property
  def size(self) -> float:
    return max(self.width, self.height)

  @property
  def center(self) -> tuple[float, float]:
    return (self.x1 + self.x2) / 2.0, (self.y1 + self.y2) / 2.0

  def as_list(self) -> list[float]:
    return [float(self.x1), float(self.y1), float(self.x2), float(self.y2)]

  def scaled(self, factor: float) -> "Box":
    """The box in an image resized by `factor` (coordinates times `factor`)."""
    return Box(self.x1 * factor, self.y1 * factor, self.x2 * factor, self.y2 * factor,
               self.score)

  @classmethod
  def parse(cls, text: str) -> "Box":
    """'x1,y1,x2,y2' -> Box; raises ValueError naming the text when malformed or not finite."""
    try:
      values = [float(v) for v in text.split(",")]
    except ValueError:
      values = []
    return cls.checked(values, text)

  @classmethod
  def checked(cls, values: Sequence[float], shown: object = None) -> "Box":
    """A box given by a user (4 numbers): ValueError unless finite with x2 > x1 and y2 > y1 (a
    box of no width or height has no crop)."""
    try:
      values = [float(v) for v in values]
    except (TypeError, ValueError):
      values = []
    if (len(values) != 4 or not all(math.isfinite(v) for v in values)
        or values[2] <= values[0] or values[3] <= values[1]):
      shown = ",".join(map(str, values)) if shown is None else shown
      raise ValueError(f"box {shown!r} must be 'x1,y1,x2,y2' (finite numbers) with x2 > x1 and "
                       "y2 > y1")
    return cls(*values)

  @classmethod
  def around(cls, points: np.ndarray) -> "Box":
    """The bounding box of (N, 2) points."""
    pts = np.asarray(points, np.float64)
    (x1, y1), (x2, y2) = pts.min(axis=0), pts.max(axis=0)
    return cls(float(x1), float(y1), float(x2), float(y2))


@dataclasses.dataclass(frozen=True)
class CropRule:
  """Where the training crop lies relative to a detector's box (see the module docstring)."""

  dx: float = 0.0           # crop centre right of the box centre, in box widths
  dy: float = 0.0           # crop centre below the box centre, in box heights
  size_factor: float = 1.0  # crop side (scale * 200) over the box's longer side


def crop_from_landmarks(points: np.ndarray) -> tuple[float, np.ndarray]:
  """The training crop of a face with these landmarks: (scale, centre (2,) float64)."""
  box = Box.around(points)
  return (box.size / FACE_BOX_UNIT * TRAINING_MARGIN,
          np.array(box.center, np.float64))


def apply_rule(box: Box, rule: CropRule) -> tuple[float, np.ndarray]:
  cx, cy = box.center
  return (float(rule.size_factor * box.size / FACE_BOX_UNIT),
          np.array([cx + rule.dx * box.width, cy + rule.dy * box.height], np.float64))


def official_crop(box: Box) -> tuple[float, np.ndarray]:
  """The official demo's crop for a box tight around the landmarks: `min(w, h)` based."""
  return (min(box.width, box.height) / FACE_BOX_UNIT * TRAINING_MARGIN,
          np.array(box.center, np.float64))


def crop_box(scale: float, center: Sequence[float]) -> Box:
  """The square image region a crop covers."""
  half = float(scale) * FACE_BOX_UNIT / 2.0
  return Box(center[0] - half, center[1] - half, center[0] + half, center[1] + half)


def iou(a: Box, b: Box) -> float:
  w = min(a.x2, b.x2) - max(a.x1, b.x1)
  h = min(a.y2, b.y2) - max(a.y1, b.y1)
  if w <= 0 or h <= 0:
    return 0.0
  inter = w * h
  return inter / (a.width * a.height + b.width * b.height - inter)


def overlap_of_smaller(a: Box, b: Box) -> float:
  """Intersection area over the smaller box's area."""
  w = min(a.x2, b.x2) - max(a.x1, b.x1)
  h = min(a.y2, b.y2) - max(a.y1, b.y1)
  if w <= 0 or h <= 0:
    return 0.0
  return w * h / min(a.width * a.height, b.width * b.height)
