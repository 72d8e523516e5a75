"""Reading and validating annotation TSVs in the official (ADNet / STAR) format.

One line per face, tab-separated, in this column order:

  1. image path
  2. five points `x,y,...` (10 numbers; pupils, nose tip, mouth corners; not used for cropping)
  3. the dataset's N landmarks `x0,y0,x1,y1,...` (2N numbers, original-image pixels)
  4. scale (face box side / 200)
  5. center_w, 6. center_h (face box centre, pixels)
  7. optional: 6 attribute tags `largepose,expression,illumination,makeup,occlusion,blur` (0/1)

A header line is optional. The first line is a header exactly when its landmark column does not
parse as numbers; every other line is data. (The official loader hands the file to pandas, which
always takes the first line as a header and so loses the first face of a header-less file.)

Image paths. Each path is rewritten as the official loader does, then made absolute:

  * Windows separators `\\` become `/`;
  * the ADNet prefixes `//msr-facestore/Workspace/MSRA_EP_Allergan/users/yanghuan/training_data/
    wflw/rawImages/` (WFLW test TSV) and `./rawImages/` (training TSVs) are removed;
  * a path that is absolute and exists is used as is; otherwise it is joined to `image_dir`
    (default: the TSV's folder);
  * if that file does not exist and `check_images` is on, leading folders are stripped one at a
    time (`WFLW/WFLW_images/0--Parade/a.jpg` -> `WFLW_images/0--Parade/a.jpg` ->
    `0--Parade/a.jpg`) until `image_dir/<rest>` exists, so TSVs written for another folder layout
    resolve without editing. Paths that resolve nowhere are reported together in one error.

Errors are `AnnotationError`s that name the file and the 1-based line.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

import numpy as np

from star_jax.datasets import DatasetSpec
from star_jax.errors import DataError

NUM_TAGS = 6
NUM_FIVE_POINT_VALUES = 10
# Prefixes the official loader removes from ADNet metadata paths.
OFFICIAL_PATH_PREFIXES = (
    "//msr-facestore/Workspace/MSRA_EP_Allergan/users/yanghuan/training_data/wflw/rawImages/",
    "./rawImages/",
)
# Shown in full up to this many missing images; the count is always given.
_MAX_LISTED_MISSING = 10000


class AnnotationError(DataError):
  """An annotation file is malformed or refers to images that cannot be found."""


@dataclasses.dataclass
class Annotations:
  """The parsed rows of one TSV file (M faces, N landmarks each)."""

  tsv_path: str
  image_paths: list[str]           # absolute paths
  landmarks: np.ndarray            # (M, N, 2) float32, original-image pixels (x, y)
  scale: np.ndarray                # (M,) float64
  center: np.ndarray               # (M, 2) float64 (center_w, center_h)
  tags: np.ndarray                 # (M, 6) int32; zeros when the TSV has no tag column
  five_points: np.ndarray          # (M, 5, 2) float32
  line_numbers: np.ndarray         # (M,) int64, 1-based line of each row in the TSV
  has_tags: bool = False

  def __len__(self) -> int:
    return len(self.image_paths)

  def subset(self, rows: Sequence[int] | np.ndarray) -> "Annotations":
    """The rows `rows` (indices into this object), in that order."""
    rows = np.asarray(rows, np.int64)
    return Annotations(
        tsv_path=self.tsv_path,
        image_paths=[self.image_paths[i] for i in rows],
        landmarks=self.landmarks[rows], scale=self.scale[rows], center=self.center[rows],
        tags=self.tags[rows], five_points=self.five_points[rows],
        line_numbers=self.line_numbers[rows], has_tags=self.has_tags)


def rewrite_image_path(raw: str) -> str:
  """The official path rewrite: Windows separators to '/', known ADNet prefixes removed."""
  path = raw.strip().replace("\\", "/")
  for prefix in OFFICIAL_PATH_PREFIXES:
    path = path.replace(prefix, "")
  return path


def resolve_image_path(raw: str, image_dir: str, *, probe: bool) -> tuple[str, bool]:
  """(absolute path, found) for a TSV path; see the module docstring for the rule."""
  path = rewrite_image_path(raw)
  if os.path.isabs(path) and (not probe or os.path.isfile(path)):
    return path, True
  joined = os.path.abspath(os.path.join(image_dir, path))
  if not probe or os.path.isfile(joined):
    return joined, True
  parts = [p for p in path.split("/") if p not in ("", ".")]
  for start in range(1, len(parts)):
    candidate = os.path.join(image_dir, *parts[start:])
    if os.path.isfile(candidate):
      return os.path.abspath(candidate), True
  return joined, False


def _parse_numbers(text: str, what: str, where: str, expected: int | None) -> np.ndarray:
  fields = [f for f in text.strip().split(",")]
  if fields and fields[-1] == "":
    fields = fields[:-1]   # a trailing comma is harmless
  if expected is not None and len(fields) != expected:
    raise AnnotationError(f"{where}: {what}: expected {expected} comma-separated numbers, got "
                          f"{len(fields)}")
  values = np.empty(len(fields), np.float64)
  for i, field in enumerate(fields):
    try:
      values[i] = float(field)
    except ValueError:
      raise AnnotationError(f"{where}: {what}: value {i + 1} ({field.strip()!r}) is not a "
                            "number") from None
    if not math.isfinite(values[i]):
      raise AnnotationError(f"{where}: {what}: value {i + 1} ({field.strip()!r}) is not finite")
  return values


def _is_numeric_list(text: str) -> bool:
  try:
    [float(f) for f in text.strip().split(",") if f.strip()]
  except ValueError:
    return False
  return bool(text.strip())


def read_tsv(path: str, spec: DatasetSpec, *, image_dir: str | None = None,
             check_images: bool = True) -> Annotations:
  """Parses and validates an official-format TSV for dataset `spec`.

  Args:
    path: the TSV file.
    spec: the dataset layout (sets the expected landmark count).
    image_dir: folder the image paths are relative to (default: the TSV's folder).
    check_images: verify up front that every image file exists (all missing ones are listed in
      one error) and resolve paths written for another folder layout.

  Raises:
    AnnotationError: naming the file and line of the first malformed row, or listing every
      missing image with its line.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise AnnotationError(f"{path}: annotation file not found")
  if image_dir is None or image_dir == "":
    image_dir = os.path.dirname(os.path.abspath(path))
  with open(path, "r", encoding="utf-8-sig") as f:
    lines = f.read().splitlines()

  n = spec.num_points
  paths, landmarks, scales, centers, tags, fives, line_numbers = [], [], [], [], [], [], []
  has_tags = False
  first_content = True
  for line_no, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    columns = line.rstrip("\r").split("\t")
    # Trailing empty columns come from editors that pad with tabs.
    while len(columns) > 6 and columns[-1].strip() == "":
      columns.pop()
    where = f"{path}:{line_no}"
    if first_content:
      first_content = False
      if len(columns) >= 3 and not _is_numeric_list(columns[2]):
        continue  # header line
    if len(columns) not in (6, 7):
      raise AnnotationError(
          f"{where}: expected 6 or 7 tab-separated columns (image path, 5 points, landmarks, "
          f"scale, center_w, center_h[, tags]), got {len(columns)}")
    image_path = columns[0].strip()
    if not image_path:
      raise AnnotationError(f"{where}: empty image path")
    five = _parse_numbers(columns[1], "5-point column", where, NUM_FIVE_POINT_VALUES)
    lm = _parse_numbers(columns[2], "landmark column", where, None)
    if lm.size != 2 * n:
      raise AnnotationError(
          f"{where}: landmark column: {spec.name} has {n} points ({2 * n} numbers), got "
          f"{lm.size} numbers" + (f" ({lm.size // 2} points)" if lm.size % 2 == 0 else ""))
    scale = _parse_numbers(columns[3], "scale", where, 1)[0]
    if scale <= 0:
      raise AnnotationError(f"{where}: scale must be positive, got {columns[3].strip()!r}")
    cw = _parse_numbers(columns[4], "center_w", where, 1)[0]
    ch = _parse_numbers(columns[5], "center_h", where, 1)[0]
    if len(columns) == 7:
      t = _parse_numbers(columns[6], "tag column", where, NUM_TAGS)
      has_tags = True
    else:
      t = np.zeros(NUM_TAGS)
    paths.append(image_path)
    # The official loader parses landmarks to float32 and scale/center to Python floats.
    landmarks.append(lm.astype(np.float32).reshape(n, 2))
    fives.append(five.astype(np.float32).reshape(5, 2))
    scales.append(scale)
    centers.append((cw, ch))
    tags.append(t.astype(np.int64).astype(np.int32))
    line_numbers.append(line_no)

  if not paths:
    raise AnnotationError(f"{path}: no annotation rows")

  resolved, missing = [], []
  for raw, line_no in zip(paths, line_numbers):
    abs_path, found = resolve_image_path(raw, image_dir, probe=check_images)
    resolved.append(abs_path)
    if not found:
      missing.append(f"  line {line_no}: {raw} (looked for {abs_path})")
  if missing:
    listed = "\n".join(missing[:_MAX_LISTED_MISSING])
    raise AnnotationError(f"{path}: {len(missing)} of {len(paths)} image files not found "
                          f"(image_dir={image_dir}):\n{listed}")

  return Annotations(
      tsv_path=os.path.abspath(path),
      image_paths=resolved,
      landmarks=np.stack(landmarks).astype(np.float32),
      scale=np.asarray(scales, np.float64),
      center=np.asarray(centers, np.float64),
      tags=np.stack(tags).astype(np.int32),
      five_points=np.stack(fives).astype(np.float32),
      line_numbers=np.asarray(line_numbers, np.int64),
      has_tags=has_tags)
