"""Tiny datasets for end-to-end tests, made from the embedded synthetic faces.

- `wflw(root, counts)`: a WFLW-format folder (train/val/test TSVs, images/), the embedded
  generator at small counts.
- `w300(root)`: the same faces as 68-point 300W annotations laid out like the 300W download
  (afw/, helen/, lfpw/, ibug/ under images/), train.tsv and test.tsv, so that the test subsets
  (common = LFPW + HELEN test, challenge = iBUG) are defined by the paths.
- `scheme29(root)`: 29 of the 98 points as a custom landmark scheme (a scheme JSON file and
  TSVs), for the "train on your own data" path.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from star_jax.core import schemes as datasets, landmark_mappings
from star_jax.data import embedded
from star_jax.foreign import original_formats

# 300W-like folders of the 68-point copy: (split, subset folder) per image, cycling.
_W300_TRAIN = ("afw", "lfpw/trainset", "helen/trainset")
_W300_TEST = ("lfpw/testset", "ibug", "helen/testset")


def _rows(tsv: str) -> list[list[str]]:
  with open(tsv) as f:
    lines = [line.rstrip("\n") for line in f if line.strip()]
  return [line.split("\t") for line in lines[1:]]


def wflw(root: str, counts=(24, 8, 8)) -> embedded.DataFiles:
  return embedded.ensure_embedded_dataset(root, counts=counts)


def w300(root: str, source: embedded.DataFiles) -> str:
  """A 300W-like manual dir under `root` (whose name may itself contain 'ibug')."""
  spec300 = "300w"
  for split, folders in (("train", _W300_TRAIN), ("test", _W300_TEST)):
    lines = [original_formats.header(68, False)]
    for k, row in enumerate(_rows(getattr(source, f"{split}_tsv"))):
      rel = f"{folders[k % len(folders)]}/{split}_{k:03d}.jpg"
      os.makedirs(os.path.join(root, "images", os.path.dirname(rel)), exist_ok=True)
      shutil.copy(os.path.join(source.image_dir, row[0]), os.path.join(root, "images", rel))
      lm98 = np.array(row[2].split(","), np.float64).reshape(98, 2)
      lm68 = landmark_mappings.convert_landmarks(lm98, "wflw", 68)
      lines.append(original_formats.format_row(
          rel, lm68, None, five_points=original_formats.FIVE_POINTS[spec300]))
    with open(os.path.join(root, f"{split}.tsv"), "w") as f:
      f.write("\n".join(lines) + "\n")
  return root


# 29 points picked from the 98: brows, eyes with their pupils, nose, mouth corners and lips.
SCHEME29_POINTS = (33, 38, 46, 50, 60, 64, 68, 72, 96, 97, 51, 54, 55, 57, 59, 76, 79, 82, 85,
                   88, 90, 92, 94, 0, 8, 16, 24, 32, 62)


def scheme29(root: str, source: embedded.DataFiles) -> str:
  """A custom 29-point scheme (JSON) and TSVs of those points; returns the scheme path."""
  os.makedirs(root, exist_ok=True)
  index = {p: i for i, p in enumerate(SCHEME29_POINTS)}
  flip98 = dict(tuple(pair) for pair in datasets.WFLW.flip_pairs)
  flip98.update({b: a for a, b in flip98.items()})
  pairs = sorted({tuple(sorted((index[p], index[flip98[p]]))) for p in SCHEME29_POINTS
                  if p in flip98 and flip98[p] in index})
  scheme = {
      "name": "face29",
      "num_points": len(SCHEME29_POINTS),
      "point_names": [f"wflw{p}" for p in SCHEME29_POINTS],
      "edges": [
          {"name": "contour", "closed": False, "points": [index[p] for p in (0, 8, 16, 24, 32)]},
          {"name": "outer_lip", "closed": True, "points": [index[p] for p in (76, 79, 82, 85)]},
          {"name": "nose", "closed": False, "points": [index[p] for p in (51, 54, 57, 59)]},
      ],
      "flip_pairs": [list(p) for p in pairs],
      "ocular": [index[60], index[72]],
      "pupil": [index[96], index[97]],
      "default_norm": "ocular",
      "failure_threshold": 0.1,
  }
  path = os.path.join(root, "face29.json")
  with open(path, "w") as f:
    json.dump(scheme, f, indent=1)
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  for split in ("train", "val", "test"):
    lines = [original_formats.header(29, False)]
    for row in _rows(getattr(source, f"{split}_tsv")):
      name = row[0]
      target = os.path.join(root, "images", name)
      os.makedirs(os.path.dirname(target), exist_ok=True)
      if not os.path.exists(target):
        shutil.copy(os.path.join(source.image_dir, name), target)
      lm98 = np.array(row[2].split(","), np.float64).reshape(98, 2)
      lines.append(original_formats.format_row(name, lm98[list(SCHEME29_POINTS)], None,
                                               five_points=(8, 9, 11, 15, 17)))
    with open(os.path.join(root, f"{split}.tsv"), "w") as f:
      f.write("\n".join(lines) + "\n")
  return path


# ---------------------------------------------------------------------------------------------
# The files the dataset authors distribute, in miniature (inputs of the converters).

def _faces(source: embedded.DataFiles, split: str):
  """(image path, 98 landmarks, tags) of the embedded faces of a split."""
  for row in _rows(getattr(source, f"{split}_tsv")):
    yield (os.path.join(source.image_dir, row[0]),
           np.array(row[2].split(","), np.float64).reshape(98, 2),
           [int(t) for t in row[6].split(",")])


def wflw_release(root: str, source: embedded.DataFiles) -> str:
  """`WFLW_annotations/list_98pt_rect_attr_train_test/*.txt` and `WFLW_images/` under root."""
  lists = os.path.join(root, "WFLW_annotations", "list_98pt_rect_attr_train_test")
  os.makedirs(lists, exist_ok=True)
  for split in ("train", "test"):
    lines = []
    for k, (image, lm, tags) in enumerate(_faces(source, split)):
      rel = f"{k % 3}--Event/{split}_{k:03d}.jpg"
      os.makedirs(os.path.join(root, "WFLW_images", os.path.dirname(rel)), exist_ok=True)
      shutil.copy(image, os.path.join(root, "WFLW_images", rel))
      lo, hi = lm.min(axis=0), lm.max(axis=0)
      rect = [int(lo[0]) - 5, int(lo[1]) - 5, int(hi[0]) + 5, int(hi[1]) + 5]
      lines.append(" ".join([f"{v:.6f}" for v in lm.reshape(-1)] + [str(v) for v in rect]
                            + [str(t) for t in tags] + [rel]))
    with open(os.path.join(lists, f"list_98pt_rect_attr_{split}.txt"), "w") as f:
      f.write("\n".join(lines) + "\n")
  return root


def w300_release(root: str, source: embedded.DataFiles) -> str:
  """The 300W download layout (images beside 1-based `.pts` files) under root/300W."""
  folders = {"train": ("afw", "helen/trainset", "lfpw/trainset"),
             "test": ("helen/testset", "ibug", "lfpw/testset")}
  base = os.path.join(root, "300W")
  for split, names in folders.items():
    for k, (image, lm, _) in enumerate(_faces(source, split)):
      folder = os.path.join(base, names[k % len(names)])
      os.makedirs(folder, exist_ok=True)
      stem = os.path.join(folder, f"{split}_{k:03d}")
      shutil.copy(image, stem + ".jpg")
      pts = landmark_mappings.convert_landmarks(lm, "wflw", 68) + 1.0   # MATLAB, 1-based
      with open(stem + ".pts", "w") as f:
        f.write("version: 1\nn_points: 68\n{\n")
        f.writelines(f"{x:.3f} {y:.3f}\n" for x, y in pts)
        f.write("}\n")
  return base


def cofw_release(root: str, source: embedded.DataFiles) -> str:
  """`COFW_train_color.mat` and `COFW_test_color.mat` (MATLAB v5) under root."""
  import cv2
  import scipy.io
  for split, (image_key, phis_key) in (("train", ("IsTr", "phisTr")),
                                       ("test", ("IsT", "phisT"))):
    images, phis = [], []
    for image, lm, _ in _faces(source, split):
      images.append(cv2.imread(image)[..., ::-1])
      pts = lm[list(SCHEME29_POINTS)] + 1.0
      phis.append(np.concatenate([pts[:, 0], pts[:, 1], np.zeros(29)]))
    cells = np.empty((len(images), 1), object)
    for k, image in enumerate(images):
      cells[k, 0] = image
    scipy.io.savemat(os.path.join(root, f"COFW_{split}_color.mat"),
                     {image_key: cells, phis_key: np.asarray(phis)})
  return root
