"""Landmark accuracy metrics: NME per image, failure rate and AUC, and evaluation subsets.

Definitions follow the official STAR evaluation (lib/metric in the reference code):

* NME of one image is `mean_i ||pred_i - gt_i|| / ||gt_L - gt_R||`, where L and R are the
  normalisation end points of the dataset (`DatasetSpec.norm_indices`); an end point given as a
  tuple of indices is the mean of those points (300W inter-pupil).
* FR and AUC integrate the cumulative error distribution on the grid
  `xs = arange(0, threshold + step, step)` with `ys[k] = #{nme <= xs[k]} / N`;
  `FR = 1 - ys[-1]` and `AUC = simpson(ys, xs) / threshold`.

Simpson's rule for an even number of samples is ambiguous, and SciPy changed its answer in
1.11: before it, `simps` averaged "Simpson on the first N-1 samples + trapezoid on the last
interval" with "trapezoid on the first interval + Simpson on the last N-1 samples"
(`even='avg'`); from 1.11 on, `simpson` applies Simpson on the first N-1 samples and
Cartwright's three-point correction on the last interval. The official results were produced
with SciPy 1.5 (the 'average' rule). This module implements both rules itself, so numbers do
not depend on the installed SciPy; `even_rule='average'` (default) reproduces the official
numbers, `even_rule='cartwright'` matches SciPy >= 1.11. For thresholds whose grid has an odd
number of samples (WFLW and COFW at 0.1: 1001 samples) both rules are plain composite Simpson
and agree; for 300W at 0.05 (502 samples) they differ by about 3e-5 in AUC.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np

from star_jax.core.schemes import DatasetSpec, NormIndex

# Grid spacing of the cumulative error distribution, as in the official FR/AUC code.
CED_STEP = 1e-4
EVEN_RULES = ("average", "cartwright")


def _end_point(landmarks: np.ndarray, index: NormIndex) -> np.ndarray:
  """`(M, N, 2)` -> `(M, 2)`: one landmark, or the mean of several (e.g. an eye's contour)."""
  if isinstance(index, (tuple, list)):
    return landmarks[:, list(index)].mean(axis=1)
  return landmarks[:, index]


def normalizing_distance(gt: np.ndarray, spec: DatasetSpec, norm: str = "default") -> np.ndarray:
  """`(M, N, 2)` ground truth -> `(M,)` inter-ocular, inter-pupil or box-diagonal distance."""
  ends = spec.norm_indices(norm)
  gt = np.asarray(gt, np.float64)
  if ends is None:  # 'diagonal': of the ground truth's bounding box
    return np.linalg.norm(gt.max(axis=1) - gt.min(axis=1), axis=-1)
  left, right = ends
  return np.linalg.norm(_end_point(gt, left) - _end_point(gt, right), axis=-1)


def nme(pred: np.ndarray, gt: np.ndarray, spec: DatasetSpec, norm: str = "default") -> np.ndarray:
  """Normalised mean error per image: `(M, N, 2)` predictions and ground truth -> `(M,)`.

  `norm` is 'default' (the dataset's official choice), 'ocular' or 'pupil'. Computed in float64.
  """
  pred = np.asarray(pred, np.float64)
  gt = np.asarray(gt, np.float64)
  if pred.ndim == 2:
    pred, gt = pred[None], gt[None]
  if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[-1] != 2:
    raise ValueError(f"nme: pred {pred.shape} and gt {gt.shape} must both be (M, N, 2)")
  if pred.shape[1] != spec.num_points:
    raise ValueError(f"nme: landmarks have {pred.shape[1]} points but dataset {spec.name!r} "
                     f"has {spec.num_points}")
  dist = normalizing_distance(gt, spec, norm)
  if np.any(dist <= 0):
    bad = np.flatnonzero(dist <= 0).tolist()
    raise ValueError(f"nme: zero normalising distance in ground truth of images {bad}")
  return np.linalg.norm(pred - gt, axis=-1).mean(axis=-1) / dist


def ced(nmes: np.ndarray, threshold: float, step: float = CED_STEP
        ) -> tuple[np.ndarray, np.ndarray]:
  """Cumulative error distribution on the official grid: `(xs, ys)`, `ys[k] = P(nme <= xs[k])`."""
  nmes = np.asarray(nmes, np.float64).reshape(-1)
  if nmes.size == 0:
    raise ValueError("ced: no NME values given")
  # The official grid, built the same way so its sample count (and float rounding) matches.
  xs = np.arange(0, threshold + step, step)
  ys = np.searchsorted(np.sort(nmes), xs, side="right") / float(nmes.size)
  return xs, ys


def _simpson_odd(y: np.ndarray, x: np.ndarray) -> float:
  """Composite Simpson's rule on an odd number of samples (even number of intervals).

  Uses the variable-spacing form, as SciPy does when `x` is given, so float-level rounding of
  the `arange` grid is honoured.
  """
  h = np.diff(x)
  h0, h1 = h[0::2], h[1::2]
  y0, y1, y2 = y[0:-2:2], y[1:-1:2], y[2::2]
  hsum = h0 + h1
  hprod = h0 * h1
  ratio = h0 / h1
  return float(np.sum(hsum / 6.0 * (y0 * (2.0 - 1.0 / ratio) + y1 * hsum * hsum / hprod
                                    + y2 * (2.0 - ratio))))


def simpson(y: np.ndarray, x: np.ndarray, even_rule: str = "average") -> float:
  """Integral of samples `y` at abscissae `x` by Simpson's rule (see module docstring)."""
  y = np.asarray(y, np.float64)
  x = np.asarray(x, np.float64)
  n = y.size
  if even_rule not in EVEN_RULES:
    raise ValueError(f"even_rule must be one of {EVEN_RULES}, got {even_rule!r}")
  if n < 2:
    return 0.0
  if n == 2:
    return float(0.5 * (x[1] - x[0]) * (y[0] + y[1]))
  if n % 2 == 1:
    return _simpson_odd(y, x)
  if even_rule == "average":
    head = _simpson_odd(y[:-1], x[:-1]) + 0.5 * (x[-1] - x[-2]) * (y[-1] + y[-2])
    tail = 0.5 * (x[1] - x[0]) * (y[1] + y[0]) + _simpson_odd(y[1:], x[1:])
    return float(0.5 * (head + tail))
  # Cartwright: Simpson on the first n-1 samples, then the last interval from a parabola
  # through the last three samples.
  total = _simpson_odd(y[:-1], x[:-1])
  h = np.diff(x)
  h_a, h_b = h[-2], h[-1]
  alpha = (2 * h_b ** 2 + 3 * h_a * h_b) / (6 * (h_a + h_b))
  beta = (h_b ** 2 + 3 * h_a * h_b) / (6 * h_a)
  eta = h_b ** 3 / (6 * h_a * (h_a + h_b))
  return float(total + alpha * y[-1] + beta * y[-2] - eta * y[-3])


def fr_auc(nmes: np.ndarray, threshold: float, *, step: float = CED_STEP,
           even_rule: str = "average") -> tuple[float, float]:
  """Failure rate and area under the CED curve up to `threshold`, both fractions in [0, 1].

  Unrounded (the official code rounds FR to 4 and AUC to 6 decimals for display only).
  """
  xs, ys = ced(nmes, threshold, step)
  return float(1.0 - ys[-1]), simpson(ys, xs, even_rule) / threshold


def subset_key(path: str, image_dir: str | None = None) -> str:
  """The part of an image path the subset rules read: lower case, '/' separators, and below
  `image_dir` when the path lies there (the dataset folder's own name must not decide)."""
  path = path.replace("\\", "/")
  if image_dir:
    root = os.path.abspath(image_dir).replace("\\", "/").rstrip("/") + "/"
    if path.startswith(root):
      path = path[len(root):]
  return path.lower()


def subset_masks(spec: DatasetSpec, image_paths: Sequence[str] | None = None,
                 tags: np.ndarray | None = None, *,
                 image_dir: str | None = None) -> dict[str, np.ndarray]:
  """Boolean masks of the standard evaluation subsets, in reporting order.

  WFLW: 'full' plus one subset per attribute tag (TSV tag columns). 300W: the path subsets
  (common = LFPW + HELEN, challenge = iBUG, full = all three), matched as case-insensitive
  substrings of the image path relative to `image_dir` (when no path names a source set, only
  'full' = every image is returned). Other datasets: 'full' only.
  """
  if image_paths is None and tags is None:
    raise ValueError("subset_masks needs image_paths or tags")
  count = len(image_paths) if image_paths is not None else int(np.asarray(tags).shape[0])
  masks: dict[str, np.ndarray] = {}
  if spec.path_subsets:
    if image_paths is None:
      raise ValueError(f"{spec.name} subsets are defined by image paths; none given")
    keys = [subset_key(p, image_dir) for p in image_paths]
    for name, needles in spec.path_subsets:
      masks[name] = np.array([any(n in k for n in needles) for k in keys], bool)
    if not any(m.any() for m in masks.values()):
      # Paths of another layout (no 'lfpw' / 'helen' / 'ibug'): report the whole set only.
      return {"full": np.ones(count, bool)}
    if "full" not in masks:
      masks = {"full": np.ones(count, bool), **masks}
    return masks
  masks["full"] = np.ones(count, bool)
  if spec.attribute_tags:
    if tags is None:
      tags = np.zeros((count, len(spec.attribute_tags)), np.int32)
    tags = np.asarray(tags)
    if tags.shape != (count, len(spec.attribute_tags)):
      raise ValueError(f"tags have shape {tags.shape}; expected ({count}, "
                       f"{len(spec.attribute_tags)}) for {spec.name}")
    for j, name in enumerate(spec.attribute_tags):
      masks[name] = tags[:, j] > 0
  return masks


def summarize(nmes: np.ndarray, threshold: float, *, even_rule: str = "average") -> dict:
  """`{'nme', 'fr', 'auc', 'count'}` of one set of per-image NMEs (None values when empty)."""
  nmes = np.asarray(nmes, np.float64).reshape(-1)
  if nmes.size == 0:
    return {"nme": None, "fr": None, "auc": None, "count": 0}
  fr, auc = fr_auc(nmes, threshold, even_rule=even_rule)
  return {"nme": float(nmes.mean()), "fr": fr, "auc": auc, "count": int(nmes.size)}


def subset_metrics(nmes: np.ndarray, masks: Mapping[str, np.ndarray], threshold: float, *,
                   even_rule: str = "average") -> dict[str, dict]:
  """`summarize` applied to each subset mask."""
  nmes = np.asarray(nmes, np.float64)
  return {name: summarize(nmes[mask], threshold, even_rule=even_rule)
          for name, mask in masks.items()}
