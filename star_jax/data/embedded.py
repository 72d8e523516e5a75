"""The embedded synthetic dataset: drawn faces with 98 WFLW-style landmarks, generated on demand.

star-jax runs out of the box on this dataset (`configs/demo.py`, the tests): no download, no
licence. A deterministic generator (a fixed seed, pure numpy + OpenCV drawing) paints face-like
images (`star_jax.data.synthetic_faces`) whose 98 landmarks follow the WFLW layout and meaning:

  0-32   jaw contour, from the image-left temple through the chin (16) to the image-right temple
  33-50  brows, each a closed loop (33 / 46 outer ends, 37 / 42 inner ends)
  51-54  nose bridge, 54 the tip;  55-59 nostrils
  60-75  eyes (closed loops): 60 / 72 outer corners, 64 / 68 inner corners
  76-95  lips: outer loop 76-87 (76 / 82 mouth corners), inner loop 88-95
  96/97  pupils

Every image draws its own pose, expression, colours, lighting, occlusion and blur; the six WFLW
attribute tags (largepose, expression, illumination, makeup, occlusion, blur) record those
choices.

Files (official TSV format, with a header line):

  <root>/images/{train,val,test}/NNNNN.jpg   JPEG quality 90, 256..320 pixels a side
  <root>/{train,val,test}.tsv                image path (relative to <root>/images), 5 points
                                             (96, 97, 54, 76, 82), 196 landmark numbers, scale,
                                             center_w, center_h, 6 tags
  <root>/STAMP.json                          generator version, seed, counts, TSV hashes

`scale = max(bbox_w, bbox_h) / 200 * 1.05` and `center = bbox centre` of the 98 landmarks as
written (3 decimals): the crop rule of `original_formats.crop_params`.

The root is `cache_dir`, else `$STAR_JAX_CACHE/embedded`, else `~/.cache/star_jax/embedded`.
The data is generated once and reused while STAMP.json matches the generator version, seed and
counts; a stale or partial folder is regenerated. Output is byte-identical across runs with the
same numpy / OpenCV versions (each image draws from its own `numpy.random.Generator` seeded by
(seed, split, index)).

CLI: `python -m star_jax.data.embedded --out DIR [--preview grid.png]`.
"""

from __future__ import annotations

import logging
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from typing import Sequence

import cv2
import numpy as np

from star_jax.data import synthetic_faces
from star_jax.data.annotations import DataFiles
from star_jax.foreign.original_formats import format_row
from star_jax.core.schemes import WFLW

_log = logging.getLogger(__name__)

# Bump whenever the drawing, the layout or the file format changes: cached copies regenerate.
GENERATOR_VERSION = "1"
DEFAULT_SEED = 20230601
DEFAULT_COUNTS = (800, 100, 100)  # train, val, test
SPLITS = ("train", "val", "test")
JPEG_QUALITY = 90
TSV_HEADER = ("image_path", "landmarks_5pts", "landmarks_98", "scale", "center_w", "center_h",
              "tags")
# The five points of the official TSV's second column: pupils, nose tip, mouth corners.
FIVE_POINTS = (96, 97, 54, 76, 82)
TAG_NAMES = WFLW.attribute_tags

# ----------------------------------------------------------------------------------------------
# Files


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
  return np.random.Generator(np.random.PCG64([seed, SPLITS.index(split), index]))


def _write_split(root: str, split: str, count: int, seed: int) -> str:
  os.makedirs(os.path.join(root, "images", split), exist_ok=True)
  lines = ["\t".join(TSV_HEADER)]
  for index in range(count):
    sample = synthetic_faces.generate_sample(_image_rng(seed, split, index))
    rel = f"{split}/{index:05d}.jpg"
    bgr = np.ascontiguousarray(sample.image[..., ::-1])
    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
      raise RuntimeError(f"JPEG encoding failed for {rel}")
    with open(os.path.join(root, "images", rel), "wb") as f:
      f.write(data.tobytes())
    lines.append(format_row(rel, sample.landmarks, sample.tags, five_points=FIVE_POINTS))
  tsv = os.path.join(root, f"{split}.tsv")
  with open(tsv, "w", newline="\n") as f:
    f.write("\n".join(lines) + "\n")
  return tsv


def _stamp(seed: int, counts: Sequence[int]) -> dict:
  return {"generator_version": GENERATOR_VERSION, "seed": int(seed),
          "counts": dict(zip(SPLITS, (int(c) for c in counts))),
          "numpy": np.__version__, "opencv": cv2.__version__}


def _read_stamp(root: str) -> dict | None:
  try:
    with open(os.path.join(root, "STAMP.json")) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _stamp_matches(found: dict | None, wanted: dict) -> bool:
  # Library versions are recorded for reference only: a cache made under other numpy / OpenCV
  # versions is still a valid dataset.
  keys = ("generator_version", "seed", "counts")
  return found is not None and all(found.get(k) == wanted[k] for k in keys)


def _files(root: str) -> DataFiles:
  return DataFiles(image_dir=os.path.join(root, "images"),
                   train_tsv=os.path.join(root, "train.tsv"),
                   val_tsv=os.path.join(root, "val.tsv"),
                   test_tsv=os.path.join(root, "test.tsv"))


def cache_root() -> str:
  """star-jax's cache folder: `$STAR_JAX_CACHE`, else `~/.cache/star_jax` (also holds the
  released models, `star_jax.deploy.released`)."""
  return os.environ.get("STAR_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "star_jax")


def default_cache_dir() -> str:
  return os.path.join(cache_root(), "embedded")


def generate(root: str, *, counts: Sequence[int] = DEFAULT_COUNTS, seed: int = DEFAULT_SEED,
             verbose: bool = False) -> DataFiles:
  """Writes the dataset into `root` (created; existing files of the same names are replaced)."""
  if len(counts) != 3 or any(int(c) < 0 for c in counts):
    raise ValueError(f"counts must be three non-negative numbers (train, val, test), got {counts}")
  start = time.perf_counter()
  hashes = {}
  for split, count in zip(SPLITS, counts):
    tsv = _write_split(root, split, int(count), seed)
    with open(tsv, "rb") as f:
      hashes[split] = hashlib.sha256(f.read()).hexdigest()
    if verbose:
      _log.info(f"{split}: {count} images ({time.perf_counter() - start:.1f} s)")
  stamp = dict(_stamp(seed, counts), tsv_sha256=hashes)
  with open(os.path.join(root, "STAMP.json"), "w") as f:
    json.dump(stamp, f, indent=1, sort_keys=True)
  return _files(root)


def ensure_embedded_dataset(cache_dir: str | None = None, *,
                            counts: Sequence[int] = DEFAULT_COUNTS,
                            seed: int = DEFAULT_SEED) -> DataFiles:
  """The embedded dataset's files, generating them first if the cache is missing or stale.

  Args:
    cache_dir: folder holding the dataset; None or '' uses `$STAR_JAX_CACHE/embedded` or
      `~/.cache/star_jax/embedded`.
    counts: number of (train, val, test) images; tests pass small counts.
    seed: generator seed.

  Safe to call from several processes at once: each generates into a private folder and the
  first to finish moves it into place.
  """
  root = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
  wanted = _stamp(seed, counts)
  if _stamp_matches(_read_stamp(root), wanted):
    return _files(root)
  parent = os.path.dirname(root)
  os.makedirs(parent, exist_ok=True)
  work = tempfile.mkdtemp(prefix=os.path.basename(root) + ".partial-", dir=parent)
  try:
    generate(work, counts=counts, seed=seed)
    if _stamp_matches(_read_stamp(root), wanted):  # another process finished first
      return _files(root)
    if os.path.exists(root):
      stale = tempfile.mkdtemp(prefix=os.path.basename(root) + ".stale-", dir=parent)
      try:
        os.replace(root, os.path.join(stale, "old"))
      except OSError:
        pass
      shutil.rmtree(stale, ignore_errors=True)
    try:
      os.replace(work, root)
    except OSError:
      # Lost a race: someone else's complete copy is in place now.
      if not _stamp_matches(_read_stamp(root), wanted):
        raise
  finally:
    if os.path.exists(work):
      shutil.rmtree(work, ignore_errors=True)
  return _files(root)


# ----------------------------------------------------------------------------------------------
# Preview


_EDGE_COLORS = [(255, 80, 80), (80, 255, 80), (80, 160, 255), (255, 230, 60), (255, 120, 255),
                (60, 255, 255), (255, 160, 60), (200, 120, 255), (255, 255, 255)]


def draw_annotations(image_rgb: np.ndarray, landmarks: np.ndarray,
                     label_points: Sequence[int] = (0, 16, 32, 33, 46, 54, 60, 64, 68, 72, 76,
                                                    82, 96, 97)) -> np.ndarray:
  """Draws each WFLW edge in its own colour, the pupils as circles and a few point numbers."""
  out = image_rgb.copy()
  for color, edge in zip(_EDGE_COLORS, WFLW.edges):
    synthetic_faces.polyline(out, landmarks[list(edge.points)], edge.closed, color, 1)
  for i, (x, y) in enumerate(landmarks):
    cv2.circle(out, (int(round(x)), int(round(y))), 2 if i >= 96 else 1, (255, 0, 0), -1)
  for i in label_points:
    x, y = landmarks[i]
    cv2.putText(out, str(i), (int(x) + 2, int(y) - 2), cv2.FONT_HERSHEY_PLAIN, 0.7,
                (255, 255, 0), 1, cv2.LINE_AA)
  return out


def _read_rows(tsv: str) -> list[list[str]]:
  with open(tsv) as f:
    rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
  return rows[1:] if rows and rows[0][0] == TSV_HEADER[0] else rows


def write_preview(files: DataFiles, path: str, *, split: str = "train", count: int = 16,
                  tile: int = 256) -> None:
  """Writes a grid of annotated samples of `split` (PNG or JPEG, by extension)."""
  rows = _read_rows(getattr(files, f"{split}_tsv"))[:count]
  if not rows:
    raise ValueError(f"no samples in {getattr(files, f'{split}_tsv')}")
  cols = int(math.ceil(math.sqrt(len(rows))))
  grid = np.zeros((tile * int(math.ceil(len(rows) / cols)), tile * cols, 3), np.uint8)
  for k, row in enumerate(rows):
    bgr = cv2.imread(os.path.join(files.image_dir, row[0]), cv2.IMREAD_COLOR)
    lm = np.array(row[2].split(","), np.float64).reshape(-1, 2)
    drawn = draw_annotations(bgr[..., ::-1], lm)
    tags = row[6].split(",") if len(row) > 6 else []
    f = tile / max(drawn.shape[:2])
    drawn = cv2.resize(drawn, (int(drawn.shape[1] * f), int(drawn.shape[0] * f)),
                       interpolation=cv2.INTER_AREA)
    label = " ".join(n[:4] for n, t in zip(TAG_NAMES, tags) if t == "1")
    cv2.putText(drawn, label, (3, tile - 5), cv2.FONT_HERSHEY_PLAIN, 0.8, (255, 255, 255), 1,
                cv2.LINE_AA)
    r, c = divmod(k, cols)
    grid[r * tile:r * tile + drawn.shape[0], c * tile:c * tile + drawn.shape[1]] = drawn
  cv2.imwrite(path, grid[..., ::-1])


if __name__ == "__main__":
  # `python -m star_jax.data.embedded`: the command is star_jax.commands.embedded.
  from star_jax.commands import embedded as _command
  raise SystemExit(_command.main())
