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

from star_jax import datasets, landmark_mappings
from star_jax.data import embedded, original_formats

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
