"""Conversion of WFLW's 98-point layout to the 68-point 300W (Multi-PIE / dlib) layout.

The correspondence is the one commonly used to compare WFLW models with 300W annotations:

| 68-point part (indices)    | 98-point source                                   |
|----------------------------|---------------------------------------------------|
| jaw 0-16                   | every second contour point 0, 2, ..., 32          |
| brows 17-21, 22-26         | upper brow arcs 33-37 and 42-46                   |
| nose 27-35                 | bridge 51-54 and nostrils 55-59                   |
| eye 36-41                  | 60, 61, 63, 64, 65, 67 (corners, two per eyelid)  |
| eye 42-47                  | 68, 69, 71, 72, 73, 75                            |
| mouth 48-67                | outer lip 76-87 and inner lip 88-95               |

WFLW eyes have three points per eyelid (61-63, 65-67); the 68-point layout has two, taken as
the outer two of each eyelid. Brow lower arcs (38-41, 47-50) and the pupils (96, 97) have no
68-point counterpart. The mapping sends 300W's flip pairs onto WFLW's flip pairs and each 300W
curve onto the WFLW curve of the same name (both checked in the tests).
"""

from __future__ import annotations

import numpy as np

from star_jax.core.schemes import DatasetSpec, get_spec

WFLW98_TO_300W68: tuple[int, ...] = (
    tuple(range(0, 33, 2))           # jaw
    + tuple(range(33, 38))           # right brow (image left), upper arc
    + tuple(range(42, 47))           # left brow, upper arc
    + tuple(range(51, 60))           # nose bridge and nostrils
    + (60, 61, 63, 64, 65, 67)       # right eye (image left)
    + (68, 69, 71, 72, 73, 75)       # left eye
    + tuple(range(76, 96))           # outer and inner lip
)
assert len(WFLW98_TO_300W68) == 68


def convert_landmarks(landmarks: np.ndarray, source: DatasetSpec | str, num_points: int
                      ) -> np.ndarray:
  """`(..., N_source, 2)` landmarks -> `(..., num_points, 2)` in the requested layout.

  Supports the identity (num_points equal to the source's) and WFLW 98 -> 68.
  """
  spec = get_spec(source) if isinstance(source, str) else source
  landmarks = np.asarray(landmarks)
  if landmarks.shape[-2] != spec.num_points:
    raise ValueError(f"landmarks have {landmarks.shape[-2]} points, {spec.name} has "
                     f"{spec.num_points}")
  if num_points == spec.num_points:
    return landmarks
  if spec.num_points == 98 and num_points == 68:
    return landmarks[..., list(WFLW98_TO_300W68), :]
  raise ValueError(f"no mapping from {spec.name}'s {spec.num_points} points to {num_points} "
                   "points; supported: 98 -> 68")


def output_spec(source: DatasetSpec, num_points: int | None) -> DatasetSpec:
  """The scheme of `convert_landmarks(..., source, num_points)`'s output (None: the source's):
  its curves are the ones to draw on converted landmarks."""
  if num_points is None or num_points == source.num_points:
    return source
  if source.num_points == 98 and num_points == 68:
    return get_spec("300w")
  raise ValueError(f"no mapping from {source.name}'s {source.num_points} points to {num_points} "
                   "points; supported: 98 -> 68")
