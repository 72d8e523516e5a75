"""Dataset facts: point counts, edges, flip pairs, NME normalisation, subsets.

Every other module reads these tables; no point index is written anywhere else. The values are
the ones the official STAR configuration (conf/alignment.py) uses for WFLW, 300W and COFW.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

# A normalisation end point is one landmark index or several whose mean is used.
NormIndex = int | tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Edge:
  """A facial curve: the points it runs through and whether it closes on itself."""

  name: str
  closed: bool
  points: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Facts about one landmark layout."""

  name: str
  num_points: int
  edges: tuple[Edge, ...]
  flip_pairs: tuple[tuple[int, int], ...]
  # NME normalisers: (left, right) end points of the inter-ocular / inter-pupil distance.
  ocular: tuple[NormIndex, NormIndex]
  pupil: tuple[NormIndex, NormIndex]
  # The normaliser the official code uses when norm_type == 'default'.
  default_norm: str
  # FR/AUC threshold the official evaluation uses for this dataset.
  failure_threshold: float
  # Names of the 0/1 attribute tags in the TSV (WFLW only); each defines a subset.
  attribute_tags: tuple[str, ...] = ()
  # 300W: subsets defined by substrings of the image path (common/challenge/full).
  path_subsets: tuple[tuple[str, tuple[str, ...]], ...] = ()

  @property
  def num_edges(self) -> int:
    return len(self.edges)

  def flip_permutation(self) -> np.ndarray:
    """Index array `perm` such that `flipped_landmarks = landmarks[perm]` after mirroring."""
    perm = np.arange(self.num_points)
    for a, b in self.flip_pairs:
      perm[a], perm[b] = b, a
    return perm

  def edge_to_point(self) -> tuple[np.ndarray, np.ndarray]:
    """The fixed E2H 1x1 convolution: weight `(num_edges, num_points)` and bias `(num_points,)`.

    A point takes the sum of the edge maps it lies on; a point on no edge gets a constant 1.
    """
    weight = np.zeros((self.num_edges, self.num_points), np.float32)
    for e, edge in enumerate(self.edges):
      weight[e, list(edge.points)] = 1.0
    bias = (weight.sum(axis=0) == 0).astype(np.float32)
    return weight, bias

  def norm_indices(self, norm: str = "default") -> tuple[NormIndex, NormIndex]:
    """The (left, right) normalisation end points for `norm` in {'default','ocular','pupil'}."""
    if norm == "default":
      norm = self.default_norm
    if norm == "ocular":
      return self.ocular
    if norm == "pupil":
      return self.pupil
    raise ValueError(f"unknown NME normalisation {norm!r}; use 'default', 'ocular' or 'pupil'")


def _edges(table: Sequence[tuple[str, bool, Sequence[int]]]) -> tuple[Edge, ...]:
  return tuple(Edge(name, closed, tuple(points)) for name, closed, points in table)


WFLW = DatasetSpec(
    name="wflw",
    num_points=98,
    edges=_edges([
        ("contour", False, range(0, 33)),
        ("right_brow", True, range(33, 42)),
        ("left_brow", True, range(42, 51)),
        ("nose_bridge", False, range(51, 55)),
        ("nostrils", False, range(55, 60)),
        ("right_eye", True, range(60, 68)),
        ("left_eye", True, range(68, 76)),
        ("outer_lip", True, range(76, 88)),
        ("inner_lip", True, range(88, 96)),
    ]),
    flip_pairs=tuple([(i, 32 - i) for i in range(16)] + [
        (33, 46), (34, 45), (35, 44), (36, 43), (37, 42), (38, 50), (39, 49), (40, 48), (41, 47),
        (60, 72), (61, 71), (62, 70), (63, 69), (64, 68), (65, 75), (66, 74), (67, 73),
        (55, 59), (56, 58),
        (76, 82), (77, 81), (78, 80), (87, 83), (86, 84),
        (88, 92), (89, 91), (95, 93), (96, 97),
    ]),
    ocular=(60, 72),
    pupil=(96, 97),
    default_norm="ocular",
    failure_threshold=0.1,
    attribute_tags=("largepose", "expression", "illumination", "makeup", "occlusion", "blur"),
)

_300W_CONTOUR_AND_FEATURES = [
    ("contour", False, range(0, 17)),
    ("right_brow", False, range(17, 22)),
    ("left_brow", False, range(22, 27)),
    ("nose_bridge", False, range(27, 31)),
    ("nostrils", False, range(31, 36)),
    ("right_eye", True, range(36, 42)),
    ("left_eye", True, range(42, 48)),
    ("outer_lip", True, range(48, 60)),
    ("inner_lip", True, range(60, 68)),
]

W300 = DatasetSpec(
    name="300w",
    num_points=68,
    edges=_edges(_300W_CONTOUR_AND_FEATURES),
    flip_pairs=(
        (0, 16), (1, 15), (2, 14), (3, 13), (4, 12), (5, 11), (6, 10), (7, 9),
        (17, 26), (18, 25), (19, 24), (20, 23), (21, 22),
        (31, 35), (32, 34),
        (36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46),
        (48, 54), (49, 53), (50, 52), (61, 63), (60, 64), (67, 65), (58, 56), (59, 55),
    ),
    ocular=(36, 45),
    pupil=(tuple(range(36, 42)), tuple(range(42, 48))),
    default_norm="ocular",
    # The official evaluation uses 0.05 for 300W; 0.1 is also reported in the literature.
    failure_threshold=0.05,
    # 300W test: common = LFPW + HELEN test images, challenge = iBUG, full = both.
    path_subsets=(
        ("common", ("lfpw", "helen")),
        ("challenge", ("ibug",)),
        ("full", ("lfpw", "helen", "ibug")),
    ),
)

COFW = DatasetSpec(
    name="cofw",
    num_points=29,
    edges=_edges([
        ("right_brow", True, (0, 4, 2, 5)),
        ("left_brow", True, (1, 6, 3, 7)),
        ("right_eye", True, (8, 12, 10, 13)),
        # Open in the official table (unlike the right eye); kept for fidelity.
        ("left_eye", False, (9, 14, 11, 15)),
        ("nose", True, (18, 20, 19, 21)),
        ("lower_lip", True, (22, 26, 23, 27)),
        ("upper_lip", True, (22, 24, 23, 25)),
    ]),
    flip_pairs=(
        (0, 1), (4, 6), (2, 3), (5, 7), (8, 9), (10, 11), (12, 14), (16, 17), (13, 15),
        (18, 19), (22, 23),
    ),
    ocular=(8, 9),
    pupil=(16, 17),
    default_norm="pupil",
    failure_threshold=0.1,
)

SPECS: dict[str, DatasetSpec] = {s.name: s for s in (WFLW, W300, COFW)}


def get_spec(name: str) -> DatasetSpec:
  """Looks a dataset up by name ('wflw', '300w', 'cofw'; case-insensitive)."""
  key = name.lower()
  if key not in SPECS:
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(SPECS))}")
  return SPECS[key]


def spec_for_num_points(num_points: int) -> DatasetSpec:
  """The dataset whose layout has `num_points` landmarks (used when converting checkpoints)."""
  for spec in SPECS.values():
    if spec.num_points == num_points:
      return spec
  raise ValueError(f"no known dataset has {num_points} landmarks (known: "
                   + ", ".join(f"{s.name}={s.num_points}" for s in SPECS.values()) + ")")
