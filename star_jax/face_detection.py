"""Former home of face detection; kept so that existing imports work. Use `star_jax.detection`.

`detect_faces` is the LBP cascade (`star_jax.detection.lbp.detect`), and `box_to_crop(box,
'detector')` its calibrated rule, as before detectors became pluggable.
"""

from __future__ import annotations

import numpy as np

from star_jax import detection
from star_jax.detection import Box  # noqa: F401  (re-exported)
from star_jax.detection.lbp import detect as detect_faces  # noqa: F401  (re-exported)

_LBP_RULE = detection.DETECTORS["lbp"].rule
DETECTOR_CENTER_SHIFT = _LBP_RULE.dy
DETECTOR_SCALE = _LBP_RULE.size_factor


def box_to_crop(box: Box, rule: str = "detector") -> tuple[float, np.ndarray]:
  """`detection.box_to_crop`, with 'detector' meaning the LBP cascade's rule."""
  return detection.box_to_crop(box, "lbp" if rule == "detector" else rule)
