"""Faces across video frames: tracking from the previous landmarks, re-detection, smoothing.

Imports neither JAX nor TensorFlow: the network is reached through a callable, so a runtime
without JAX can drive the same tracker.

Per frame (`FaceTracker.update`):
1. Every track proposes its crop from its previous landmarks (the smoothed ones when smoothing
   is on): centred on their bounding box, with side `box side / fill`. `fill` starts at the
   training crop's 1/1.05 (so the first proposal is the training crop) and then moves, by
   `fill_adaptation` of the difference per frame (within `fill_range`), to how much of its
   crop the network's landmark box actually fills. Without it a network that reads faces 10 %
   small (small models do, and they also place faces near the crop centre whatever the crop)
   shrinks its next crop by 10 %, frame after frame, until it loses the face; with it the size
   follows the changes the network sees, and the detector corrects what remains (step 2).
   A crop that moved by less than `crop_hysteresis` of its side (and changed size by less than
   that) is kept as it was, so a still face is read through the same crop and its landmarks do
   not feed their own noise back.
2. The detector runs on the first frame, every `redetect_every` frames, on any frame after a
   track was lost, and on every frame while there is no track. Its boxes become crops with the
   detector's calibrated rule and are matched to tracks by the IoU of the crop squares (greedy,
   best first, at least `match_iou`): a matched track keeps its id and its own crop, unless it
   was lost or its crop drifted from the detection's (sides differing by more than
   `reseed_scale` times, or centres by more than `reseed_shift` crop sides), in which case it
   restarts from the detection's crop (a track that follows its own landmarks drifts off the
   face when the network reads the crop rather than the face; while it drifts, the loop also
   magnifies tiny differences between two engines running the same model: see
   benchmarks/RESULTS.md, "Tracking: JAX vs ONNX Runtime"); an unmatched box starts a new
   track (new id); a track that no detection has matched `max_missed_detections` times in a
   row is ended (the detector is the authority on whether a face is still there).
3. The network reads all crops of the frame in one call.
4. A track *looks lost* when its new landmarks do not look like a face in that crop: the
   landmark box's longer side is outside `[lost_min_fill, lost_max_fill]` of the crop side (a
   face read in its training crop fills 1/1.05 = 0.95 of it; a network shown background
   returns points collapsed towards the middle, or spread to the borders), or its centre left
   the crop's middle (`lost_max_shift` crop sides from the crop centre). A lost track is not
   reported for the frame and forces a detection on the next one, where a matching box
   re-seeds it under the same id; without one it ends. Two tracks whose landmark boxes overlap
   by more than `duplicate_overlap` of the smaller are one face: the larger box is kept, under
   the older id.
5. Smoothing: a One-Euro filter (Casiez et al., CHI 2012) per track on all landmark
   coordinates, each point with its own cutoff `min_cutoff + beta * speed` (a mouth that opens
   is followed quickly while the still rest of the face stays steady). Speeds are in face sizes
   per second (the landmark box's longer side), so one setting serves small and large faces.
   `SmoothingConfig(enabled=False)` reports the raw landmarks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from star_jax.deploy.detection.boxes import (TRAINING_MARGIN, Box, crop_box, iou,
                                      overlap_of_smaller)

# A face in its training crop: the landmark box's longer side is 1/1.05 of the crop side.
TRAINING_FILL = 1.0 / TRAINING_MARGIN

# (image, [(scale, centre)]) -> [(N, 2) landmarks in image pixels]
LandmarksFn = Callable[[np.ndarray, Sequence[tuple[float, np.ndarray]]], list[np.ndarray]]
DetectFn = Callable[[np.ndarray], list[Box]]
BoxToCrop = Callable[[Box], tuple[float, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class SmoothingConfig:
  enabled: bool = True
  min_cutoff: float = 0.3    # Hz: the cutoff of a still face (lower: steadier, more lag)
  beta: float = 4.0          # Hz per (face size / s): how fast the cutoff opens with motion
  d_cutoff: float = 1.0      # Hz: the cutoff of the speed estimate


@dataclasses.dataclass(frozen=True)
class TrackerConfig:
  redetect_every: int = 10
  match_iou: float = 0.3
  max_missed_detections: int = 2
  lost_min_fill: float = 0.55
  lost_max_fill: float = 1.35
  lost_max_shift: float = 0.3
  lost_max_drift: float = 1.6
  lost_max_segment: float = 0.25
  reseed_scale: float = 1.3
  reseed_shift: float = 0.2
  duplicate_overlap: float = 0.6
  fill_adaptation: float = 0.5
  fill_range: tuple[float, float] = (0.7, 1.0)
  crop_hysteresis: float = 0.02
  max_faces: int = 0              # 0: no limit; else the largest faces are kept

  def __post_init__(self):
    if self.redetect_every < 1:
      raise ValueError(f"redetect_every must be at least 1, got {self.redetect_every}")
    if self.max_missed_detections < 1:
      raise ValueError("max_missed_detections must be at least 1")


class OneEuroFilter:
  """The One-Euro filter on an array of points (..., 2), with speeds normalised by `size`.

  As in the paper, the derivative (per point, a 2-vector) is low-pass filtered at `d_cutoff`
  before its magnitude sets the cutoff, so pixel noise opens the filter little.
  """

  def __init__(self, config: SmoothingConfig):
    self.config = config
    self.value: np.ndarray | None = None
    self.derivative: np.ndarray | None = None
    self.time: float | None = None

  @staticmethod
  def _alpha(cutoff: np.ndarray | float, dt: float) -> np.ndarray | float:
    tau = 1.0 / (2.0 * math.pi * cutoff)
    return 1.0 / (1.0 + tau / dt)

  def __call__(self, value: np.ndarray, time_s: float, size: float) -> np.ndarray:
    value = np.asarray(value, np.float64)
    if self.value is None or self.derivative is None or self.time is None:
      self.value, self.derivative, self.time = value.copy(), np.zeros_like(value), time_s
      return self.value.copy()
    dt = time_s - self.time
    if dt <= 0:  # a clock that did not advance (e.g. a camera without timestamps)
      dt = 1.0 / 30.0
      time_s = self.time + dt
    a_d = self._alpha(self.config.d_cutoff, dt)
    self.derivative = a_d * (value - self.value) / dt + (1.0 - a_d) * self.derivative
    speed = np.linalg.norm(self.derivative, axis=-1) / max(size, 1e-6)
    cutoff = self.config.min_cutoff + self.config.beta * speed
    a = self._alpha(cutoff, dt)[..., None]
    self.value = a * value + (1.0 - a) * self.value
    self.time = time_s
    return self.value.copy()


@dataclasses.dataclass
class TrackedFace:
  """One face in one frame."""

  id: int
  landmarks: np.ndarray        # (N, 2) reported (smoothed when smoothing is on), pixels
  raw_landmarks: np.ndarray    # (N, 2) the network's output
  box: Box                     # the crop square the network read
  scale: float
  center: np.ndarray
  source: str                  # 'detector' (crop from a detection) or 'track'


@dataclasses.dataclass
class _Track:
  id: int
  crop: tuple[float, np.ndarray]
  landmarks: np.ndarray | None = None
  smoothed: np.ndarray | None = None
  filter: OneEuroFilter | None = None
  missed: int = 0
  lost: bool = False
  seeded_by_detection: bool = True
  reference: tuple[float, np.ndarray] | None = None   # the crop of the last matching detection
  fill: float = TRAINING_FILL   # expected landmark-box side over crop side (see the docstring)


def _edge_segments(edges: Sequence[tuple[Sequence[int], bool]]) -> np.ndarray:
  """(S, 2) index pairs of consecutive points along each edge (closing the closed ones)."""
  pairs = []
  for points, closed in edges:
    points = list(points)
    pairs += list(zip(points[:-1], points[1:]))
    if closed and len(points) > 2:
      pairs.append((points[-1], points[0]))
  return np.asarray(pairs, np.int64).reshape(-1, 2)


def mean_segment(landmarks: np.ndarray, segments: np.ndarray) -> float:
  """The mean length of the edge segments over the landmark box's longer side."""
  side = max(Box.around(landmarks).size, 1e-9)
  lengths = np.linalg.norm(landmarks[segments[:, 0]] - landmarks[segments[:, 1]], axis=1)
  return float(lengths.mean() / side)


def _crop_changed(old: tuple[float, np.ndarray], new: tuple[float, np.ndarray],
                  tolerance: float) -> bool:
  side = old[0] * 200.0
  return (abs(new[0] / old[0] - 1.0) > tolerance
          or float(np.max(np.abs(new[1] - old[1]))) > tolerance * side)


class FaceTracker:
  """Stateful: feed frames in order with `update(frame_rgb, time_s)`."""

  def __init__(self, landmarks_fn: LandmarksFn, detect_fn: DetectFn, box_to_crop: BoxToCrop, *,
               config: TrackerConfig = TrackerConfig(),
               smoothing: SmoothingConfig = SmoothingConfig(),
               edges: Sequence[tuple[Sequence[int], bool]] = ()):
    """`edges`: the scheme's curves as (point indices, closed); without them the scattered-
    points rule is off."""
    self.landmarks_fn = landmarks_fn
    self._segments = _edge_segments(edges)
    self.detect_fn = detect_fn
    self.box_to_crop = box_to_crop
    self.config = config
    self.smoothing = smoothing
    self.tracks: list[_Track] = []
    self.frame_index = -1
    self._last_detection = None
    self._next_id = 0
    self.detections_run = 0

  def reset(self) -> None:
    self.tracks = []
    self.frame_index = -1
    self._last_detection = None

  def _needs_detection(self) -> bool:
    if not self.tracks or self._last_detection is None:
      return True
    if any(t.lost for t in self.tracks):
      return True
    return self.frame_index - self._last_detection >= self.config.redetect_every

  def _new_track(self, crop) -> _Track:
    track = _Track(self._next_id, crop, reference=crop)
    self._next_id += 1
    return track

  def _detect_and_match(self, frame: np.ndarray) -> None:
    self.detections_run += 1
    self._last_detection = self.frame_index
    crops = []
    for crop in sorted((self.box_to_crop(b) for b in self.detect_fn(frame)),
                       key=lambda c: -c[0]):
      # A detection mostly inside a larger one (e.g. on the upper half of a face) is the same
      # face.
      if all(overlap_of_smaller(crop_box(*crop), crop_box(*k)) <= self.config.duplicate_overlap
             for k in crops):
        crops.append(crop)
    pairs = []
    for ti, track in enumerate(self.tracks):
      square = crop_box(*track.crop)
      for di, crop in enumerate(crops):
        overlap = iou(square, crop_box(*crop))
        if overlap >= self.config.match_iou:
          pairs.append((overlap, ti, di))
    matched_tracks, matched_dets = set(), set()
    for _, ti, di in sorted(pairs, reverse=True):
      if ti in matched_tracks or di in matched_dets:
        continue
      matched_tracks.add(ti)
      matched_dets.add(di)
      track = self.tracks[ti]
      track.missed = 0
      track.reference = crops[di]
      scale_ratio = track.crop[0] / crops[di][0]
      shift = float(np.max(np.abs(track.crop[1] - crops[di][1]))) / (crops[di][0] * 200.0)
      if (track.lost or not 1 / self.config.reseed_scale <= scale_ratio <= self.config.reseed_scale
          or shift > self.config.reseed_shift):
        # Lost, or drifted from where the detector sees the face: re-seeded from the detection
        # (same id); the filter restarts there.
        track.crop, track.lost, track.seeded_by_detection = crops[di], False, True
        track.filter, track.fill = None, TRAINING_FILL
    kept = []
    for ti, track in enumerate(self.tracks):
      if ti not in matched_tracks:
        track.missed += 1
        if track.lost or track.missed >= self.config.max_missed_detections:
          continue
      kept.append(track)
    self.tracks = kept
    for di, crop in enumerate(crops):
      if di not in matched_dets:
        self.tracks.append(self._new_track(crop))

  def _looks_lost(self, landmarks: np.ndarray, track: _Track) -> bool:
    if not np.all(np.isfinite(landmarks)):
      return True
    box = Box.around(landmarks)
    side = track.crop[0] * 200.0
    fill = box.size / side
    shift = np.max(np.abs(np.array(box.center) - track.crop[1])) / side
    if (fill < self.config.lost_min_fill or fill > self.config.lost_max_fill
        or shift > self.config.lost_max_shift):
      return True
    if len(self._segments) and (mean_segment(landmarks, self._segments)
                                > self.config.lost_max_segment):
      return True
    # A face read from its own landmarks can shrink or grow frame by frame (each crop a little
    # off in the same direction); the detector's last crop bounds how far.
    if track.reference is not None:
      drift = (box.size * 1.05) / (track.reference[0] * 200.0)
      if not 1 / self.config.lost_max_drift <= drift <= self.config.lost_max_drift:
        return True
    return False

  def update(self, frame_rgb: np.ndarray, time_s: float) -> list[TrackedFace]:
    """Faces of the next frame (`time_s`: its time in seconds, increasing)."""
    self.frame_index += 1
    for track in self.tracks:
      if track.landmarks is not None and not track.lost:
        basis = Box.around(track.smoothed if track.smoothed is not None else track.landmarks)
        proposal = (basis.size / track.fill / 200.0, np.array(basis.center, np.float64))
        if _crop_changed(track.crop, proposal, self.config.crop_hysteresis):
          track.crop = proposal
        track.seeded_by_detection = False
    if self._needs_detection():
      self._detect_and_match(frame_rgb)
    active = [t for t in self.tracks if not t.lost]
    if self.config.max_faces > 0 and len(active) > self.config.max_faces:
      active.sort(key=lambda t: -t.crop[0])
      dropped = {id(t) for t in active[self.config.max_faces:]}
      self.tracks = [t for t in self.tracks if id(t) not in dropped]
      active = active[:self.config.max_faces]
    if not active:
      return []
    outputs = self.landmarks_fn(frame_rgb, [t.crop for t in active])
    faces = []
    for track, points in zip(active, outputs):
      points = np.asarray(points, np.float64)
      if self._looks_lost(points, track):
        track.lost = True
        continue
      track.landmarks = points
      measured = Box.around(points).size / (track.crop[0] * 200.0)
      low, high = self.config.fill_range
      track.fill = float(np.clip(track.fill + self.config.fill_adaptation * (
          measured - track.fill), low, high))
      if self.smoothing.enabled:
        if track.filter is None:
          track.filter = OneEuroFilter(self.smoothing)
        track.smoothed = track.filter(points, time_s, Box.around(points).size)
      reported = track.smoothed if self.smoothing.enabled else points
      faces.append(TrackedFace(track.id, reported.copy(), points, crop_box(*track.crop),
                               float(track.crop[0]), np.array(track.crop[1]),
                               "detector" if track.seeded_by_detection else "track"))
    self._merge_duplicates()
    live = {t.id for t in self.tracks}
    return [f for f in faces if f.id in live]

  def _merge_duplicates(self) -> None:
    kept: list[_Track] = []
    for track in sorted(self.tracks, key=lambda t: t.id):
      if track.landmarks is None or track.lost:
        kept.append(track)
        continue
      box = Box.around(track.landmarks)
      twin = next((k for k in kept if k.landmarks is not None and not k.lost and
                   overlap_of_smaller(box, Box.around(k.landmarks))
                   > self.config.duplicate_overlap), None)
      if twin is None:
        kept.append(track)
      elif box.size > Box.around(twin.landmarks).size:
        # Two tracks on one face: the larger (the whole face) stays, under the older id.
        twin.crop, twin.landmarks, twin.smoothed = track.crop, track.landmarks, track.smoothed
        twin.filter, twin.fill, twin.reference = track.filter, track.fill, track.reference
    self.tracks = kept

  def track(self, frames: Iterable[tuple[float, np.ndarray]]) -> Iterator[list[TrackedFace]]:
    """`update` over `(time_s, frame_rgb)` pairs."""
    for time_s, frame in frames:
      yield self.update(frame, time_s)
