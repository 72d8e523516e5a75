"""Reading and validating annotation TSVs in the official (ADNet / STAR) format.

One line per face, tab-separated, in this column order:

  1. image path
  2. five points `x,y,...` (10 numbers; pupils, nose tip, mouth corners; not used for cropping)
  3. the dataset's N landmarks `x0,y0,x1,y1,...` (2N numbers, original-image pixels)
  4. scale (face box side / 200)
  5. center_w, 6. center_h (face box centre, pixels)
  7. optional: 6 attribute tags `largepose,expression,illumination,makeup,occlusion,blur` (0/1)

A header line is optional. The first line is a header exactly when no field of its landmark
column is a number; every other line is data, so a first row with one malformed number is an
error naming line 1, never a silently dropped face. (The official loader hands the file to pandas,
which always takes the first line as a header and so loses the first face of a header-less
file.)

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

Errors are `AnnotationError`s (star_jax.errors.DataError) that name the file and the 1-based
line. Besides the format, values are checked: numbers finite; scale positive and its `scale *
200` face box 0.2-20 times the landmarks' extent; the centre within a box size of the landmarks;
tags 0 or 1; with `check_images`, landmarks within one image size of their image (a little
outside, as faces cut by the image border are in WFLW, is one warning line).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Sequence

import numpy as np

from star_jax.datasets import DatasetSpec
from star_jax.errors import DataError

_log = logging.getLogger(__name__)

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


@dataclasses.dataclass(frozen=True)
class DataFiles:
  """Where a dataset's images and TSV files are. TSV image paths are relative to `image_dir`."""

  image_dir: str
  train_tsv: str
  val_tsv: str
  test_tsv: str


@dataclasses.dataclass
class Annotations:
  """The parsed rows of one TSV file (M faces, N landmarks each)."""

  tsv_path: str
  image_paths: list[str]           # absolute paths
  raw_paths: list[str]             # as written (after the official rewrite), for subset rules
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
        raw_paths=[self.raw_paths[i] for i in rows],
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


def _looks_like_header(text: str) -> bool:
  """A first line is a header when no field of its landmark column is a number.

  A row with one malformed number among many is data (its error names line 1), never a header
  that would silently drop a face.
  """
  for field in text.strip().split(","):
    try:
      float(field)
      return False
    except ValueError:
      continue
  return True


# Sanity bounds (README, "Errors and recovery"). The face box of the official crop is
# `scale * 200` pixels; real annotations put it at 0.9-1.3 times the landmarks' extent.
BOX_TO_LANDMARKS = (0.2, 20.0)     # allowed box / landmark-extent ratios: else an error
LANDMARKS_OUTSIDE_IMAGE = 1.0      # error beyond this many image sizes outside; a warning below


def _check_geometry(where: str, landmarks: np.ndarray, scale: float, center: tuple[float, float]
                    ) -> None:
  """Errors for a crop box that cannot belong to the landmarks (absurd scale or centre)."""
  lo, hi = landmarks.min(axis=0), landmarks.max(axis=0)
  extent = float(max(hi - lo))
  box = scale * 200.0
  if extent > 0:
    low, high = BOX_TO_LANDMARKS
    if not low <= box / extent <= high:
      raise AnnotationError(
          f"{where}: scale {scale:g} gives a {box:.4g}-pixel face box for landmarks spanning "
          f"{extent:.4g} pixels (expected {low:g}-{high:g} times as large); is the scale "
          "column right?")
  middle = (lo + hi) / 2
  distance = float(np.max(np.abs(np.asarray(center) - middle)))
  if distance > max(box, extent):
    raise AnnotationError(
        f"{where}: centre ({center[0]:.6g}, {center[1]:.6g}) is {distance:.4g} pixels from the "
        f"landmarks' centre ({middle[0]:.1f}, {middle[1]:.1f}); is the centre column right?")


def _image_size(path: str) -> tuple[int, int] | None:
  """(width, height) from the image header, or None when it cannot be read cheaply."""
  try:
    from PIL import Image
    with Image.open(path) as image:
      return image.size
  except Exception:  # unreadable images are reported by the image check, not here
    return None


def _check_inside_images(path: str, images: list[str], landmarks: list[np.ndarray],
                         line_numbers: list[int]) -> None:
  """Landmarks far outside their image are errors; a little outside (faces cut by the image
  border, as in WFLW) one warning line with the count."""
  outside = []
  for image, lm, line_no in zip(images, landmarks, line_numbers):
    size = _image_size(image)
    if size is None:
      continue
    w, h = size
    over = max(float(-lm[:, 0].min()) / w, float(lm[:, 0].max() - (w - 1)) / w,
               float(-lm[:, 1].min()) / h, float(lm[:, 1].max() - (h - 1)) / h)
    if over > LANDMARKS_OUTSIDE_IMAGE:
      raise AnnotationError(f"{path}:{line_no}: landmarks lie up to {over:.3g} image sizes "
                            f"outside {image} ({w}x{h}); are the coordinates in pixels of "
                            "this image?")
    if over > 0:
      outside.append(line_no)
  if outside:
    _log.warning("%s: %d row(s) have landmarks outside their image (first: line %d); kept, "
                 "as faces cut by the image border are", path, len(outside), outside[0])


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
  try:
    with open(path, "r", encoding="utf-8-sig") as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise AnnotationError(f"{path}: not a text TSV file (byte {e.start} is not UTF-8)") from None
  if "\x00" in text:
    raise AnnotationError(f"{path}:{text[:text.index(chr(0))].count(chr(10)) + 1}: "
                          "NUL byte: not a text TSV file")
  lines = text.splitlines()

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
      if len(columns) >= 3 and _looks_like_header(columns[2]):
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
      if not np.isin(t, (0, 1)).all():
        raise AnnotationError(f"{where}: tag column: attribute tags must be 0 or 1, got "
                              f"{columns[6].strip()!r}")
      has_tags = True
    else:
      t = np.zeros(NUM_TAGS)
    _check_geometry(where, lm.reshape(n, 2), scale, (cw, ch))
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
                          f"(image_dir={image_dir}); first: {missing[0].strip()}\n{listed}")
  if check_images:
    _check_inside_images(path, resolved, landmarks, line_numbers)

  return Annotations(
      tsv_path=os.path.abspath(path),
      image_paths=resolved,
      raw_paths=[rewrite_image_path(p) for p in paths],
      landmarks=np.stack(landmarks).astype(np.float32),
      scale=np.asarray(scales, np.float64),
      center=np.asarray(centers, np.float64),
      tags=np.stack(tags).astype(np.int32),
      five_points=np.stack(fives).astype(np.float32),
      line_numbers=np.asarray(line_numbers, np.int64),
      has_tags=has_tags)
