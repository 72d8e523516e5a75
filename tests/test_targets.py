"""Point maps and edge maps against the official encoder (fixture) and independent references."""

import os

import cv2
import numpy as np
import pytest

from star_jax.data import targets
from star_jax.core.schemes import get_spec

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "official_wflw_data")
WFLW = get_spec("wflw")
# Stated tolerance: float32 rounding only (the separable Gaussian, the summation order).
TOL = 1e-6


@pytest.fixture(scope="module")
def expected():
  return np.load(os.path.join(FIXTURE, "dataset_eval_expected.npz"))


def _bilinear_down4(maps):
  """torch-style bilinear /4 with align_corners=False: mean of rows/cols 4r+1, 4r+2."""
  return 0.25 * (maps[..., 1::4, 1::4] + maps[..., 1::4, 2::4] + maps[..., 2::4, 1::4]
                 + maps[..., 2::4, 2::4])


def _reference_point_map(p, size=256, sigma=1.5):
  """Direct transcription of the documented rendering, one point, full resolution first."""
  m = np.zeros((size, size), np.float32)
  x, y = (min(max(float(v), 0.0), size - 1) for v in p)
  r = 3 * sigma
  ul = [int(x - r), int(y - r)]
  br = [int(x + r + 1), int(y + r + 1)]
  n = int(np.ceil(2 * r + 1))
  c = (2 * r + 1) // 2
  for j in range(n):
    for i in range(n):
      px, py = ul[0] + i, ul[1] + j
      if 0 <= px < min(br[0], size) and 0 <= py < min(br[1], size):
        m[py, px] = np.exp(-((i - c) ** 2 + (j - c) ** 2) / (2 * sigma ** 2))
  return _bilinear_down4(m)


def _reference_edge_map(curve, closed, size=256):
  """The documented edge rendering on the full 4x canvas."""
  curve = np.clip(curve, 0, size - 1)
  canvas = np.zeros((4 * size, 4 * size), np.float32)
  cv2.polylines(canvas, [(curve * 4 + 0.5).astype(np.int32)], closed, 255, 4, cv2.LINE_AA)
  down = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA) / 255.0
  return _bilinear_down4(down.astype(np.float32))


def test_point_maps_match_official(expected):
  for row in range(3):
    maps = targets.point_maps(expected["landmarks_crop_px"][row], 256)
    assert maps.shape == (64, 64, 98) and maps.dtype == np.float32
    np.testing.assert_allclose(maps.transpose(2, 0, 1), expected["pointmaps"][row], atol=TOL,
                               rtol=0)


def test_edge_maps_match_official(expected):
  for row in range(3):
    maps = targets.edge_maps(expected["landmarks_crop_px"][row], WFLW, 256)
    assert maps.shape == (64, 64, 9) and maps.dtype == np.float32
    np.testing.assert_allclose(maps.transpose(2, 0, 1), expected["edgemaps"][row], atol=TOL,
                               rtol=0)


def _float_canvas_edge_map(curve, closed, size):
  """One edge map drawn as the official: full float32 canvas upsampled x4 with INTER_AREA,
  LINE_AA stroke of 255 (thickness 4), INTER_AREA back, /255, bilinear x4 (align_corners=False:
  the mean of rows {4r+1, 4r+2} and columns {4c+1, 4c+2})."""
  canvas = cv2.resize(np.zeros((size, size), np.float32), (4 * size, 4 * size),
                      interpolation=cv2.INTER_AREA)
  curve = np.clip(curve, 0, size - 1)
  cv2.polylines(canvas, [(curve * 4 + 0.5).astype(np.int32)], closed, 255, 4, cv2.LINE_AA)
  crop = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA) / np.float32(255.0)
  rows = (crop[1::4] + crop[2::4]) * np.float32(0.5)
  return (rows[:, 1::4] + rows[:, 2::4]) * np.float32(0.5)


def test_edge_maps_equal_the_float_canvas_drawing_bit_for_bit(expected):
  rng = np.random.default_rng(3)
  for row in range(3):
    for jitter in (0.0, 2.0, 25.0):
      points = expected["landmarks_crop_px"][row] + rng.normal(0, jitter, (98, 2))
      maps = targets.edge_maps(points, WFLW, 256)
      for e, edge in enumerate(WFLW.edges):
        curve = targets.fit_curve(points[list(edge.points)], edge.closed, edge.name)
        np.testing.assert_array_equal(maps[..., e],
                                      _float_canvas_edge_map(curve, edge.closed, 256))


def test_point_maps_quirks_against_reference():
  # Interior, sub-4.5 (int() truncation moves the window), border, outside (clipped) points.
  points = np.array([[100.3, 57.8], [3.7, 4.2], [0.2, 255.0], [-20.0, 300.0], [4.49, 4.51],
                     [255.0, 0.0], [128.5, 128.5], [251.1, 3.9]], np.float32)
  maps = targets.point_maps(points, 256)
  for n, p in enumerate(points):
    np.testing.assert_allclose(maps[..., n], _reference_point_map(p), atol=TOL, rtol=0)
  # Peak at ul + 5, not at p: for x = 3.7, ul = int(-0.8) = 0 (floor would give -1), so the
  # full-resolution peak is column 5 and output column 1 averages columns 5 and 6.
  x_profile = targets.downsampled_profiles(points[1:2], 256, 1.5)[0, 0]
  np.testing.assert_allclose(x_profile[1], (1 + np.exp(-1 / 4.5)) / 2, rtol=1e-6)


def test_point_maps_other_size_and_sigma():
  points = np.array([[10.2, 50.7], [2.0, 120.0]], np.float32)
  maps = targets.point_maps(points, 128, sigma=1.0)
  for n, p in enumerate(points):
    np.testing.assert_allclose(maps[..., n], _reference_point_map(p, 128, 1.0), atol=TOL)


def test_edge_maps_against_full_canvas_reference():
  rng = np.random.default_rng(3)
  for trial in range(6):
    # Random smooth-ish curves, some running over the crop border.
    base = rng.uniform(-30, 285, 2)
    steps = rng.normal(0, 12, (9, 2)).cumsum(0)
    pts = (base + steps).astype(np.float32)
    closed = bool(trial % 2)
    curve = targets.fit_curve(pts, closed)
    out = np.zeros((64, 64, 1), np.float32)
    targets._draw_edge(out, 0, curve, closed, 256)
    np.testing.assert_allclose(out[..., 0], _reference_edge_map(curve, closed), atol=TOL)


def test_spline_matches_scipy_definition():
  from scipy import interpolate
  pts = np.array([[10, 10], [30, 5], [50, 12], [60, 30], [45, 50]], np.float32)
  for closed in (False, True):
    x, y = pts[:, 0].astype(float), pts[:, 1].astype(float)
    if closed:
      x, y = np.append(x, x[0]), np.append(y, y[0])
    tck, u = interpolate.splprep([x, y], s=0, per=closed, k=3)
    params = np.concatenate([np.linspace(u[i], u[i + 1], 5, endpoint=False)
                             for i in range(len(u) - 1)] + ([] if closed else [[u[-1]]]))
    ref = np.stack(interpolate.splev(params, tck), -1)
    np.testing.assert_allclose(targets.fit_curve(pts, closed), ref, atol=1e-9)
    # An interpolating spline passes through every point.
    np.testing.assert_allclose(ref[::5][:len(pts)], pts, atol=1e-4)


def test_failed_fit_falls_back_to_points_and_is_counted():
  targets.reset_curve_fit_fallbacks()
  pts = np.array([[10, 10], [10, 10], [20, 20]], np.float32)   # too few points for k=3
  curve = targets.fit_curve(pts, False, "nose_bridge")
  np.testing.assert_array_equal(curve, pts)
  assert targets.curve_fit_fallbacks() == {"nose_bridge": 1}
  out = np.zeros((64, 64, 1), np.float32)
  targets._draw_edge(out, 0, curve, False, 256)
  np.testing.assert_allclose(out[..., 0], _reference_edge_map(pts, False), atol=TOL)
  targets.reset_curve_fit_fallbacks()
