"""Video: the One-Euro filter, tracking across moving synthetic faces, the video reader and
writer, JSONL records and the predictor's video CLI on a generated clip.

Tracking is tested with an oracle in place of the network (it returns the true landmarks of
the face a crop holds, plus noise, and points collapsed to the crop centre when the crop holds
no face, as an untrained network does), so the tests measure the tracker, not a model.
"""

import json
import math
import os

import cv2
import numpy as np
import pytest

from star_jax.deploy import clips
from star_jax.deploy import detection
from star_jax.deploy import predict
from star_jax.commands import predict as predict_command
from star_jax.deploy import tracking
from star_jax.deploy import video
from star_jax.deploy.detection import Box

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT = os.path.join(ROOT, "tests", "fixtures", "official_wflw_small", "checkpoint.pkl")


class Oracle:
  """A stand-in network and detector that know where the clip's faces are."""

  def __init__(self, clip: clips.Clip, noise_px: float = 0.0, seed: int = 0):
    self.clip, self.noise_px = clip, noise_px
    self.rng = np.random.default_rng(seed)
    self.frame = 0
    self.detections = []
    self.hidden_from = None   # faces vanish from this frame on

  def faces(self) -> np.ndarray:
    if self.hidden_from is not None and self.frame >= self.hidden_from:
      return np.zeros((0, 98, 2))
    return self.clip.landmarks[self.frame]

  def landmarks(self, image, crops):
    out = []
    for scale, centre in crops:
      side = scale * 200
      inside = [f for f in self.faces() if np.all(np.abs(Box.around(f).center - centre) < side / 4)]
      if inside:
        out.append(inside[0] + self.rng.normal(0, self.noise_px, inside[0].shape))
      else:
        out.append(np.tile(centre, (98, 1)) + self.rng.normal(0, 1.0, (98, 2)))
    return out

  def detect(self, image):
    self.detections.append(self.frame)
    return [Box.around(f) for f in self.faces()]


def run(tracker: tracking.FaceTracker, oracle: Oracle, frames: int):
  results = []
  for t in range(frames):
    oracle.frame = t
    results.append(tracker.update(oracle.clip.frames[t], t / oracle.clip.fps))
  return results


@pytest.fixture(scope="module")
def two_faces():
  return clips.moving_face_clip(40, faces=2, seed=3, size=(320, 240), face_side=80)


def test_one_euro_filter_against_an_exponential_average():
  # With beta = 0 the filter is an exponential average with alpha = 1 / (1 + tau / dt).
  config = tracking.SmoothingConfig(min_cutoff=1.0, beta=0.0)
  smoother = tracking.OneEuroFilter(config)
  dt = 1 / 30
  alpha = 1 / (1 + 1 / (2 * math.pi * 1.0) / dt)
  rng = np.random.default_rng(0)
  values = rng.normal(0, 1, (3000, 1, 2))
  out = np.array([smoother(v, k * dt, 1.0) for k, v in enumerate(values)])
  expected = values[0].copy()
  for k in range(1, 4):
    expected = alpha * values[k] + (1 - alpha) * expected
  np.testing.assert_allclose(out[3], expected)
  # White noise of std 1 comes out with std sqrt(alpha / (2 - alpha)).
  assert out[100:].std() == pytest.approx(math.sqrt(alpha / (2 - alpha)), rel=0.1)


def test_one_euro_filter_follows_fast_motion():
  steady = tracking.OneEuroFilter(tracking.SmoothingConfig(min_cutoff=0.3, beta=0.0))
  adaptive = tracking.OneEuroFilter(tracking.SmoothingConfig(min_cutoff=0.3, beta=4.0))
  lag = {}
  for name, smoother in (("steady", steady), ("adaptive", adaptive)):
    for k in range(30):  # a face of size 100 moving 300 px/s = 3 face sizes per second
      x = np.array([[10.0 * k, 0.0]])
      out = smoother(x, k / 30, 100.0)
    lag[name] = float(x[0, 0] - out[0, 0])
  assert lag["adaptive"] < 0.25 * lag["steady"]


def test_tracking_two_moving_faces(two_faces):
  oracle = Oracle(two_faces, noise_px=0.5)
  tracker = tracking.FaceTracker(oracle.landmarks, oracle.detect, lambda b: detection.box_to_crop(
      b, "landmarks"), config=tracking.TrackerConfig(redetect_every=10))
  results = run(tracker, oracle, len(two_faces.frames))
  ids = {face.id for faces in results for face in faces}
  assert ids == {0, 1}                       # two faces, each with one id throughout
  assert all(len(faces) == 2 for faces in results)
  # Detection on frames 0, 10, 20, 30 only: in between, crops follow the landmarks.
  assert oracle.detections == [0, 10, 20, 30]
  sources = [f.source for faces in results[1:] for f in faces]
  assert sources.count("track") == len(sources)
  first = {f.id: f for f in results[0]}
  for t, faces in enumerate(results):
    for face in faces:
      # The id keeps to its face: nearest true face is the same one as on the first frame.
      truth = two_faces.landmarks[t]
      nearest = int(np.argmin([np.abs(face.landmarks - f).mean() for f in truth]))
      start = int(np.argmin([np.abs(first[face.id].landmarks - f).mean()
                             for f in two_faces.landmarks[0]]))
      assert nearest == start
      # Smoothed points lag a moving face by little (it moves ~1.5 px per frame here).
      assert np.abs(face.landmarks - truth[nearest]).mean() < 3.0


def test_lost_face_is_dropped_and_redetected(two_faces):
  oracle = Oracle(two_faces)
  tracker = tracking.FaceTracker(oracle.landmarks, oracle.detect, lambda b: detection.box_to_crop(
      b, "landmarks"), config=tracking.TrackerConfig(redetect_every=100))
  oracle.hidden_from = 5
  results = run(tracker, oracle, 12)
  assert all(len(r) == 2 for r in results[:5])
  assert all(r == [] for r in results[5:])
  # The collapsed points of frame 5 mark both tracks lost: the detector runs on frame 6 (and,
  # finding nothing, on every frame while there is no track).
  assert oracle.detections[:3] == [0, 6, 7]
  assert tracker.tracks == []
  oracle.hidden_from = None
  oracle.frame = 12
  faces = tracker.update(two_faces.frames[12], 12 / 30)
  assert {f.id for f in faces} == {2, 3}     # new faces, new ids


def test_static_face_is_steady_with_smoothing():
  clip = clips.moving_face_clip(60, motion=0.0, seed=2, size=(320, 240), face_side=80)
  jitter = {}
  for enabled in (True, False):
    oracle = Oracle(clip, noise_px=0.5, seed=1)
    tracker = tracking.FaceTracker(
        oracle.landmarks, oracle.detect, lambda b: detection.box_to_crop(b, "landmarks"),
        smoothing=tracking.SmoothingConfig(enabled=enabled))
    results = run(tracker, oracle, 60)
    points = np.array([r[0].landmarks for r in results[10:]])
    jitter[enabled] = float(points.std(axis=0).mean())
  assert jitter[False] == pytest.approx(0.5, rel=0.2)
  assert jitter[True] < 0.3 * jitter[False]


def test_tracker_config_is_checked():
  with pytest.raises(ValueError, match="redetect_every"):
    tracking.TrackerConfig(redetect_every=0)


def test_reader_and_writer_round_trip(tmp_path):
  clip = clips.moving_face_clip(12, size=(160, 120), face_side=50, seed=4)
  path = video.write_clip(str(tmp_path / "clip.avi"), clip.frames, 25.0, (160, 120))
  with video.FrameReader(path) as reader:
    assert (reader.info.width, reader.info.height, reader.info.fps) == (160, 120, 25.0)
    frames = list(reader)
  assert [i for i, _, _ in frames] == list(range(12))
  assert [t for _, t, _ in frames] == pytest.approx([i / 25 for i in range(12)])
  # Lossy codec: close to the written pixels, in RGB order.
  assert np.abs(frames[5][2].astype(float) - clip.frames[5]).mean() < 6
  with video.FrameReader(path, max_frames=4) as reader:
    assert len(list(reader)) == 4
  with pytest.raises(video.VideoError, match="no such file"):
    video.FrameReader(str(tmp_path / "missing.mp4"))
  (tmp_path / "fake.mp4").write_bytes(b"not a video at all")
  with pytest.raises(video.VideoError, match="fake.mp4"):
    video.FrameReader(str(tmp_path / "fake.mp4"))


@pytest.mark.slow
@pytest.mark.skipif(bool(detection.available()["blazeface"]), reason="BlazeFace not installed")
def test_video_cli_writes_annotated_clip_and_jsonl(tmp_path):
  clip = clips.moving_face_clip(6, size=(320, 240), face_side=100, seed=5)
  source = video.write_clip(str(tmp_path / "walk.mp4"), clip.frames, 30.0, (320, 240))
  out = tmp_path / "out"
  code = predict_command.main(["--checkpoint", CHECKPOINT, source, "--out", str(out),
                               "--batch_size", "4", "--points", "68"])
  assert code == 0
  with open(out / "walk.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["frame"] for r in records] == list(range(6))
  assert [r["time_s"] for r in records] == pytest.approx([i / 30 for i in range(6)], abs=1e-6)
  # The fixture network has random weights, so whether a face is kept is not tested here
  # (tracking is, above); every reported face has the documented fields.
  for record in records:
    for face in record["faces"]:
      assert set(face) == {"id", "box", "box_source", "scale", "center", "landmarks"}
      assert np.asarray(face["landmarks"]).shape == (68, 2)
  capture = cv2.VideoCapture(str(out / "walk.mp4"))
  count = 0
  while True:
    ok, frame = capture.read()
    if not ok:
      break
    assert frame.shape == (240, 320, 3)
    count += 1
  assert count == 6


def test_predictor_track_api(two_faces):
  """`Predictor.track` with the fixture network (random weights) yields one list per frame."""
  predictor = predict.Predictor(CHECKPOINT, batch_size=4,
                                detector=lambda image: [Box(100, 60, 220, 180)],
                                detector_rule="landmarks")
  frames = two_faces.frames[:3]
  results = list(predictor.track(frames))
  assert len(results) == 3
  for faces in results:
    for face in faces:
      assert face.landmarks.shape == (98, 2) and np.all(np.isfinite(face.landmarks))


def test_missing_camera_is_reported(tmp_path, capsys):
  code = predict_command.main(["--checkpoint", CHECKPOINT, "--camera", "97", "--out",
                       str(tmp_path / "o")])
  assert code == 1
  err = capsys.readouterr().err
  assert "camera 97: cannot be opened" in err and "WARN" not in err


def test_face_record_fields():
  face = tracking.TrackedFace(3, np.zeros((98, 2)), np.zeros((98, 2)), Box(1, 2, 101, 102), 0.5,
                              np.array([51.0, 52.0]), "track")
  record = video.face_record(face, np.full((68, 2), 1.23456))
  assert record == {"id": 3, "box": [1.0, 2.0, 101.0, 102.0], "box_source": "track",
                    "scale": 0.5, "center": [51.0, 52.0],
                    "landmarks": [[1.235, 1.235]] * 68}


def _bars(count: int, size: tuple[int, int]) -> list[np.ndarray]:
  """Frames with a red left half, a blue right half and a white bar moving right."""
  width, height = size
  frames = []
  for i in range(count):
    frame = np.zeros((height, width, 3), np.uint8)
    frame[:, : width // 2] = (255, 0, 0)
    frame[:, width // 2:] = (0, 0, 255)
    frame[:, 4 * i: 4 * i + 8] = 255
    frames.append(frame)
  return frames


def test_annotated_video_is_h264_at_the_source_rate(tmp_path):
  av = pytest.importorskip("av", reason="PyAV (the H.264 encoder, pinned in pyproject.toml)")
  # Odd sides: 4:2:0 needs even ones, the encoder pads one black row and column.
  info = video.VideoInfo(161, 121, 12.0, None)
  frames = _bars(15, (161, 121))
  writer = video.OutputWriter(str(tmp_path), "bars", info)
  for i, frame in enumerate(frames):
    writer.write({"frame": i}, lambda frame=frame: frame)
  writer.close()
  with av.open(writer.video_path) as container:
    stream = container.streams.video[0]
    assert stream.codec_context.name == "h264"
    assert stream.codec_context.pix_fmt == "yuv420p"
    assert stream.average_rate == 12
    decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
  assert len(decoded) == 15 and decoded[0].shape == (122, 162, 3)
  # Lossy, but the picture is the one written, in RGB order (OpenCV reads it too).
  for got, want in zip(decoded, frames):
    assert np.abs(got[:121, :161].astype(float) - want).mean() < 6
  capture = cv2.VideoCapture(writer.video_path)
  assert capture.get(cv2.CAP_PROP_FPS) == 12.0
  ok, first = capture.read()
  assert ok and np.abs(first[:121, :161, ::-1].astype(float) - frames[0]).mean() < 6
  capture.release()


def test_without_pyav_the_video_is_mp4v_after_one_warning(tmp_path, monkeypatch):
  monkeypatch.setattr(video, "h264_available", lambda: False)
  monkeypatch.setattr(video, "_warned_no_h264", False)
  lines = []
  for name in ("a.mp4", "b.mp4"):
    encoder = video.open_encoder(str(tmp_path / name), 25.0, (64, 48), log=lines.append)
    for frame in _bars(3, (64, 48)):
      encoder.write(frame)
    encoder.close()
  assert len(lines) == 1 and "\n" not in lines[0]
  assert lines[0].startswith("warning: PyAV") and "mp4v" in lines[0]
  capture = cv2.VideoCapture(str(tmp_path / "a.mp4"))
  fourcc = int(capture.get(cv2.CAP_PROP_FOURCC))
  # MPEG-4 Part 2: OpenCV's FFmpeg names the decoder FMP4.
  assert encoder.codec == "mpeg4" and fourcc.to_bytes(4, "little") in (b"mp4v", b"FMP4")
  assert sum(1 for _ in iter(lambda: capture.read()[0], False)) == 3
  capture.release()
