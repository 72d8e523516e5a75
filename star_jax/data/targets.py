"""Training targets of the AAM heads: Gaussian point maps and edge (boundary) maps, on the host.

Both equal the official encoder (lib/dataset/encoder/encoder_default.py and the edge map of
lib/dataset/alignmentDataset.py), which renders at the crop resolution S and downsamples x4 with
bilinear interpolation (align_corners=False: output pixel (r, c) is the mean of source rows
{4r+1, 4r+2} and columns {4c+1, 4c+2}). They are computed more cheaply here:

* Point maps. The official map of a point p (clipped to [0, S-1]) is a 10x10 window (sigma 1.5:
  3 sigma = 4.5) starting at `ul = int(p - 4.5)` (truncation toward zero, not floor), holding
  `exp(-((i-5)^2 + (j-5)^2) / (2 sigma^2))`: the peak sits at pixel `ul + 5`, not at p. The
  window is a product of an x and a y profile and the x4 downsample averages rows and columns
  separately, so the 64x64 map is the outer product of two downsampled 1-D profiles. Equal to
  the official maps within 1e-6 (float32 rounding of exp(a)exp(b) vs exp(a+b)).
* Edge maps. Per edge: an interpolating cubic spline through the edge's points (periodic for
  closed edges; `scipy.interpolate.splprep(s=0, k=3)`), evaluated 5 times per parameter
  interval, clipped to [0, S-1], drawn with `cv2.polylines` (value 255, thickness 4) on a 4x
  float32 canvas, reduced with INTER_AREA, /255, then the x4 bilinear downsample. Here only a
  uint8 canvas around the curve's bounding box is drawn, aligned to 16 canvas pixels (one
  output pixel), and the drawn pixels each output pixel averages are counted (exact: see
  `_draw_edge`); the result equals the official maps within 1e-6. If the spline fit fails
  (fewer than 4 distinct points, repeated consecutive points), the raw points are drawn as the
  official does - counted per edge in `curve_fit_fallbacks()` and logged once per edge, rather
  than silently.
"""

from __future__ import annotations

import collections
import logging
import threading

import cv2
import numpy as np
from scipy import interpolate

from star_jax.core.schemes import DatasetSpec

# The official encoder renders at the crop size and downsamples by this factor.
HEATMAP_STRIDE = 4
# Edge maps are drawn on a canvas this many times finer than the crop.
EDGE_SUPERSAMPLE = 4
EDGE_THICKNESS = 1          # at crop resolution; drawn as thickness * EDGE_SUPERSAMPLE
CURVE_DENSITY = 5           # spline samples per parameter interval
# Canvas margin around a curve's vertices (4x pixels): covers the thick stroke.
_EDGE_MARGIN = 8

_log = logging.getLogger(__name__)
_fallback_lock = threading.Lock()
_fallbacks: collections.Counter = collections.Counter()


def curve_fit_fallbacks() -> dict[str, int]:
  """How many edge curves (by edge name) were drawn from raw points because the fit failed."""
  with _fallback_lock:
    return dict(_fallbacks)


def reset_curve_fit_fallbacks() -> None:
  with _fallback_lock:
    _fallbacks.clear()


def _window_table(sigma: float) -> tuple[np.ndarray, float, float]:
  """The official 1-D window values `exp(-(i - c)^2 / (2 sigma^2))`, float32, plus a 0 entry."""
  size = 2 * (sigma * 3) + 1
  i = np.arange(0, size, 1, np.float32)             # np.arange(0, size, 1) as the official
  d = i - np.float32(size // 2)
  g = np.exp(-(d * d) / np.float32(2 * sigma ** 2)).astype(np.float32)
  return np.append(g, np.float32(0)), len(i), sigma * 3


def downsampled_profiles(points_px: np.ndarray, image_size: int, sigma: float) -> np.ndarray:
  """Per point and axis, the official window profile reduced x4: (N, 2, S/4) float32.

  Only the two source pixels each output pixel averages are looked up in the window table.
  """
  table, length, radius = _window_table(sigma)
  p = np.clip(points_px.astype(np.float32), 0, image_size - 1)
  # Python int() truncates toward zero: float32 arithmetic as the official's numpy scalars.
  ul = np.trunc(p - np.float32(radius)).astype(np.int64)                  # (N, 2)
  br = np.trunc(p + np.float32(radius) + np.float32(1)).astype(np.int64)
  lo = HEATMAP_STRIDE // 2 - 1
  k = np.arange(image_size // HEATMAP_STRIDE, dtype=np.int64) * HEATMAP_STRIDE + lo
  k = np.stack([k, k + 1])                                                 # (2, S/4)
  rel = k[None, None] - ul[:, :, None, None]                               # (N, 2, 2, S/4)
  outside = (rel < 0) | (rel >= length) | (k[None, None] >= br[:, :, None, None])
  vals = table[np.where(outside, length, rel)]
  return (vals[:, :, 0] + vals[:, :, 1]) * np.float32(0.5)


def point_maps(points_px: np.ndarray, image_size: int, sigma: float = 1.5) -> np.ndarray:
  """(N, 2) crop-pixel landmarks -> (S/4, S/4, N) float32 Gaussian point maps (official)."""
  prof = downsampled_profiles(points_px, image_size, sigma)
  px = np.ascontiguousarray(prof[:, 0, :].T)      # (S/4, N)
  py = np.ascontiguousarray(prof[:, 1, :].T)
  return py[:, None, :] * px[None, :, :]


def fit_curve(points: np.ndarray, closed: bool, name: str = "edge") -> np.ndarray:
  """The official dense curve through `points`: spline samples, or the points if the fit fails."""
  x = points[:, 0].astype(np.float64)
  y = points[:, 1].astype(np.float64)
  if closed:
    x = np.append(x, x[0])
    y = np.append(y, y[0])
  try:
    tck, u = interpolate.splprep([x, y], s=0, per=closed, k=3)
    starts = u[:-1, None]
    # np.linspace(u[i], u[i+1], density, endpoint=False), vectorised with its rounding.
    steps = np.arange(CURVE_DENSITY)[None, :] * ((u[1:] - u[:-1]) / CURVE_DENSITY)[:, None]
    params = (starts + steps).ravel()
    if not closed:
      params = np.append(params, u[-1])
    cx, cy = interpolate.splev(params, tck, der=0)
    curve = np.stack([cx, cy], axis=-1)
    if not np.all(np.isfinite(curve)):
      raise ValueError("non-finite spline")
    return curve
  except Exception as e:
    with _fallback_lock:
      first = _fallbacks[name] == 0
      _fallbacks[name] += 1
    if first:
      _log.warning("spline fit failed for edge %r (%s: %s); drawing its raw points instead "
                   "(counted in star_jax.data.targets.curve_fit_fallbacks())", name,
                   type(e).__name__, e)
    return points


def _draw_edge(out: np.ndarray, channel: int, curve: np.ndarray, closed: bool,
               image_size: int) -> None:
  """Renders one curve into `out[..., channel]` (S/4, S/4) as the official, locally.

  OpenCV draws anti-aliased lines on 8-bit images only: on the official float32 canvas
  `cv2.LINE_AA` is drawn as an 8-connected line, every pixel exactly 0 or 255. The INTER_AREA x4
  reduction, /255 and the bilinear x4 downsample are then exact in float32: each output pixel is
  (the number of drawn canvas pixels in the 8x8 block its two crop rows and columns cover) / 64.
  So the stroke is drawn with LINE_8 on a uint8 canvas and those blocks are counted: the same
  values bit for bit, without the float canvas or the resize.
  """
  sup = EDGE_SUPERSAMPLE
  curve = np.clip(curve, 0, image_size - 1)
  verts = (curve * sup + 0.5).astype(np.int32)
  # One output pixel is HEATMAP_STRIDE * sup canvas pixels: align the local canvas to it.
  block = HEATMAP_STRIDE * sup
  full = image_size * sup
  x0 = max(0, (int(verts[:, 0].min()) - _EDGE_MARGIN) // block * block)
  y0 = max(0, (int(verts[:, 1].min()) - _EDGE_MARGIN) // block * block)
  x1 = min(full, -(-(int(verts[:, 0].max()) + _EDGE_MARGIN + 1) // block) * block)
  y1 = min(full, -(-(int(verts[:, 1].max()) + _EDGE_MARGIN + 1) // block) * block)
  canvas = np.zeros((y1 - y0, x1 - x0), np.uint8)
  cv2.polylines(canvas, [verts - np.array([x0, y0], np.int32)], closed, 1,
                EDGE_THICKNESS * sup, cv2.LINE_8)
  # Crop pixels HEATMAP_STRIDE/2 - 1 and HEATMAP_STRIDE/2 of each output pixel, in canvas pixels.
  lo = (HEATMAP_STRIDE // 2 - 1) * sup
  span = 2 * sup
  rows, cols = (y1 - y0) // block, (x1 - x0) // block
  # Rows first (contiguous, vectorised), then the few columns; counts <= 64 fit uint8.
  row_sums = canvas.reshape(rows, block, cols * block)[:, lo:lo + span].sum(axis=1,
                                                                            dtype=np.uint8)
  counts = row_sums.reshape(rows, cols, block)[:, :, lo:lo + span].sum(axis=2, dtype=np.uint8)
  out[y0 // block:y1 // block, x0 // block:x1 // block, channel] = (
      counts.astype(np.float32) * np.float32(1.0 / (span * span)))


def edge_maps(points_px: np.ndarray, spec: DatasetSpec, image_size: int) -> np.ndarray:
  """(N, 2) crop-pixel landmarks -> (S/4, S/4, E) float32 edge maps (official)."""
  size = image_size // HEATMAP_STRIDE
  out = np.zeros((size, size, spec.num_edges), np.float32)
  for e, edge in enumerate(spec.edges):
    curve = fit_curve(points_px[list(edge.points)], edge.closed, edge.name)
    _draw_edge(out, e, curve, edge.closed, image_size)
  return out


def targets(points_px: np.ndarray, spec: DatasetSpec, image_size: int,
            sigma: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
  """(point maps, edge maps) for one example, channels-last at S/4."""
  return point_maps(points_px, image_size, sigma), edge_maps(points_px, spec, image_size)
