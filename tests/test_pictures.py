"""Pictures a person reads: annotated images and video frames draw the scheme's curves (open and
closed) as well as the points, and the CED plot keeps its legend off the curves and names the
data in its title."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest

from star_jax.training import model_store
from star_jax.training import plots
from star_jax.deploy import predict
from star_jax.deploy import tracking
from star_jax.deploy import video
from star_jax.core.schemes import Edge, get_spec
from star_jax.deploy.detection import Box

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT = os.path.join(ROOT, "tests", "fixtures", "official_wflw_small", "checkpoint.pkl")
PHOTO = os.path.join(ROOT, "tests", "fixtures", "official_wflw_data", "images",
                     "face_640x480.jpg")
GREEN = (0, 255, 0)  # the first face's colour (plots._FACE_COLOURS[0])

# Two curves on a black 200 x 200 picture: an open one (0, 1, 2) and a closed triangle
# (3, 4, 5), far enough apart that no segment crosses another.
POINTS = np.array([[20, 20], [100, 20], [100, 100], [140, 120], [180, 120], [160, 180]],
                  np.float64)
EDGES = (Edge("open", False, (0, 1, 2)), Edge("closed", True, (3, 4, 5)))


def _green(canvas: np.ndarray, x: float, y: float) -> bool:
  """Whether the 3 x 3 pixels around (x, y) hold a mostly green one."""
  x, y = int(round(x)), int(round(y))
  patch = canvas[y - 1:y + 2, x - 1:x + 2].astype(int)
  return bool(np.any((patch[..., 1] > 120) & (patch[..., 1] - np.maximum(patch[..., 0],
                                                                          patch[..., 2]) > 100)))


def _midpoint(points, a, b):
  return (points[a] + points[b]) / 2


def test_open_and_closed_curves_are_drawn():
  black = np.zeros((200, 200, 3), np.uint8)
  canvas = plots.draw_landmarks(black, [POINTS], edges=EDGES)
  for a, b in [(0, 1), (1, 2), (3, 4), (4, 5), (5, 3)]:
    assert _green(canvas, *_midpoint(POINTS, a, b)), (a, b)
  # The open curve does not close: nothing between its last and first points.
  assert not _green(canvas, *_midpoint(POINTS, 2, 0))
  # Without the scheme's edges only the points are drawn.
  dots = plots.draw_landmarks(black, [POINTS])
  assert not _green(dots, *_midpoint(POINTS, 0, 1)) and _green(dots, *POINTS[0])
  # A missing point (NaN) breaks its curve instead of drawing to a corner.
  holed = POINTS.copy()
  holed[1] = np.nan
  broken = plots.draw_landmarks(black, [holed], edges=EDGES)
  assert not _green(broken, *_midpoint(POINTS, 0, 1)) and not _green(broken, 0, 0)
  assert _green(broken, *_midpoint(POINTS, 3, 4))


def test_video_frames_draw_the_curves():
  face = tracking.TrackedFace(0, POINTS, POINTS, Box(10, 10, 190, 190), 0.9,
                              np.array([100.0, 100.0]), "track")
  frame = video.draw_tracked(np.zeros((200, 200, 3), np.uint8), [face], [POINTS], EDGES)
  assert _green(frame, *_midpoint(POINTS, 5, 3)) and not _green(frame, *_midpoint(POINTS, 2, 0))


def _far_segments(points: np.ndarray, edges, margin: float):
  """Segments of `edges` whose midpoint is at least `margin` px from every point."""
  out = []
  for edge in edges:
    ring = list(edge.points) + ([edge.points[0]] if edge.closed else [])
    for a, b in zip(ring[:-1], ring[1:]):
      middle = _midpoint(points, a, b)
      if np.min(np.linalg.norm(points - middle, axis=1)) >= margin:
        out.append((edge.name, middle))
  return out


@pytest.mark.parametrize("points, scheme", [(None, "wflw"), (68, "300w")])
def test_annotated_png_draws_the_layouts_curves(tmp_path, points, scheme):
  """The PNG of `star_jax.deploy.predict` draws the curves of the layout written (98 or, with
  `--points 68`, 300W's)."""
  predictor = predict.Predictor(model_store.load_model(CHECKPOINT), batch_size=1)
  image = cv2.imread(PHOTO)[:, :, ::-1]
  report, = predict.predict_files(predictor, [PHOTO], str(tmp_path), boxes=[Box(150, 60, 450,
                                                                              420)],
                                  num_points=points, progress=False)
  with open(report.json_path) as f:
    landmarks = np.asarray(json.load(f)["faces"][0]["landmarks"])
  spec = get_spec(scheme)
  assert landmarks.shape == (spec.num_points, 2)
  drawn = cv2.imread(report.png_path)[:, :, ::-1]
  segments = _far_segments(landmarks, spec.edges, margin=6.0)
  assert len(segments) >= 5
  for name, middle in segments:
    assert _green(drawn, *middle) and not _green(image, *middle), name


def test_ced_legend_below_the_curves_and_data_in_the_title():
  rng = np.random.default_rng(0)
  subsets = {"all": rng.uniform(0, 0.12, 50), "pose": rng.uniform(0, 0.1, 10),
             "blur": rng.uniform(0.02, 0.08, 10), "empty": np.zeros(0)}
  title = "CED on embedded synthetic faces test, test.tsv (wflw scheme)"
  fig = plots.ced_figure(subsets, 0.1, title=title)
  fig.canvas.draw()
  ax = fig.axes[0]
  legend = ax.get_legend()
  assert [t.get_text().split(" (")[0] for t in legend.get_texts()] == ["all", "pose", "blur"]
  # The whole legend lies below the plotting area, clear of every curve.
  assert legend.get_window_extent().y1 <= ax.get_window_extent().y0
  assert ax.get_title().replace("\n", " ") == title
  assert ax.get_xlim() == (0.0, 10.0)  # NME in % up to the threshold


def test_synthetic_data_are_named_as_such(tmp_path, monkeypatch):
  """The CED title of `eval.py` is the source's label: synthetic faces say so, not 'wflw'."""
  import ml_collections

  from star_jax.data import embedded, sources
  real = embedded.ensure_embedded_dataset
  monkeypatch.setattr(embedded, "ensure_embedded_dataset",
                      lambda cache_dir=None: real(str(tmp_path / "emb"), counts=(2, 0, 1)))
  source = sources.source_for(ml_collections.ConfigDict(
      {"dataset": "wflw", "data": {"source": "embedded", "embedded_dir": ""}}))
  label = source.label("test")
  assert label.startswith("embedded synthetic faces test, ") and "(wflw scheme)" in label
  assert label.split(", ")[1].split(" ")[0] == os.path.basename(
      source.annotations("test")[0].tsv_path)
