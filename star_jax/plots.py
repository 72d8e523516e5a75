"""Pictures: cumulative error distribution curves and images annotated with landmarks.

Plots are drawn on matplotlib's Agg canvas directly, so no display is needed.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import cv2
import numpy as np

from star_jax import metrics as metrics_lib

# Colours (RGB) cycled over faces in annotated images.
_FACE_COLOURS = ((0, 255, 0), (255, 64, 64), (64, 160, 255), (255, 200, 0), (255, 0, 255))


def plot_ced(nmes_by_subset: Mapping[str, np.ndarray], threshold: float, path: str, *,
             title: str = "", even_rule: str = "average") -> str:
  """Writes the cumulative error distribution (one line per non-empty subset) to `path` (PNG).

  The x axis is NME (fraction) up to `threshold`, the y axis the fraction of images with an NME
  at most x; each legend entry carries the subset's mean NME and AUC.
  """
  # A Figure with an Agg canvas, not pyplot: no global backend state, no display needed.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(6.4, 4.8), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  for name, nmes in nmes_by_subset.items():
    nmes = np.asarray(nmes, np.float64).reshape(-1)
    if nmes.size == 0:
      continue
    xs, ys = metrics_lib.ced(nmes, threshold)
    _, auc = metrics_lib.fr_auc(nmes, threshold, even_rule=even_rule)
    ax.plot(xs, ys, label=f"{name} (n={nmes.size}, NME {100 * nmes.mean():.2f}%, "
                          f"AUC {auc:.4f})")
  ax.set_xlim(0, threshold)
  ax.set_ylim(0, 1)
  ax.set_xlabel("NME")
  ax.set_ylabel("fraction of images")
  ax.grid(True, alpha=0.3)
  ax.set_title(title or f"Cumulative error distribution (threshold {threshold:g})")
  ax.legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  return path


def draw_landmarks(image_rgb: np.ndarray, faces: Sequence[np.ndarray],
                   boxes: Sequence[Sequence[float] | None] | None = None) -> np.ndarray:
  """A copy of `image_rgb` with each face's points (and its box, when given) drawn on it.

  Dot radius and line width follow the face size, so small and large faces both stay legible.
  """
  canvas = np.ascontiguousarray(np.asarray(image_rgb, np.uint8)[..., :3]).copy()
  shift = 4  # sub-pixel precision of cv2 drawing (coordinates x 16)
  for k, points in enumerate(faces):
    colour = _FACE_COLOURS[k % len(_FACE_COLOURS)]
    points = np.asarray(points, np.float64)
    extent = float(np.max(np.ptp(points, axis=0))) if points.size else 0.0
    radius = max(1.0, extent / 120.0)
    for x, y in points:
      if not (np.isfinite(x) and np.isfinite(y)):
        continue
      cv2.circle(canvas, (int(round(x * (1 << shift))), int(round(y * (1 << shift)))),
                 int(round(radius * (1 << shift))), colour, -1, cv2.LINE_AA, shift)
    if boxes is not None and k < len(boxes) and boxes[k] is not None:
      x1, y1, x2, y2 = (int(round(v)) for v in boxes[k])
      cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, max(1, int(radius)), cv2.LINE_AA)
  return canvas


def save_png(path: str, image_rgb: np.ndarray) -> str:
  """Writes an RGB uint8 image as PNG (cv2 expects BGR)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if not cv2.imwrite(path, np.ascontiguousarray(np.asarray(image_rgb)[..., ::-1])):
    raise OSError(f"could not write {path}")
  return path
