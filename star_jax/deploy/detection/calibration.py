"""Scoring detectors on annotated faces, and fitting a detector's box -> crop rule.

A detection *finds* an annotated face when its centre lies inside the face's landmark box and
its longer side is 0.5-2x the landmark box's longer side. A detection is *false* when it finds
no annotated face and its centre lies in no listed unannotated face (`extra_faces`).

The crop rule (`boxes.CropRule`) is fitted so that a box's crop matches the training crop of
the face (centre of the landmark box, side `1.05 * max(w, h)` of it): `dx`, `dy` are the
median offsets of the landmark-box centre from the box centre in box widths / heights, and
`size_factor` the median of `1.05 * landmark side / box side`. Medians, because a handful of
faces is all there is and one odd detection should not pull the rule. Residuals are reported
in units of the training crop's side: the offset of a rule's crop centre from the training
crop centre, and the log2 ratio of the sides.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from star_jax.deploy.detection.boxes import (Box, CropRule, TRAINING_MARGIN, apply_rule,
                                             crop_from_landmarks)


def finds(box: Box, target: Box, *, min_ratio: float = 0.5, max_ratio: float = 2.0) -> bool:
  cx, cy = box.center
  inside = target.x1 <= cx <= target.x2 and target.y1 <= cy <= target.y2
  return inside and min_ratio <= box.size / target.size <= max_ratio


@dataclasses.dataclass
class ImageScore:
  name: str
  found: list[bool]            # per annotated face
  matched: list[Box | None]    # the detection that found each annotated face
  false_boxes: list[Box]
  num_boxes: int


def score_image(name: str, boxes: Sequence[Box], annotated: Sequence[Box],
                extra: Sequence[Box] = ()) -> ImageScore:
  """Which annotated faces `boxes` find, and which boxes are false (see the module docstring)."""
  matched: list[Box | None] = []
  used = set()
  for target in annotated:
    best = None
    for k, box in enumerate(boxes):
      if k not in used and finds(box, target):
        best = k
        break  # boxes come best first
    if best is not None:
      used.add(best)
    matched.append(None if best is None else boxes[best])
  false = []
  for k, box in enumerate(boxes):
    if k in used or any(finds(box, t) for t in annotated):
      continue
    cx, cy = box.center
    if any(e.x1 <= cx <= e.x2 and e.y1 <= cy <= e.y2 for e in extra):
      continue
    false.append(box)
  return ImageScore(name, [m is not None for m in matched], matched, false, len(boxes))


def rule_samples(boxes: Sequence[Box], landmarks: Sequence[np.ndarray]) -> np.ndarray:
  """Per (box, landmarks) pair: (dx in box widths, dy in box heights, 1.05 * landmark side /
  box side)."""
  rows = []
  for box, points in zip(boxes, landmarks):
    target = Box.around(points)
    tx, ty = target.center
    cx, cy = box.center
    rows.append([(tx - cx) / box.width, (ty - cy) / box.height,
                 TRAINING_MARGIN * target.size / box.size])
  return np.array(rows, np.float64).reshape(-1, 3)


def fit_rule(samples: np.ndarray) -> CropRule:
  dx, dy, size = np.median(np.asarray(samples, np.float64), axis=0)
  return CropRule(float(dx), float(dy), float(size))


def residuals(rule: CropRule, boxes: Sequence[Box], landmarks: Sequence[np.ndarray]
              ) -> np.ndarray:
  """Per pair: (x offset, y offset) of the rule's crop centre from the training crop centre in
  training-crop sides, and log2(rule side / training side)."""
  rows = []
  for box, points in zip(boxes, landmarks):
    scale, centre = apply_rule(box, rule)
    want_scale, want_centre = crop_from_landmarks(points)
    side = want_scale * 200.0
    rows.append([(centre[0] - want_centre[0]) / side, (centre[1] - want_centre[1]) / side,
                 np.log2(scale / want_scale)])
  return np.array(rows, np.float64).reshape(-1, 3)
