"""Landmark schemes: point counts, edges, flip pairs, NME normalisation, subsets.

Every other module reads these tables; no point index is written anywhere else. The built-in
schemes are the ones the official STAR configuration (conf/alignment.py) uses for WFLW, 300W
and COFW. A scheme of your own is a JSON file (`load_scheme`, format in the README, "Train on
your own data"); `get_spec` takes a built-in name or the path of such a file, and checkpoints
store the scheme they were trained with (`DatasetSpec.to_dict`), so evaluation and prediction
need nothing else. They also store the data they learnt (`trained_on`: a dataset name, or
`SYNTHETIC_DATASET` for the embedded synthetic faces, which `synthetic_warning` reports).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from star_jax.core import records
from star_jax.errors import DataError, UsageError

# A normalisation end point is one landmark index or several whose mean is used.
NormIndex = int | tuple[int, ...]
# 'diagonal': the diagonal of the ground-truth landmarks' bounding box (schemes without eyes).
NORMS = ("ocular", "pupil", "diagonal")


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
  # NME normalisers: (left, right) end points of the inter-ocular / inter-pupil distance; None
  # when the scheme has no such points.
  ocular: tuple[NormIndex, NormIndex] | None
  pupil: tuple[NormIndex, NormIndex] | None
  # The normaliser the official code uses when norm_type == 'default'.
  default_norm: str
  # FR/AUC threshold the official evaluation uses for this dataset.
  failure_threshold: float
  # Names of the 0/1 attribute tags in the TSV (WFLW only); each defines a subset.
  attribute_tags: tuple[str, ...] = ()
  # 300W: subsets defined by substrings of the image path (common/challenge/full), matched on
  # the path relative to the image folder.
  path_subsets: tuple[tuple[str, tuple[str, ...]], ...] = ()
  # The horizontal mirror is `x -> W + flip_offset - x`: -1 for pixel centres; COFW's official
  # models were trained with 0 (the official Flip chooses it by landmark count, 29 -> 0).
  flip_offset: int = -1
  point_names: tuple[str, ...] = ()

  @property
  def num_edges(self) -> int:
    return len(self.edges)

  def flip_permutation(self) -> np.ndarray:
    """Index array `perm` such that `flipped_landmarks = landmarks[perm]` after mirroring."""
    perm = np.arange(self.num_points)
    for a, b in self.flip_pairs:
      perm[a], perm[b] = b, a
    return perm

  def resolve_norm(self, norm: str = "default") -> str:
    """'default' -> the scheme's own normaliser; checks the scheme defines the one asked for."""
    if norm == "default":
      norm = self.default_norm
    if norm not in NORMS:
      raise UsageError(f"unknown NME normalisation {norm!r}; use 'default', "
                       + ", ".join(repr(n) for n in NORMS))
    if norm != "diagonal" and getattr(self, norm) is None:
      raise UsageError(f"scheme {self.name!r} defines no {norm} points; use "
                       f"{self.default_norm!r} or 'diagonal'")
    return norm

  def norm_indices(self, norm: str = "default") -> tuple[NormIndex, NormIndex] | None:
    """The (left, right) normalisation end points for `norm`; None for 'diagonal'."""
    norm = self.resolve_norm(norm)
    return None if norm == "diagonal" else getattr(self, norm)

  def to_dict(self) -> dict[str, Any]:
    """Plain JSON data that `scheme_from_dict` turns back into this spec."""
    def index(i):
      return list(i) if isinstance(i, tuple) else i
    pair = lambda p: None if p is None else [index(p[0]), index(p[1])]
    return {
        "name": self.name, "num_points": self.num_points,
        "point_names": list(self.point_names),
        "edges": [{"name": e.name, "closed": e.closed, "points": list(e.points)}
                  for e in self.edges],
        "flip_pairs": [list(p) for p in self.flip_pairs],
        "ocular": pair(self.ocular), "pupil": pair(self.pupil),
        "default_norm": self.default_norm, "failure_threshold": self.failure_threshold,
        "attribute_tags": list(self.attribute_tags),
        "path_subsets": {name: list(keys) for name, keys in self.path_subsets},
        "flip_offset": self.flip_offset,
    }


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
    flip_offset=0,
)

SPECS: dict[str, DatasetSpec] = {s.name: s for s in (WFLW, W300, COFW)}

# `trained_on` of a model that learnt only the synthetic faces of `star_jax.data.embedded`.
SYNTHETIC_DATASET = "embedded"


def synthetic_warning(trained_on: str | None, model: str) -> str | None:
  """The one warning line for a model trained only on the synthetic faces, else None."""
  if trained_on != SYNTHETIC_DATASET:
    return None
  return (f"warning: {model} was trained only on the embedded synthetic faces; on real photos, "
          "videos and cameras its landmarks are rough (use --checkpoint wflw, the released "
          "WFLW model, for real faces)")


def _fail(where: str, what: str) -> None:
  raise UsageError(f"{where}: {what}")


def _int(value: Any, where: str, what: str, low: int = 0, high: int | None = None) -> int:
  """An integer in [low, high) (`high` None: no upper bound)."""
  rule = records.Rule("int", low=low, high=None if high is None else high - 1)
  return records.check_value(value, rule, where, what)


def _norm_pair(value: Any, n: int, where: str, what: str) -> tuple[NormIndex, NormIndex] | None:
  if value is None:
    return None
  if not isinstance(value, (list, tuple)) or len(value) != 2:
    _fail(where, f"{what} must be [left, right] (an index or a list of indices each)")
  out = []
  for side in value:
    if isinstance(side, (list, tuple)):
      if not side:
        _fail(where, f"{what}: an empty list of indices")
      out.append(tuple(_int(i, where, f"{what} index", 0, n) for i in side))
    else:
      out.append(_int(side, where, f"{what} index", 0, n))
  return out[0], out[1]


# The fields of a scheme file: `DatasetSpec`'s, with their types and bounds (nested entries,
# indices bounded by num_points, are checked by `scheme_from_dict`).
_SCHEME_RULES = records.rules_from_dataclass(DatasetSpec, {
    "name": records.Rule("str", required=True, low=1),
    "num_points": records.Rule("int", required=True, low=1, high=99_999),
    "edges": records.Rule("list", required=True, nullable=True),
    "flip_pairs": records.Rule("list", default=(), nullable=True),
    "ocular": records.Rule("list", nullable=True),
    "pupil": records.Rule("list", nullable=True),
    "default_norm": records.Rule("str", nullable=True),
    "failure_threshold": records.Rule("float", default=0.1, low=0, high=1, low_open=True),
    "attribute_tags": records.Rule("list", default=(), nullable=True),
    "path_subsets": records.Rule("object", default={}, nullable=True),
    "flip_offset": records.Rule("int", default=-1, low=-1, high=0),
    "point_names": records.Rule("list", default=(), nullable=True),
})


def scheme_from_dict(data: Mapping[str, Any], where: str = "scheme", *,
                     for_training: bool = True) -> DatasetSpec:
  """A `DatasetSpec` from plain data (a scheme file, or `to_dict` output), validated.

  `for_training=False` (schemes stored in checkpoints) also accepts edges of fewer than two
  points, which converted official networks may have but training could not draw.
  """
  if not isinstance(data, Mapping):
    _fail(where, "a scheme must be a JSON object")
  data = records.check_record(data, _SCHEME_RULES, where)
  name = data["name"]
  n = data["num_points"]
  edges = []
  for k, edge in enumerate(data["edges"] or ()):
    if isinstance(edge, Mapping):
      edge_name, closed, points = edge.get("name", f"edge{k}"), edge.get("closed", False), \
          edge.get("points")
    else:
      _fail(where, f"edges[{k}] must be an object {{name, closed, points}}")
    if not isinstance(closed, bool):
      _fail(where, f"edges[{k}].closed must be true or false")
    if not isinstance(points, (list, tuple)) or (for_training and len(points) < 2):
      _fail(where, f"edges[{k}].points must list at least 2 point indices")
    edges.append(Edge(str(edge_name), closed,
                      tuple(_int(p, where, f"edges[{k}] point", 0, n) for p in points)))
  pairs = []
  seen: set[int] = set()
  for k, pair in enumerate(data["flip_pairs"] or ()):
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
      _fail(where, f"flip_pairs[{k}] must be [a, b]")
    a, b = (_int(i, where, f"flip_pairs[{k}] index", 0, n) for i in pair)
    if a == b or a in seen or b in seen:
      _fail(where, f"flip_pairs[{k}] = [{a}, {b}]: each point may appear in one pair only")
    seen |= {a, b}
    pairs.append((a, b))
  ocular = _norm_pair(data["ocular"], n, where, "ocular")
  pupil = _norm_pair(data["pupil"], n, where, "pupil")
  default_norm = data["default_norm"] or ("ocular" if ocular else "diagonal")
  threshold = data["failure_threshold"]
  subsets = data["path_subsets"] or {}
  names = tuple(str(x) for x in data["point_names"] or ())
  if names and len(names) != n:
    _fail(where, f"point_names has {len(names)} names for {n} points")
  spec = DatasetSpec(
      name=name, num_points=n, edges=tuple(edges), flip_pairs=tuple(pairs), ocular=ocular,
      pupil=pupil, default_norm=str(default_norm), failure_threshold=float(threshold),
      attribute_tags=tuple(str(t) for t in data["attribute_tags"] or ()),
      path_subsets=tuple((str(k), tuple(str(v).lower() for v in vs)) for k, vs in subsets.items()),
      flip_offset=data["flip_offset"],
      point_names=names)
  try:
    spec.resolve_norm("default")
  except UsageError as e:
    _fail(where, f"default_norm: {e}")
  return spec


def load_scheme(path: str) -> DatasetSpec:
  """Reads and validates a scheme JSON file (errors name the file)."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except FileNotFoundError:
    raise DataError(f"{path}: scheme file not found") from None
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UsageError(f"{path}: not a JSON scheme file ({e})") from None
  return scheme_from_dict(data, path)


def get_spec(name: str) -> DatasetSpec:
  """A built-in scheme by name ('wflw', '300w', 'cofw'; case-insensitive) or a scheme file."""
  key = str(name).lower()
  if key in SPECS:
    return SPECS[key]
  if key.endswith(".json") or os.path.sep in str(name):
    return load_scheme(str(name))
  raise UsageError(f"unknown dataset {name!r}; use one of {', '.join(sorted(SPECS))} or the "
                   "path of a scheme .json file")


def spec_for_num_points(num_points: int) -> DatasetSpec:
  """The built-in scheme with `num_points` landmarks (for checkpoints that name no scheme)."""
  for spec in SPECS.values():
    if spec.num_points == num_points:
      return spec
  raise UsageError(f"no built-in scheme has {num_points} landmarks (known: "
                   + ", ".join(f"{s.name}={s.num_points}" for s in SPECS.values())
                   + "); the checkpoint must carry its scheme")
