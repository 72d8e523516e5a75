"""Converters from the original WFLW, 300W and COFW annotation files to the official TSV format.

The ADNet metadata TSVs that the official STAR code reads are no longer downloadable; these
converters rebuild equivalent files from what the dataset authors distribute.

TSV rows (tab-separated, a header line first so that no reader - pandas included - loses a
sample): image path (relative to the image folder, '/' separators), 5 points `x,y,...`, all
landmarks `x0,y0,x1,y1,...` (3 decimals), scale (6 decimals), center_w, center_h (4 decimals),
and for WFLW the 6 attribute tags `largepose,expression,illumination,makeup,occlusion,blur`.

Crop parameters (the ADNet rule, `CROP_RULES`): from the min/max box of the landmarks,
  center_w, center_h = the box centre, (x_min + x_max) / 2, (y_min + y_max) / 2
  scale = max(box_w, box_h) / 200 * 1.05       (rule 'max', the default)
The official crop maps a square of `scale * 200` pixels around the centre onto the 256x256
input. The default reproduces how star-jax's embedded dataset and the shared official fixtures
were annotated. Two alternatives are selectable (`crop_rule=`, CLI `--crop-rule`):
  'min'     min(box_w, box_h) / 200 * 1.05: what STAR's demo.py computes from detected landmarks
            and what its authors give for boxes of a face detector;
  'height'  box_h / 200: the closest known fit to the released ADNet metadata (its values are
            not a closed formula of the landmarks: they follow the landmark-box height to a few
            per cent on WFLW and COFW).
WFLW also carries a detector rectangle per face; `box='rect'` takes the crop from that
rectangle instead of the landmark box.

Coordinates are 0-based pixel centres (OpenCV's convention, used by the whole pipeline):
  * WFLW lists are already 0-based and are copied as they are.
  * 300W `.pts` and COFW `.mat` coordinates are 1-based (MATLAB); 1 is subtracted unless
    `one_based=True` (CLI `--keep-one-based`) asks to keep the raw numbers.

Inputs:
  * WFLW: `list_98pt_rect_attr_{train,test}.txt` (WFLW_annotations/list_98pt_rect_attr_train_test):
    one face per line, space-separated: 196 numbers (98 x,y), the rectangle x_min y_min x_max
    y_max, 6 attributes (pose expression illumination make-up occlusion blur), the image path
    relative to WFLW_images. Output paths stay relative to WFLW_images.
  * 300W: the folder holding afw/, helen/{trainset,testset}/, ibug/, lfpw/{trainset,testset}/,
    each image next to its `.pts` file. train = lfpw/trainset + helen/trainset + afw (3148
    faces); test = common (lfpw/testset + helen/testset, 554) + challenge (ibug, 135) = full
    (689). Writes train.tsv, test.tsv (full), test_common.tsv, test_challenge.tsv; paths relative
    to that folder (so the 300W spec's path rule finds the subsets).
  * COFW: `COFW_train_color.mat` (`IsTr` images, `phisTr`) and `COFW_test_color.mat` (`IsT`,
    `phisT`), `phis` rows = 29 x, 29 y, 29 occlusion flags. Read with scipy.io.loadmat, or with
    h5py when the file is MATLAB v7.3 (HDF5; h5py comes with tensorflow). The images are written
    as PNG files `{train,test}/NNNNN.png` (lossless, in file order) and the per-point occlusion
    flags to `{split}_occlusion.tsv` (one row of 29 0/1 flags per image, in TSV order).

CLI:
  python -m star_jax.data.original_formats wflw ANNOTATION_DIR --out OUT
  python -m star_jax.data.original_formats 300w 300W_DIR --out OUT
  python -m star_jax.data.original_formats cofw COFW_DIR --out OUT   (images go to OUT/images)
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import sys
from typing import Iterable, Sequence

import cv2
import numpy as np

from star_jax.datasets import get_spec
from star_jax.errors import DataError

CROP_RULES = ("max", "min", "height")

# The 5-point column: left pupil, right pupil, nose tip, left / right mouth corner. Each entry is
# a landmark index or a group whose mean is used. The official loader reads but never uses it.
FIVE_POINTS = {
    "wflw": (96, 97, 54, 76, 82),
    "300w": (tuple(range(36, 42)), tuple(range(42, 48)), 30, 48, 54),
    "cofw": (16, 17, 20, 22, 23),
}
TAG_HEADER = "tags"


class FormatError(DataError):
  """An original annotation file that does not have the expected format."""


@dataclasses.dataclass
class Record:
  """One face: image path (relative), landmarks (N, 2) 0-based pixels, optional tags and box."""

  image_path: str
  landmarks: np.ndarray
  tags: np.ndarray | None = None
  rect: np.ndarray | None = None   # (x_min, y_min, x_max, y_max), WFLW only


# ----------------------------------------------------------------------------------------------
# Crop parameters and TSV rows


def crop_params(landmarks: np.ndarray | None, rule: str = "max",
                rect: Sequence[float] | None = None) -> tuple[float, float, float]:
  """(scale, center_w, center_h) by the ADNet rule; see the module docstring for `rule`."""
  if rule not in CROP_RULES:
    raise ValueError(f"crop_rule must be one of {CROP_RULES}, got {rule!r}")
  if rect is not None:
    x0, y0, x1, y1 = (float(v) for v in rect)
  else:
    pts = np.asarray(landmarks, np.float64)
    (x0, y0), (x1, y1) = pts.min(axis=0), pts.max(axis=0)
  w, h = x1 - x0, y1 - y0
  if rule == "max":
    scale = max(w, h) / 200.0 * 1.05
  elif rule == "min":
    scale = min(w, h) / 200.0 * 1.05
  else:
    scale = h / 200.0
  return float(scale), float(x0 + x1) / 2.0, float(y0 + y1) / 2.0


def _five_points(landmarks: np.ndarray, five: Sequence) -> np.ndarray:
  return np.stack([landmarks[list(p)].mean(axis=0) if isinstance(p, tuple) else landmarks[p]
                   for p in five])


def format_row(image_path: str, landmarks: np.ndarray, tags: Iterable[int] | None = None, *,
               five_points: Sequence = FIVE_POINTS["wflw"], crop_rule: str = "max",
               rect: Sequence[float] | None = None) -> str:
  """One official TSV row. Landmarks are rounded to the 3 written decimals first, so the crop
  box is exactly that of the numbers in the file."""
  lm = np.round(np.asarray(landmarks, np.float64), 3)
  scale, cw, ch = crop_params(lm, crop_rule, rect)
  five = _five_points(lm, five_points)
  cols = [image_path.replace("\\", "/"),
          ",".join(f"{v:.3f}" for v in five.reshape(-1)),
          ",".join(f"{v:.3f}" for v in lm.reshape(-1)),
          f"{scale:.6f}", f"{cw:.4f}", f"{ch:.4f}"]
  if tags is not None:
    cols.append(",".join(str(int(t)) for t in tags))
  return "\t".join(cols)


def header(num_points: int, with_tags: bool) -> str:
  cols = ["image_path", "landmarks_5pts", f"landmarks_{num_points}", "scale", "center_w",
          "center_h"]
  return "\t".join(cols + ([TAG_HEADER] if with_tags else []))


def write_tsv(path: str, records: Sequence[Record], dataset: str, *, crop_rule: str = "max",
              box: str = "landmarks") -> str:
  """Writes `records` as an official TSV with a header line; returns `path`."""
  spec = get_spec(dataset)
  if box not in ("landmarks", "rect"):
    raise ValueError(f"box must be 'landmarks' or 'rect', got {box!r}")
  with_tags = any(r.tags is not None for r in records)
  lines = [header(spec.num_points, with_tags)]
  for r in records:
    if r.landmarks.shape != (spec.num_points, 2):
      raise FormatError(f"{r.image_path}: {r.landmarks.shape[0]} landmarks, {dataset} has "
                        f"{spec.num_points}")
    if box == "rect" and r.rect is None:
      raise ValueError(f"box='rect' needs a detector rectangle; {r.image_path} has none")
    lines.append(format_row(r.image_path, r.landmarks,
                            r.tags if with_tags else None,
                            five_points=FIVE_POINTS[spec.name], crop_rule=crop_rule,
                            rect=r.rect if box == "rect" else None))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", newline="\n") as f:
    f.write("\n".join(lines) + "\n")
  return path


# ----------------------------------------------------------------------------------------------
# WFLW


def read_wflw_list(path: str) -> list[Record]:
  """Parses a WFLW `list_98pt_rect_attr_*.txt` file (see the module docstring)."""
  records = []
  with open(path) as f:
    for line_number, line in enumerate(f, 1):
      fields = line.split()
      if not fields:
        continue
      if len(fields) != 196 + 4 + 6 + 1:
        raise FormatError(f"{path}:{line_number}: expected 207 space-separated fields (196 "
                          f"coordinates, 4 box, 6 attributes, image path), got {len(fields)}")
      try:
        numbers = np.array(fields[:206], np.float64)
      except ValueError as e:
        raise FormatError(f"{path}:{line_number}: non-numeric value ({e})") from None
      if not np.isfinite(numbers).all():
        raise FormatError(f"{path}:{line_number}: non-finite value")
      attributes = numbers[200:206]
      if not np.isin(attributes, (0, 1)).all():
        raise FormatError(f"{path}:{line_number}: attributes must be 0 or 1, got "
                          f"{attributes.tolist()}")
      records.append(Record(image_path=fields[206].replace("\\", "/"),
                            landmarks=numbers[:196].reshape(98, 2),
                            tags=attributes.astype(np.int32),
                            rect=numbers[196:200]))
  return records


def convert_wflw(annotation_file: str, out_tsv: str, *, crop_rule: str = "max",
                 box: str = "landmarks") -> int:
  """Converts one WFLW list file to a TSV; returns the number of faces."""
  records = read_wflw_list(annotation_file)
  write_tsv(out_tsv, records, "wflw", crop_rule=crop_rule, box=box)
  return len(records)


# ----------------------------------------------------------------------------------------------
# 300W

W300_TRAIN = ("lfpw/trainset", "helen/trainset", "afw")
W300_TEST = {"common": ("lfpw/testset", "helen/testset"), "challenge": ("ibug",)}
_IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg", ".bmp", ".ppm")


def read_pts(path: str, *, one_based: bool = False) -> np.ndarray:
  """Reads a 300W `.pts` file: (n_points, 2) float64, 0-based unless `one_based`."""
  with open(path) as f:
    lines = [line.strip() for line in f]
  try:
    start = lines.index("{")
    end = lines.index("}", start)
  except ValueError:
    raise FormatError(f"{path}: no '{{' ... '}}' block of points") from None
  declared = None
  for line in lines[:start]:
    if line.lower().startswith("n_points"):
      declared = int(line.split(":")[1])
  try:
    pts = np.array([[float(v) for v in line.split()] for line in lines[start + 1:end]
                    if line], np.float64)
  except ValueError as e:
    raise FormatError(f"{path}: non-numeric point ({e})") from None
  if pts.ndim != 2 or pts.shape[1] != 2:
    raise FormatError(f"{path}: each point line needs exactly 2 numbers")
  if declared is not None and declared != len(pts):
    raise FormatError(f"{path}: n_points says {declared}, the block holds {len(pts)}")
  return pts if one_based else pts - 1.0


def _find_image(pts_path: str) -> str:
  stem = os.path.splitext(pts_path)[0]
  for ext in _IMAGE_EXTENSIONS + tuple(e.upper() for e in _IMAGE_EXTENSIONS):
    if os.path.exists(stem + ext):
      return stem + ext
  raise FormatError(f"{pts_path}: no image next to it (looked for {stem}.jpg/.png/...)")


def read_300w_folder(root: str, subfolders: Sequence[str], *,
                     one_based: bool = False) -> list[Record]:
  """Records of every `.pts` file under `root/<subfolder>` (sorted), paths relative to root."""
  records = []
  for sub in subfolders:
    folder = os.path.join(root, sub)
    if not os.path.isdir(folder):
      raise FormatError(f"300W folder {folder} is missing (expected afw/, helen/trainset, "
                        f"helen/testset, ibug/, lfpw/trainset, lfpw/testset under {root})")
    files = sorted(glob.glob(os.path.join(folder, "**", "*.pts"), recursive=True))
    if not files:
      raise FormatError(f"no .pts files under {folder}")
    for pts_path in files:
      lm = read_pts(pts_path, one_based=one_based)
      if lm.shape[0] != 68:
        raise FormatError(f"{pts_path}: {lm.shape[0]} points, 300W has 68")
      image = os.path.relpath(_find_image(pts_path), root).replace(os.sep, "/")
      records.append(Record(image_path=image, landmarks=lm))
  return records


def convert_300w(root: str, out_dir: str, *, crop_rule: str = "max",
                 one_based: bool = False) -> dict[str, int]:
  """Writes train.tsv, test.tsv (full), test_common.tsv, test_challenge.tsv into `out_dir`."""
  counts = {}
  train = read_300w_folder(root, W300_TRAIN, one_based=one_based)
  write_tsv(os.path.join(out_dir, "train.tsv"), train, "300w", crop_rule=crop_rule)
  counts["train"] = len(train)
  full = []
  for subset, folders in W300_TEST.items():
    records = read_300w_folder(root, folders, one_based=one_based)
    write_tsv(os.path.join(out_dir, f"test_{subset}.tsv"), records, "300w",
              crop_rule=crop_rule)
    counts[f"test_{subset}"] = len(records)
    full += records
  write_tsv(os.path.join(out_dir, "test.tsv"), full, "300w", crop_rule=crop_rule)
  counts["test"] = len(full)
  return counts


# ----------------------------------------------------------------------------------------------
# COFW

COFW_KEYS = {"train": ("IsTr", "phisTr"), "test": ("IsT", "phisT")}


def _is_hdf5(path: str) -> bool:
  """MATLAB v7.3 files are HDF5 (behind a 512-byte text header); older ones are not."""
  with open(path, "rb") as f:
    head = f.read(128)
  return head.startswith(b"\x89HDF") or b"MATLAB 7.3" in head


def _read_mat_hdf5(path: str, image_key: str, phis_key: str):
  import h5py  # pylint: disable=g-import-not-at-top  (only MATLAB v7.3 files need it)
  with h5py.File(path, "r") as f:
    if image_key not in f or phis_key not in f:
      raise FormatError(f"{path}: needs variables {image_key!r} and {phis_key!r}, has "
                        f"{sorted(f.keys())}")
    # HDF5 stores MATLAB arrays with their axes reversed.
    phis = np.asarray(f[phis_key]).T
    refs = np.asarray(f[image_key]).reshape(-1)
    images = [np.asarray(f[ref]).T for ref in refs]
  return images, phis


def _read_mat_v5(path: str, image_key: str, phis_key: str):
  import scipy.io  # pylint: disable=g-import-not-at-top
  mat = scipy.io.loadmat(path)
  if image_key not in mat or phis_key not in mat:
    raise FormatError(f"{path}: needs variables {image_key!r} and {phis_key!r}, has "
                      f"{sorted(k for k in mat if not k.startswith('__'))}")
  cells = mat[image_key].reshape(-1)
  return [np.asarray(c) for c in cells], np.asarray(mat[phis_key])


def read_cofw_mat(path: str, split: str, *,
                  one_based: bool = False) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
  """(images as uint8 RGB (H, W, 3), landmarks (n, 29, 2) 0-based, occlusion (n, 29) int32)."""
  if split not in COFW_KEYS:
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  image_key, phis_key = COFW_KEYS[split]
  reader = _read_mat_hdf5 if _is_hdf5(path) else _read_mat_v5
  images, phis = reader(path, image_key, phis_key)
  phis = np.asarray(phis, np.float64)
  if phis.ndim != 2 or phis.shape[1] != 87:
    if phis.ndim == 2 and phis.shape[0] == 87:
      phis = phis.T
    else:
      raise FormatError(f"{path}: {phis_key} must be (n, 87) (29 x, 29 y, 29 occlusion), got "
                        f"{phis.shape}")
  if len(images) != len(phis):
    raise FormatError(f"{path}: {len(images)} images but {len(phis)} rows in {phis_key}")
  landmarks = np.stack([phis[:, :29], phis[:, 29:58]], axis=-1)
  if not one_based:
    landmarks = landmarks - 1.0
  occlusion = (phis[:, 58:87] > 0.5).astype(np.int32)
  out = []
  for k, img in enumerate(images):
    img = np.asarray(img)
    if img.ndim == 2:
      img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] != 3:
      raise FormatError(f"{path}: image {k} of {image_key} has shape {img.shape}")
    out.append(np.ascontiguousarray(img.astype(np.uint8)))
  return out, landmarks, occlusion


def convert_cofw(mat_file: str, split: str, out_dir: str, *, crop_rule: str = "max",
                 one_based: bool = False) -> int:
  """Writes `out_dir/images/{split}/NNNNN.png`, `{split}.tsv` and `{split}_occlusion.tsv`."""
  images, landmarks, occlusion = read_cofw_mat(mat_file, split, one_based=one_based)
  image_dir = os.path.join(out_dir, "images")
  os.makedirs(os.path.join(image_dir, split), exist_ok=True)
  records = []
  for k, (img, lm) in enumerate(zip(images, landmarks)):
    rel = f"{split}/{k:05d}.png"
    if not cv2.imwrite(os.path.join(image_dir, rel), img[..., ::-1]):
      raise OSError(f"could not write {os.path.join(image_dir, rel)}")
    records.append(Record(image_path=rel, landmarks=lm))
  write_tsv(os.path.join(out_dir, f"{split}.tsv"), records, "cofw", crop_rule=crop_rule)
  with open(os.path.join(out_dir, f"{split}_occlusion.tsv"), "w") as f:
    f.writelines(",".join(str(int(v)) for v in row) + "\n" for row in occlusion)
  return len(records)


# ----------------------------------------------------------------------------------------------
# CLI


def _find_one(folder: str, name: str) -> str:
  if os.path.isfile(folder) and os.path.basename(folder) == name:
    return folder
  hits = sorted(glob.glob(os.path.join(folder, "**", name), recursive=True))
  if not hits:
    raise FileNotFoundError(f"{name} not found under {folder}")
  return hits[0]


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m star_jax.data.original_formats",
      description="Converts original WFLW / 300W / COFW annotations to official TSV files.")
  sub = parser.add_subparsers(dest="dataset", required=True)
  for name, help_text in (("wflw", "folder with list_98pt_rect_attr_{train,test}.txt"),
                          ("300w", "300W folder (afw, helen, ibug, lfpw)"),
                          ("cofw", "folder with COFW_{train,test}_color.mat")):
    p = sub.add_parser(name)
    p.add_argument("source", help=help_text)
    p.add_argument("--out", required=True, help="output folder for the TSV files")
    p.add_argument("--crop-rule", default="max", choices=CROP_RULES)
    if name == "wflw":
      p.add_argument("--box", default="landmarks", choices=("landmarks", "rect"),
                     help="crop box: the landmarks' box (ADNet) or the detector rectangle")
    else:
      p.add_argument("--keep-one-based", action="store_true",
                     help="keep MATLAB 1-based coordinates (default: subtract 1)")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  if args.dataset == "wflw":
    for split in ("train", "test"):
      src = _find_one(args.source, f"list_98pt_rect_attr_{split}.txt")
      n = convert_wflw(src, os.path.join(args.out, f"{split}.tsv"), crop_rule=args.crop_rule,
                       box=args.box)
      print(f"{split}: {n} faces from {src}")
    print("image paths are relative to WFLW_images")
  elif args.dataset == "300w":
    counts = convert_300w(args.source, args.out, crop_rule=args.crop_rule,
                          one_based=args.keep_one_based)
    for k, v in counts.items():
      print(f"{k}: {v} faces")
    print(f"image paths are relative to {os.path.abspath(args.source)}")
  else:
    for split in ("train", "test"):
      src = _find_one(args.source, f"COFW_{split}_color.mat")
      n = convert_cofw(src, split, args.out, crop_rule=args.crop_rule,
                       one_based=args.keep_one_based)
      print(f"{split}: {n} faces from {src}")
    print(f"image paths are relative to {os.path.join(os.path.abspath(args.out), 'images')}")


if __name__ == "__main__":
  sys.exit(main())
