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
    as PNG files `images/{train,test}/NNNNN.png` (lossless, in file order) and the per-point
    occlusion flags to `{split}_occlusion.tsv` (one row of 29 0/1 flags per image, in TSV order).

The output folder (CLI). Every converter writes one folder OUT that is at once
  * a TSV dataset folder: `--config.data.image_dir=OUT/images --config.data.train_tsv=
    OUT/train.tsv --config.data.test_tsv=OUT/test.tsv`, and
  * a TFDS manual dir (`python -m star_jax.data.tfds_builders DATASET --manual-dir OUT`):
    OUT/train.tsv, OUT/test.tsv and OUT/images/, the TSV image paths relative to OUT/images.
OUT/images is where the TSV paths point. COFW's images only exist inside the .mat files, so they
are written there. WFLW and 300W images are large and already on disk in the layout the TSV
paths name, so OUT/images is a symbolic link to their folder (an absolute path: OUT can move,
the images cannot) rather than a copy: the 300W folder itself, and for WFLW the folder given
with `--images` or, when that is absent, a `WFLW_images` folder found beside the annotations.
Before linking, every image the annotations name is checked to exist under that folder, so a
wrong folder is reported (and nothing is written) instead of failing later in training; a
`WFLW_images` folder that was only guessed and does not hold every image is left unlinked with
a note. An existing OUT/images that is anything but a link to the same folder is never
replaced. Where symbolic links are not available (some Windows setups) the converter says so
and writes nothing: link or copy the folder as OUT/images by hand, or use the TSVs with
`--config.data.image_dir` pointing at the images.

CLI (SOURCE is the file the dataset ships, or the folder holding it):
  python -m star_jax.data.original_formats wflw list_98pt_rect_attr_train.txt --out OUT \
      [--images WFLW_images]
  python -m star_jax.data.original_formats 300w 300W_DIR --out OUT
  python -m star_jax.data.original_formats cofw COFW_train_color.mat --out OUT
Given one split's file (either split), the other split's file is taken from the same folder
under the same name with `train`/`test` exchanged; given a folder, both are searched for below
it. Both splits are read and checked before anything is written: a missing counterpart, a
malformed line or a missing image is one line (`error: ...`, exit 1; a misused flag exits 2)
and an untouched OUT. The converter prints what it found (files, faces per split, the image
folder) and what it wrote.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Iterable, Sequence

import cv2
import numpy as np

from star_jax.core.schemes import get_spec
from star_jax.errors import DataError, UsageError

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


def tsv_text(records: Sequence[Record], dataset: str, *, crop_rule: str = "max",
             box: str = "landmarks") -> str:
  """The official TSV (header line first) of `records`, checked row by row, as one string."""
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
  return "\n".join(lines) + "\n"


def _write_text(path: str, text: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", newline="\n") as f:
    f.write(text)
  return path


def write_tsv(path: str, records: Sequence[Record], dataset: str, *, crop_rule: str = "max",
              box: str = "landmarks") -> str:
  """Writes `records` as an official TSV with a header line; returns `path`."""
  return _write_text(path, tsv_text(records, dataset, crop_rule=crop_rule, box=box))


# ----------------------------------------------------------------------------------------------
# WFLW


def read_wflw_list(path: str) -> list[Record]:
  """Parses a WFLW `list_98pt_rect_attr_*.txt` file (see the module docstring)."""
  records = []
  with open(path, encoding="utf-8", errors="strict") as f:
    try:
      lines = f.readlines()
    except UnicodeDecodeError:
      raise FormatError(f"{path}: not a text file (a WFLW list is space-separated text)"
                        ) from None
  for line_number, line in enumerate(lines, 1):
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
  return [r for sub in subfolders
          for r in read_300w_subfolders(root, (sub,), one_based=one_based)[sub]]


def read_300w_subfolders(root: str, subfolders: Sequence[str], *,
                         one_based: bool = False) -> dict[str, list[Record]]:
  """{subfolder: its records} for each of `subfolders` of the 300W folder `root`."""
  by_folder = {}
  for sub in subfolders:
    folder = os.path.join(root, sub)
    if not os.path.isdir(folder):
      raise FormatError(f"300W folder {folder} is missing (expected afw/, helen/trainset, "
                        f"helen/testset, ibug/, lfpw/trainset, lfpw/testset under {root})")
    files = sorted(glob.glob(os.path.join(folder, "**", "*.pts"), recursive=True))
    if not files:
      raise FormatError(f"no .pts files under {folder}")
    records = []
    for pts_path in files:
      lm = read_pts(pts_path, one_based=one_based)
      if lm.shape[0] != 68:
        raise FormatError(f"{pts_path}: {lm.shape[0]} points, 300W has 68")
      image = os.path.relpath(_find_image(pts_path), root).replace(os.sep, "/")
      records.append(Record(image_path=image, landmarks=lm))
    by_folder[sub] = records
  return by_folder


def read_300w(root: str, *, one_based: bool = False) -> dict[str, dict[str, list[Record]]]:
  """{'train' | 'test_common' | 'test_challenge': {subfolder: records}} of a 300W folder."""
  groups = {"train": W300_TRAIN, **{f"test_{k}": v for k, v in W300_TEST.items()}}
  return {name: read_300w_subfolders(root, folders, one_based=one_based)
          for name, folders in groups.items()}


def _300w_tsvs(by_group: dict[str, dict[str, list[Record]]],
               crop_rule: str) -> dict[str, tuple[int, str]]:
  """{file name: (faces, TSV text)}: train, test (common + challenge) and the two subsets."""
  flat = {name: [r for records in folders.values() for r in records]
          for name, folders in by_group.items()}
  flat["test"] = flat["test_common"] + flat["test_challenge"]
  order = ("train", "test", "test_common", "test_challenge")
  return {f"{name}.tsv": (len(flat[name]), tsv_text(flat[name], "300w", crop_rule=crop_rule))
          for name in order}


def convert_300w(root: str, out_dir: str, *, crop_rule: str = "max",
                 one_based: bool = False) -> dict[str, int]:
  """Writes train.tsv, test.tsv (full), test_common.tsv, test_challenge.tsv into `out_dir`.

  Every subfolder is read and checked before the first file is written.
  """
  tsvs = _300w_tsvs(read_300w(root, one_based=one_based), crop_rule)
  for name, (_, text) in tsvs.items():
    _write_text(os.path.join(out_dir, name), text)
  return {name[:-len(".tsv")]: count for name, (count, _) in tsvs.items()}


# ----------------------------------------------------------------------------------------------
# COFW

COFW_KEYS = {"train": ("IsTr", "phisTr"), "test": ("IsT", "phisT")}


def _is_hdf5(path: str) -> bool:
  """MATLAB v7.3 files are HDF5 (behind a 512-byte text header); older ones are not."""
  with open(path, "rb") as f:
    head = f.read(128)
  return head.startswith(b"\x89HDF") or b"MATLAB 7.3" in head


def _read_mat_hdf5(path: str, image_key: str, phis_key: str):
  import h5py  # (only MATLAB v7.3 files need it)
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
  import scipy.io
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
  try:
    images, phis = reader(path, image_key, phis_key)
  except FormatError:
    raise
  except Exception as e:  # noqa: BLE001 - scipy/h5py raise many types for a damaged file
    raise FormatError(f"{path}: not a readable MATLAB file ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''})") from None
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


def write_cofw_split(out_dir: str, split: str, images: Sequence[np.ndarray],
                     landmarks: np.ndarray, occlusion: np.ndarray, *,
                     crop_rule: str = "max") -> int:
  """Writes `out_dir/images/{split}/NNNNN.png`, `{split}.tsv` and `{split}_occlusion.tsv`."""
  records = [Record(image_path=f"{split}/{k:05d}.png", landmarks=lm)
             for k, lm in enumerate(landmarks)]
  text = tsv_text(records, "cofw", crop_rule=crop_rule)
  image_dir = os.path.join(out_dir, "images")
  os.makedirs(os.path.join(image_dir, split), exist_ok=True)
  for record, img in zip(records, images):
    path = os.path.join(image_dir, record.image_path)
    if not cv2.imwrite(path, img[..., ::-1]):
      raise OSError(f"could not write {path}")
  _write_text(os.path.join(out_dir, f"{split}.tsv"), text)
  with open(os.path.join(out_dir, f"{split}_occlusion.tsv"), "w") as f:
    f.writelines(",".join(str(int(v)) for v in row) + "\n" for row in occlusion)
  return len(records)


def convert_cofw(mat_file: str, split: str, out_dir: str, *, crop_rule: str = "max",
                 one_based: bool = False) -> int:
  """Writes `out_dir/images/{split}/NNNNN.png`, `{split}.tsv` and `{split}_occlusion.tsv`."""
  images, landmarks, occlusion = read_cofw_mat(mat_file, split, one_based=one_based)
  return write_cofw_split(out_dir, split, images, landmarks, occlusion, crop_rule=crop_rule)


# ----------------------------------------------------------------------------------------------
# Locating the inputs


SPLITS = ("train", "test")
WFLW_LIST = "list_98pt_rect_attr_{split}.txt"
COFW_MAT = "COFW_{split}_color.mat"
WFLW_IMAGE_FOLDER = "WFLW_images"
IMAGES_LINK = "images"


def _swap_split(name: str) -> tuple[str, str] | None:
  """(split, name of the other split's file) for a file name containing one split word."""
  lower = name.lower()
  found = [s for s in SPLITS if s in lower]
  if len(found) != 1:
    return None
  split = found[0]
  other = SPLITS[1 - SPLITS.index(split)]
  at = lower.rindex(split)
  word = name[at:at + len(split)]
  swapped = other.upper() if word.isupper() else other.capitalize() if word[0].isupper() else other
  return split, name[:at] + swapped + name[at + len(split):]


def locate_split_files(source: str, pattern: str, what: str) -> dict[str, str]:
  """{'train': path, 'test': path} from one split's file or a folder holding both files.

  `pattern` is the distributed file name with `{split}`. A file is paired with the file of the
  same name with train/test exchanged in its folder; a folder is searched (recursively) for
  both names. Raises DataError (a missing file) or UsageError (a name that says no split, or a
  folder holding several candidates).
  """
  names = {s: pattern.format(split=s) for s in SPLITS}
  if os.path.isfile(source):
    swap = _swap_split(os.path.basename(source))
    if swap is None:
      raise UsageError(f"{source}: the file name names neither 'train' nor 'test'; give the "
                       f"{what} file as distributed ({names['train']}) or its folder")
    split, other_name = swap
    other = os.path.join(os.path.dirname(source), other_name)
    if not os.path.isfile(other):
      raise DataError(f"{other} is missing: the {SPLITS[1 - SPLITS.index(split)]} file must sit "
                      f"beside {source} (nothing was written)")
    return {split: source, SPLITS[1 - SPLITS.index(split)]: other}
  if not os.path.isdir(source):
    raise DataError(f"{source}: no such file or folder")
  found = {}
  for split, name in names.items():
    hits = sorted(glob.glob(os.path.join(glob.escape(source), "**", name), recursive=True))
    if not hits:
      raise DataError(f"{name} not found under {source} (nothing was written)")
    if len(hits) > 1:
      raise UsageError(f"{len(hits)} files named {name} under {source} ({hits[0]}, "
                       f"{hits[1]}, ...): give the one to convert")
    found[split] = hits[0]
  return found


def missing_images(image_dir: str, image_paths: Iterable[str]) -> list[str]:
  """The TSV image paths that are not files under `image_dir`."""
  return [p for p in image_paths if not os.path.isfile(os.path.join(image_dir, p))]


def find_wflw_images(annotation_file: str, levels: int = 3) -> str | None:
  """A `WFLW_images` folder beside the annotations (WFLW/WFLW_annotations/<list>/<file> and
  WFLW/WFLW_images is how the dataset unpacks), searched up to `levels` folders up."""
  folder = os.path.dirname(os.path.abspath(annotation_file))
  for _ in range(levels):
    candidate = os.path.join(folder, WFLW_IMAGE_FOLDER)
    if os.path.isdir(candidate):
      return candidate
    folder = os.path.dirname(folder)
  return None


def check_images_link(out_dir: str, image_dir: str | None) -> None:
  """Raises UsageError when OUT/images exists and is not a link to `image_dir` (None: COFW,
  whose images are written into OUT/images, which must then be a plain folder if present)."""
  link = os.path.join(out_dir, IMAGES_LINK)
  if not os.path.lexists(link):
    return
  if image_dir is None:
    if os.path.islink(link) or not os.path.isdir(link):
      raise UsageError(f"{link} exists and is not a folder this converter wrote: remove it or "
                       "choose another --out")
    return
  if not (os.path.islink(link)
          and os.path.realpath(link) == os.path.realpath(image_dir)):
    raise UsageError(f"{link} exists and is not a link to {os.path.abspath(image_dir)}: remove "
                     "it or choose another --out")


def link_images(out_dir: str, image_dir: str) -> str:
  """Makes OUT/images a symbolic link to `image_dir` (absolute); returns the link's path."""
  link = os.path.join(out_dir, IMAGES_LINK)
  if os.path.islink(link) and os.path.realpath(link) == os.path.realpath(image_dir):
    return link
  try:
    os.symlink(os.path.abspath(image_dir), link, target_is_directory=True)
  except (OSError, NotImplementedError) as e:
    raise DataError(f"cannot create the link {link} -> {os.path.abspath(image_dir)} "
                    f"({getattr(e, 'strerror', None) or e}): nothing was written; link or copy "
                    "the image folder there yourself, or run without it") from None
  return link
