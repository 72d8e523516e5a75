"""The tracker's geometry against hand-computed values, with an oracle in place of the network.

The oracle returns the true landmarks of a clip's face (optionally moved or resized by a
transform), so each rule of `star_jax.deploy.tracking` is checked on its own: the next crop is the
training crop of the landmarks (`scale = 1.05 * max(w, h) / 200`, centre = box centre, the
official rule written out here, not read from the module), and the lost rules fire exactly
past their bounds.
"""

from __future__ import annotations

import numpy as np
import pytest

from star_jax.deploy import clips
from star_jax.core import schemes as datasets
from star_jax.deploy import detection
from star_jax.deploy import tracking
from star_jax.deploy.detection import Box
from star_jax.deploy.detection.boxes import iou


def test_iou_by_hand():
  a, b = Box(0, 0, 10, 10), Box(5, 5, 15, 15)
  assert iou(a, b) == pytest.approx(25 / 175)
  assert iou(a, Box(10, 0, 20, 10)) == 0.0            # touching edges share no area
  assert iou(a, Box(2, 2, 8, 8)) == pytest.approx(36 / 100)
  assert iou(a, a) == pytest.approx(1.0)


def _training_crop(points: np.ndarray) -> tuple[float, np.ndarray]:
  low, high = points.min(axis=0), points.max(axis=0)
  return 1.05 * float(np.max(high - low)) / 200.0, (low + high) / 2.0


@pytest.fixture(scope="module")
def moving_face():
  # Moves several pixels per frame, more than the crop's hysteresis, so every crop is renewed.
  return clips.moving_face_clip(12, faces=1, seed=4, size=(320, 240), face_side=90, motion=0.3)


class _Oracle:
  def __init__(self, clip, transform=None):
    self.clip, self.frame, self.transform = clip, 0, transform
    self.crops: list[list[tuple[float, np.ndarray]]] = []

  def landmarks(self, image, crops):
    self.crops.append([(float(s), np.array(c, np.float64)) for s, c in crops])
    points = self.clip.landmarks[self.frame][0].astype(np.float64)
    if self.transform is not None:
      points = self.transform(points, crops[0])
    return [points for _ in crops]

  def detect(self, image):
    return [Box.around(f) for f in self.clip.landmarks[self.frame]]


def _tracker(oracle, **config):
  return tracking.FaceTracker(
      oracle.landmarks, oracle.detect, lambda b: detection.box_to_crop(b, "landmarks"),
      config=tracking.TrackerConfig(redetect_every=1000, **config),
      smoothing=tracking.SmoothingConfig(enabled=False))


def test_next_crop_is_the_training_crop_of_the_previous_landmarks(moving_face):
  # Without the fill adaptation (below) a perfect network's next crop is exactly the training
  # crop of its previous landmarks.
  oracle = _Oracle(moving_face)
  tracker = _tracker(oracle, fill_adaptation=0.0)
  for t in range(len(moving_face.frames)):
    oracle.frame = t
    faces = tracker.update(moving_face.frames[t], t / 30)
    assert len(faces) == 1
  truth = moving_face.landmarks
  # Frame 0 reads the detection's crop, which is the training crop of the frame's own points.
  scale, centre = oracle.crops[0][0]
  expected = _training_crop(truth[0][0])
  assert scale == pytest.approx(expected[0], rel=1e-9)
  np.testing.assert_allclose(centre, expected[1], atol=1e-9)
  for t in range(1, len(moving_face.frames)):
    scale, centre = oracle.crops[t][0]
    expected = _training_crop(truth[t - 1][0])
    assert scale == pytest.approx(expected[0], rel=1e-9), t
    np.testing.assert_allclose(centre, expected[1], atol=1e-9, err_msg=f"frame {t}")


def _shrink(factor):
  def transform(points, crop):
    centre = points.mean(axis=0)
    return centre + (points - centre) * factor
  return transform


def _shift(crop_sides):
  def transform(points, crop):
    return points + np.array([crop_sides * crop[0] * 200.0, 0.0])
  return transform


@pytest.mark.parametrize("transform, lost", [
    # The landmark box over the crop side: 1/1.05 for a face in its training crop; lost below
    # lost_min_fill (0.55) or above lost_max_fill (1.35).
    (_shrink(0.60 * 1.05), False), (_shrink(0.50 * 1.05), True),
    (_shrink(1.30 * 1.05), False), (_shrink(1.40 * 1.05), True),
    # The box centre more than lost_max_shift (0.3) crop sides from the crop centre.
    (_shift(0.25), False), (_shift(0.35), True),
])
def test_lost_rules_fire_past_their_bounds(moving_face, transform, lost):
  oracle = _Oracle(moving_face)
  tracker = _tracker(oracle)
  oracle.frame = 0
  assert len(tracker.update(moving_face.frames[0], 0.0)) == 1
  oracle.frame, oracle.transform = 1, transform
  faces = tracker.update(moving_face.frames[1], 1 / 30)
  assert (faces == []) is lost
  assert tracker.tracks[0].lost is lost


def test_fill_adaptation_keeps_a_network_that_reads_faces_small_on_its_face(moving_face):
  # A network that reads every face 10 % smaller than it is, about its crop's centre (as small
  # models do): without adaptation each crop is 10 % smaller than the last until the face is
  # lost; with it the crop side settles.
  def small(points, crop):
    box = Box.around(points)
    factor = 0.9 * (crop[0] * 200 / 1.05) / box.size
    return np.asarray(crop[1]) + (points - np.asarray(box.center)) * factor
  sides = {}
  for rate in (0.0, 0.5):
    oracle = _Oracle(moving_face, transform=small)
    tracker = _tracker(oracle, fill_adaptation=rate)
    for t in range(len(moving_face.frames)):
      oracle.frame = t
      tracker.update(moving_face.frames[t], t / 30)
    sides[rate] = [c[0][0] * 200 for c in oracle.crops if c]
  truth = [Box.around(f[0]).size for f in moving_face.landmarks]
  assert min(sides[0.0]) < 0.75 * min(truth)                # shrinking until the face is lost
  assert 0.95 * min(truth) < min(sides[0.5]) and max(sides[0.5]) < 1.1 * max(truth)


def test_scattered_points_in_a_plausible_box_are_lost(moving_face):
  # A confused network: points strewn over the face's own box (so the box rules hold).
  rng = np.random.default_rng(0)

  def scatter(points, crop):
    box = Box.around(points)
    return np.column_stack([rng.uniform(box.x1, box.x2, len(points)),
                            rng.uniform(box.y1, box.y2, len(points))])
  edges = [(e.points, e.closed) for e in datasets.get_spec("wflw").edges]
  for transform, lost in ((None, False), (scatter, True)):
    oracle = _Oracle(moving_face)
    tracker = tracking.FaceTracker(
        oracle.landmarks, oracle.detect, lambda b: detection.box_to_crop(b, "landmarks"),
        config=tracking.TrackerConfig(redetect_every=1000), edges=edges)
    oracle.frame = 0
    assert len(tracker.update(moving_face.frames[0], 0.0)) == 1
    oracle.frame, oracle.transform = 1, transform
    assert (tracker.update(moving_face.frames[1], 1 / 30) == []) is lost


def test_mean_segment_of_a_hand_made_shape():
  # A unit square drawn as one closed edge: 4 segments of length 1 over a box side of 1; as an
  # open edge 3 segments; a second, open edge of one diagonal adds sqrt(2).
  square = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], np.float64)
  closed = tracking._edge_segments([((0, 1, 2, 3), True)])
  assert tracking.mean_segment(square, closed) == pytest.approx(1.0)
  both = tracking._edge_segments([((0, 1, 2, 3), False), ((0, 2), False)])
  assert tracking.mean_segment(square, both) == pytest.approx((3 + np.sqrt(2)) / 4)
