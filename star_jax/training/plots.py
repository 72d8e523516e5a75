"""Pictures: cumulative error distribution curves and images annotated with landmarks.

Plots are drawn on matplotlib's Agg canvas directly, so no display is needed.
"""

from __future__ import annotations

import os
import textwrap
from typing import Mapping, Sequence

import cv2
import numpy as np

from star_jax.core import metrics as metrics_lib

# Colours (RGB) cycled over faces in annotated images.
_FACE_COLOURS = ((0, 255, 0), (255, 64, 64), (64, 160, 255), (255, 200, 0), (255, 0, 255))


def ced_figure(nmes_by_subset: Mapping[str, np.ndarray], threshold: float, *,
               title: str = "", even_rule: str = "average"):
  """The cumulative error distribution (one line per non-empty subset) as a matplotlib Figure.

  The x axis is NME (%) up to `threshold`, the y axis the fraction of images with an NME at most
  x; each legend entry carries the subset's mean NME and AUC. The legend sits below the axes,
  so it never hides a curve, and the title (the data the errors were computed on) wraps.
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
    ax.plot(100 * np.asarray(xs), ys, label=f"{name} (n={nmes.size}, NME "
                                             f"{100 * nmes.mean():.2f}%, AUC {auc:.4f})")
  ax.set_xlim(0, 100 * threshold)
  ax.set_ylim(0, 1)
  ax.set_xlabel("NME (%)")
  ax.set_ylabel("fraction of images")
  ax.grid(True, alpha=0.3)
  ax.set_title(textwrap.fill(title or f"Cumulative error distribution (threshold "
                                      f"{threshold:g})", 70), fontsize=10)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize=8, frameon=False,
              ncol=1)
  return fig


def plot_ced(nmes_by_subset: Mapping[str, np.ndarray], threshold: float, path: str, *,
             title: str = "", even_rule: str = "average") -> str:
  """Writes `ced_figure(...)` to `path` (PNG), the legend below the axes included."""
  fig = ced_figure(nmes_by_subset, threshold, title=title, even_rule=even_rule)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, bbox_inches="tight")
  return path


def _curve_runs(points: np.ndarray, edge) -> list[np.ndarray]:
  """The stretches of `edge` (closed ones back to their first point) whose points are all
  finite and in range, as lists of (x, y)."""
  indices = list(edge.points) + ([edge.points[0]] if edge.closed and len(edge.points) > 2 else [])
  runs, run = [], []
  for i in indices + [-1]:  # -1 ends the last run
    if 0 <= i < len(points) and np.all(np.isfinite(points[i])):
      run.append(points[i])
      continue
    if len(run) >= 2:
      runs.append(np.asarray(run))
    run = []
  return runs


def draw_landmarks(image_rgb: np.ndarray, faces: Sequence[np.ndarray],
                   boxes: Sequence[Sequence[float] | None] | None = None,
                   edges: Sequence = ()) -> np.ndarray:
  """A copy of `image_rgb` with each face's curves, points (and its box, when given) on it.

  `edges` are the scheme's curves (`datasets.Edge`: open ones as polylines, closed ones back to
  their first point; the web page draws the same), for the layout of the points given.
  Dot radius and line width follow the face size, so small and large faces both stay legible.
  """
  canvas = np.ascontiguousarray(np.asarray(image_rgb, np.uint8)[..., :3]).copy()
  shift = 4  # sub-pixel precision of cv2 drawing (coordinates x 16)
  for k, points in enumerate(faces):
    colour = _FACE_COLOURS[k % len(_FACE_COLOURS)]
    points = np.asarray(points, np.float64).reshape(-1, 2)
    finite = points[np.all(np.isfinite(points), axis=1)]
    extent = float(np.max(np.ptp(finite, axis=0))) if len(finite) else 0.0
    radius = max(1.0, extent / 120.0)
    curves = [np.round(run * (1 << shift)).astype(np.int32)
              for edge in edges for run in _curve_runs(points, edge)]
    if curves:
      cv2.polylines(canvas, curves, False, colour, max(1, int(round(extent / 200.0))),
                    cv2.LINE_AA, shift)
    for x, y in finite:
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
