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

At scale. The file is streamed (a progress bar on stderr for large files): rows go straight into
arrays allocated once for the file's line count, the long number columns are parsed a block of
rows at a time, each distinct image path is resolved and its header read once, and the checks
run on whole arrays. Memory stays near the size of the parsed arrays (figures:
benchmarks/RESULTS.md, `benchmarks/large_tsv.py`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import os
import sys
import warnings
from typing import Iterator, Sequence

import numpy as np

from star_jax.core.schemes import DatasetSpec
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


  @staticmethod
  def distinct_paths(paths: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(each distinct path once, in order of first use; (M,) int32 position of each row's)."""
    number: dict[str, int] = {}
    index = np.fromiter((number.setdefault(p, len(number)) for p in paths), np.int32,
                        len(paths))
    return list(number), index


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
# A progress bar for files of at least this size (or when stderr is a terminal).
PROGRESS_MIN_BYTES = 64 * 2 ** 20
_CHECK_CHUNK = 1 << 14             # rows per vectorised check (bounds the temporary arrays)
_HEADER_THREADS = 8                # image headers read at once (the reads wait on the disk)


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


def _landmark_boxes(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(lo, hi) (M, 2) float64: each row's landmark bounding box, computed in chunks."""
  lo = np.empty((len(landmarks), 2), np.float64)
  hi = np.empty((len(landmarks), 2), np.float64)
  for start in range(0, len(landmarks), _CHECK_CHUNK):
    chunk = landmarks[start:start + _CHECK_CHUNK]
    lo[start:start + len(chunk)] = chunk.min(axis=1)
    hi[start:start + len(chunk)] = chunk.max(axis=1)
  return lo, hi


def _check_all_geometry(path: str, ann: "Annotations", lo: np.ndarray, hi: np.ndarray) -> None:
  """`_check_geometry` for every row at once; the first implausible row is the error."""
  extent = (hi - lo).max(axis=1)
  box = ann.scale * 200.0
  with np.errstate(divide="ignore", invalid="ignore"):
    ratio = box / extent
  low, high = BOX_TO_LANDMARKS
  bad = (extent > 0) & ~((ratio >= low) & (ratio <= high))
  bad |= np.abs(ann.center - (lo + hi) / 2).max(axis=1) > np.maximum(box, extent)
  if bad.any():
    k = int(np.argmax(bad))
    _check_geometry(f"{path}:{ann.line_numbers[k]}", ann.landmarks[k].astype(np.float64),
                    float(ann.scale[k]), tuple(ann.center[k]))


def _image_size(path: str) -> tuple[int, int] | None:
  """(width, height) from the image header, or None when it cannot be read cheaply."""
  try:
    from PIL import Image
    with Image.open(path) as image:
      return image.size
  except Exception:  # unreadable images are reported by the image check, not here
    return None


def _check_inside_images(path: str, ann: "Annotations", distinct: list[str],
                         path_index: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
  """Landmarks far outside their image are errors; a little outside (faces cut by the image
  border, as in WFLW) one warning line with the count. Each distinct image's header is read
  once."""
  with concurrent.futures.ThreadPoolExecutor(_HEADER_THREADS) as pool:
    sizes = np.array([size or (np.nan, np.nan) for size in pool.map(_image_size, distinct)],
                     np.float64).reshape(-1, 2)
  wh = sizes[path_index]
  with np.errstate(invalid="ignore"):
    over = np.max([-lo[:, 0] / wh[:, 0], (hi[:, 0] - (wh[:, 0] - 1)) / wh[:, 0],
                   -lo[:, 1] / wh[:, 1], (hi[:, 1] - (wh[:, 1] - 1)) / wh[:, 1]], axis=0)
  over = np.nan_to_num(over, nan=-np.inf)  # an unreadable image: its own check reports it
  if (over > LANDMARKS_OUTSIDE_IMAGE).any():
    k = int(np.argmax(over > LANDMARKS_OUTSIDE_IMAGE))
    w, h = (int(v) for v in wh[k])
    raise AnnotationError(f"{path}:{ann.line_numbers[k]}: landmarks lie up to {over[k]:.3g} "
                          f"image sizes outside {ann.image_paths[k]} ({w}x{h}); are the "
                          "coordinates in pixels of this image?")
  outside = np.flatnonzero(over > 0)
  if outside.size:
    _log.warning("%s: %d row(s) have landmarks outside their image (first: line %d); kept, "
                 "as faces cut by the image border are", path, outside.size,
                 ann.line_numbers[outside[0]])


def _progress_bar(path: str, size: int, progress: bool | None):
  """A tqdm bar over the file's bytes on stderr, or None. `progress=None`: only for a file of
  at least PROGRESS_MIN_BYTES or when stderr is a terminal, and even then only once reading has
  taken a second (a small file never draws one)."""
  if progress is None:
    progress = size >= PROGRESS_MIN_BYTES or sys.stderr.isatty()
  if not progress:
    return None
  from tqdm import tqdm
  return tqdm(total=size, desc=f"reading {os.path.basename(path)}", unit="B", unit_scale=True,
              file=sys.stderr, mininterval=1.0, delay=1.0)


def _text_lines(path: str, progress: bool | None) -> Iterator[tuple[int, str]]:
  """(1-based line number, text without its line break) of each non-blank line, streamed."""
  size = os.path.getsize(path)
  bar = _progress_bar(path, size, progress)
  done = 0
  try:
    with open(path, "rb") as f:
      for line_no, raw in enumerate(f, start=1):
        done += len(raw)
        if bar is not None and line_no % 4096 == 0:
          bar.update(done - bar.n)
        if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
          raw = raw[3:]
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          raise AnnotationError(f"{path}: not a text TSV file (line {line_no}, byte "
                                f"{done - len(raw) + e.start} is not UTF-8)") from None
        if "\x00" in line:
          raise AnnotationError(f"{path}: not a text TSV file (line {line_no} has a NUL byte)")
        line = line.rstrip("\r\n")
        if line.strip():
          yield line_no, line
  finally:
    if bar is not None:
      bar.update(done - bar.n)
      bar.close()


def _number(text: str, what: str, where: str) -> float:
  try:
    value = float(text)
    if math.isfinite(value):
      return value
  except ValueError:
    pass
  return float(_parse_numbers(text, what, where, 1)[0])  # raises, naming the value


def _tags(text: str, where: str) -> list[int]:
  fields = text.strip().split(",")
  if len(fields) == NUM_TAGS and _TAG_TEXTS.issuperset(fields):
    return [int(f) for f in fields]
  tags = _parse_numbers(text, "tag column", where, NUM_TAGS)
  if not np.isin(tags, (0, 1)).all():
    raise AnnotationError(f"{where}: tag column: attribute tags must be 0 or 1, got "
                          f"{text.strip()!r}")
  return [int(t) for t in tags]


_TAG_TEXTS = frozenset(("0", "1"))


def _number_block(texts: list[str], width: int) -> np.ndarray | None:
  """The comma-separated numbers of many rows of one column, parsed in one call: (rows, width)
  float64, or None when any row is malformed or not finite (the caller then finds which)."""
  texts = [t[:-1] if t.endswith(",") else t for t in texts]  # a trailing comma is harmless
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      values = np.loadtxt(texts, delimiter=",", dtype=np.float64, ndmin=2, comments=None)
  except ValueError:
    return None
  if values.shape != (len(texts), width) or not np.isfinite(values).all():
    return None
  return values


class _Rows:
  """The parsed rows, in arrays allocated once for the file's line count (pages that are
  never written cost no memory), and each distinct image path stored once. The two long
  number columns are parsed a block of rows at a time."""

  BLOCK = 4096

  def __init__(self, capacity: int, spec: DatasetSpec):
    self.spec = spec
    self.count = 0
    self.landmarks = np.empty((capacity, 2 * spec.num_points), np.float32)
    self.five_points = np.empty((capacity, NUM_FIVE_POINT_VALUES), np.float32)
    self.scale = np.empty(capacity, np.float64)
    self.center = np.empty((capacity, 2), np.float64)
    self.tags = np.zeros((capacity, NUM_TAGS), np.int32)
    self.line_numbers = np.empty(capacity, np.int64)
    self.path_index = np.empty(capacity, np.int32)
    self.paths: dict[str, int] = {}   # image path as written -> its number
    self.has_tags = False
    self._pending: list[tuple[str, str, str]] = []   # (where, 5 points, landmarks) of a block

  def add(self, where: str, line_no: int, columns: list[str]) -> None:
    k = self.count
    image_path = columns[0].strip()
    if not image_path:
      raise AnnotationError(f"{where}: empty image path")
    scale = _number(columns[3], "scale", where)
    if scale <= 0:
      raise AnnotationError(f"{where}: scale must be positive, got {columns[3].strip()!r}")
    self.scale[k] = scale
    self.center[k] = (_number(columns[4], "center_w", where),
                      _number(columns[5], "center_h", where))
    if len(columns) == 7:
      self.tags[k] = _tags(columns[6], where)
      self.has_tags = True
    self.line_numbers[k] = line_no
    self.path_index[k] = self.paths.setdefault(image_path, len(self.paths))
    self._pending.append((where, columns[1], columns[2]))
    self.count += 1
    if len(self._pending) == self.BLOCK:
      self.flush()

  def flush(self) -> None:
    """Parses the pending rows' 5-point and landmark columns into the arrays."""
    if not self._pending:
      return
    start = self.count - len(self._pending)
    n = self.spec.num_points
    five = _number_block([p[1] for p in self._pending], NUM_FIVE_POINT_VALUES)
    landmarks = _number_block([p[2] for p in self._pending], 2 * n)
    if five is None or landmarks is None:
      for where, five_text, landmark_text in self._pending:  # finds the row and says why
        _parse_numbers(five_text, "5-point column", where, NUM_FIVE_POINT_VALUES)
        values = _parse_numbers(landmark_text, "landmark column", where, None)
        if values.size != 2 * n:
          raise AnnotationError(
              f"{where}: landmark column: {self.spec.name} has {n} points ({2 * n} numbers), "
              f"got {values.size} numbers"
              + (f" ({values.size // 2} points)" if values.size % 2 == 0 else ""))
      raise AssertionError("a block of rows failed to parse but every row parses")
    self.five_points[start:self.count] = five
    self.landmarks[start:self.count] = landmarks
    self._pending = []


def _split_columns(line: str) -> list[str]:
  columns = line.split("\t")
  # Trailing empty columns come from editors that pad with tabs.
  while len(columns) > 6 and not columns[-1].strip():
    columns.pop()
  return columns


def _parse_rows(path: str, spec: DatasetSpec, progress: bool | None) -> _Rows:
  with open(path, "rb") as f:
    capacity = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 24), b"")) + 1
  rows = _Rows(capacity, spec)
  first = True
  for line_no, line in _text_lines(path, progress):
    columns = _split_columns(line)
    if first:
      first = False
      if len(columns) >= 3 and _looks_like_header(columns[2]):
        continue
    where = f"{path}:{line_no}"
    if len(columns) not in (6, 7):
      raise AnnotationError(
          f"{where}: expected 6 or 7 tab-separated columns (image path, 5 points, landmarks, "
          f"scale, center_w, center_h[, tags]), got {len(columns)}")
    rows.add(where, line_no, columns)
  rows.flush()
  if not rows.count:
    raise AnnotationError(f"{path}: no annotation rows")
  return rows


def read_tsv(path: str, spec: DatasetSpec, *, image_dir: str | None = None,
             check_images: bool = True, progress: bool | None = None) -> Annotations:
  """Parses and validates an official-format TSV for dataset `spec`, streaming the file.

  Args:
    path: the TSV file.
    spec: the dataset layout (sets the expected landmark count).
    image_dir: folder the image paths are relative to (default: the TSV's folder).
    check_images: verify up front that every image file exists (all missing ones are listed in
      one error), resolve paths written for another folder layout, and check the landmarks
      against each image's size (one header read per distinct image).
    progress: a progress bar on stderr; None: for large files or a terminal only.

  Raises:
    AnnotationError: naming the file and line of the first malformed row (then of the first
      implausible one), or listing every missing image with its line.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise AnnotationError(f"{path}: annotation file not found")
  if image_dir is None or image_dir == "":
    image_dir = os.path.dirname(os.path.abspath(path))
  rows = _parse_rows(path, spec, progress)
  m, n = rows.count, spec.num_points
  written = list(rows.paths)   # in order of their number
  found = [resolve_image_path(raw, image_dir, probe=check_images) for raw in written]
  path_index = rows.path_index[:m]
  resolved = [p for p, _ in found]
  rewritten = [rewrite_image_path(raw) for raw in written]
  ann = Annotations(
      tsv_path=os.path.abspath(path),
      image_paths=[resolved[i] for i in path_index],
      raw_paths=[rewritten[i] for i in path_index],
      landmarks=rows.landmarks[:m].reshape(m, n, 2),
      scale=rows.scale[:m], center=rows.center[:m], tags=rows.tags[:m],
      five_points=rows.five_points[:m].reshape(m, 5, 2), line_numbers=rows.line_numbers[:m],
      has_tags=rows.has_tags)
  lo, hi = _landmark_boxes(ann.landmarks)
  _check_all_geometry(path, ann, lo, hi)
  missing_image = np.array([not ok for _, ok in found])[path_index]
  if missing_image.any():
    missing = [f"  line {ann.line_numbers[k]}: {written[path_index[k]]} (looked for "
               f"{resolved[path_index[k]]})" for k in np.flatnonzero(missing_image)]
    listed = "\n".join(missing[:_MAX_LISTED_MISSING])
    raise AnnotationError(f"{path}: {len(missing)} of {m} image files not found "
                          f"(image_dir={image_dir}); first: {missing[0].strip()}\n{listed}")
  if check_images:
    _check_inside_images(path, ann, resolved, path_index, lo, hi)
  return ann
