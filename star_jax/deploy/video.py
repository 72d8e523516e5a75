"""Video in and out for the predictor: frames from a file or a camera, an annotated MP4 and a
JSONL record per frame.

    python -m star_jax.predict --checkpoint CKPT clip.mp4 --out DIR      # DIR/clip.mp4, clip.jsonl
    python -m star_jax.predict --checkpoint CKPT --camera 0 --out DIR    # DIR/camera0.*

Any container and codec OpenCV's FFmpeg build reads is accepted. Frames are decoded in a
background thread and the annotated frames encoded in another, so decoding and encoding overlap
the network. The annotated video is H.264 (yuv420p, `+faststart`, at the source's frame rate),
which browsers play, written by the libx264 that PyAV's wheel ships (`av`, pinned in
pyproject.toml); without PyAV it falls back, with one warning line, to OpenCV's MPEG-4 Part 2
(`mp4v`), which desktop players read but browsers do not. Each JSONL line is

  {"frame": 12, "time_s": 0.4, "faces": [{"id": 0, "box": [...], "box_source": "track",
   "scale": 1.1, "center": [x, y], "landmarks": [[x, y], ...]}, ...]}

where `box` is the square the network read (the crop), `box_source` says whether that crop
came from a detection ('detector') or from the face's landmarks in the previous frame
('track'), and `id` is stable while the face is tracked (see `star_jax.deploy.tracking`). `time_s`
is
the frame's timestamp (index / fps for files, seconds since the start for cameras).

Imports neither JAX nor TensorFlow.
"""

from __future__ import annotations

import logging
import dataclasses
import fractions
import json
import os
import queue
import sys
import threading
import time
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np

from star_jax.core import json_output
from star_jax.training import plots
from star_jax.errors import DataError

_log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv",
                  ".flv", ".3gp", ".ts", ".mts", ".ogv")
DEFAULT_FPS = 30.0
_END = object()


def is_video(path: str) -> bool:
  return path.lower().endswith(VIDEO_SUFFIXES)


def _quietly(fn):
  """Runs `fn` with OpenCV's own warnings off (a missing camera is reported by us, once)."""
  logging = getattr(getattr(cv2, "utils", None), "logging", None)
  if logging is None:
    return fn()
  level = logging.getLogLevel()
  logging.setLogLevel(logging.LOG_LEVEL_ERROR)
  try:
    return fn()
  finally:
    logging.setLogLevel(level)


class VideoError(DataError):
  """A video file or camera that cannot be read, or an output that cannot be written."""


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  width: int
  height: int
  fps: float                  # frames per second (DEFAULT_FPS when the source does not say)
  frame_count: int | None     # None when unknown (cameras, some streams)


class FrameReader:
  """Frames `(index, time_s, rgb uint8)` of a video file or camera, decoded ahead in a thread.

  Use as a context manager or call `close()`. `max_frames` stops early (0: all).
  """

  def __init__(self, source: str | int, *, max_frames: int = 0, prefetch: int = 8):
    self.source = source
    self.is_camera = isinstance(source, int)
    label = f"camera {source}" if self.is_camera else str(source)
    if not self.is_camera and not os.path.isfile(str(source)):
      raise VideoError(f"{source}: no such file")
    self.capture = _quietly(lambda: cv2.VideoCapture(source))
    if not self.capture.isOpened():
      self.capture.release()
      raise VideoError(f"{label}: cannot be opened as a video" +
                       (" (no such camera?)" if self.is_camera else ""))
    fps = float(self.capture.get(cv2.CAP_PROP_FPS) or 0.0)
    count = int(self.capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    ok, first = self.capture.read()
    if not ok or first is None:
      self.capture.release()
      raise VideoError(f"{label}: no frame could be decoded")
    self.info = VideoInfo(int(first.shape[1]), int(first.shape[0]),
                          fps if 1.0 <= fps <= 1000.0 else DEFAULT_FPS,
                          None if self.is_camera or count <= 0 else count)
    if max_frames and self.info.frame_count:
      self.info = dataclasses.replace(self.info, frame_count=min(max_frames,
                                                                 self.info.frame_count))
    self.max_frames = int(max_frames)
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    self._stop = threading.Event()
    self._start = time.monotonic()
    self._thread = threading.Thread(target=self._run, args=(first,), daemon=True)
    self._thread.start()

  def _time(self, index: int) -> float:
    if self.is_camera:
      return time.monotonic() - self._start
    return index / self.info.fps

  def _run(self, first: np.ndarray) -> None:
    frame, index = first, 0
    try:
      while frame is not None and not self._stop.is_set():
        item = (index, self._time(index), np.ascontiguousarray(frame[..., ::-1]))
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        index += 1
        if self.max_frames and index >= self.max_frames:
          break
        ok, frame = self.capture.read()
        if not ok:
          frame = None
    finally:
      self.capture.release()
      while True:
        try:
          self._queue.put(_END, timeout=0.1)
          break
        except queue.Full:
          if self._stop.is_set():
            break

  def __iter__(self) -> Iterator[tuple[int, float, np.ndarray]]:
    while True:
      item = self._queue.get()
      if item is _END:
        return
      yield item

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=5)

  def __enter__(self) -> "FrameReader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


H264_QUALITY = "20"       # libx264 constant rate factor: visually clean landmarks and text
# The encoder shares the CPU with the network: the fastest preset costs what OpenCV's mp4v did
# (benchmarks/RESULTS.md, "Video encoding"), at about twice mp4v's file size.
H264_PRESET = "ultrafast"
_warned_no_h264 = False


def h264_available() -> bool:
  """Whether PyAV and its libx264 encoder can be loaded."""
  try:
    import av
    av.codec.Codec("libx264", "w")
  except Exception:  # ImportError, or a PyAV build without the encoder
    return False
  return True


class _H264Encoder:
  """RGB frames -> an H.264 MP4 through PyAV (libx264, yuv420p; odd sizes padded by one black
  row or column, since 4:2:0 needs even sides)."""

  codec = "h264"

  def __init__(self, path: str, fps: float, size: tuple[int, int]):
    import av
    self._av = av
    self.size = (int(size[0]), int(size[1]))
    self._even = (self.size[0] + self.size[0] % 2, self.size[1] + self.size[1] % 2)
    rate = fractions.Fraction(float(fps)).limit_denominator(1001)
    self._container = av.open(path, "w", options={"movflags": "+faststart"})
    try:
      self._stream = self._container.add_stream("libx264", rate=rate)
      self._stream.width, self._stream.height = self._even
      self._stream.pix_fmt = "yuv420p"
      self._stream.options = {"crf": H264_QUALITY, "preset": H264_PRESET}
    except Exception:
      self._container.close()
      raise

  def write(self, frame_rgb: np.ndarray) -> None:
    frame = np.asarray(frame_rgb, np.uint8)
    if self._even != self.size:
      frame = np.pad(frame, ((0, self._even[1] - frame.shape[0]),
                             (0, self._even[0] - frame.shape[1]), (0, 0)))
    picture = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
    for packet in self._stream.encode(picture):
      self._container.mux(packet)

  def close(self) -> None:
    try:
      for packet in self._stream.encode(None):
        self._container.mux(packet)
    finally:
      self._container.close()


class _OpenCVEncoder:
  """RGB frames -> MPEG-4 Part 2 (`mp4v`) through OpenCV: the fallback without PyAV."""

  codec = "mpeg4"

  def __init__(self, path: str, fps: float, size: tuple[int, int]):
    self._writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    if not self._writer.isOpened():
      raise VideoError(f"{path}: cannot be written (no MPEG-4 encoder in this OpenCV build?)")

  def write(self, frame_rgb: np.ndarray) -> None:
    self._writer.write(np.ascontiguousarray(np.asarray(frame_rgb, np.uint8)[..., ::-1]))

  def close(self) -> None:
    self._writer.release()


def open_encoder(path: str, fps: float, size: tuple[int, int], *,
                 log: Callable[[str], None] = _log.warning):
  """An encoder (`write(rgb)`, `close()`, `codec`) of an MP4 that browsers play: H.264 when
  PyAV is installed, else `mp4v` after one warning line (once per process)."""
  global _warned_no_h264
  if h264_available():
    try:
      return _H264Encoder(path, fps, size)
    except Exception as e:  # PyAV raises its own error types (av.FFmpegError, ...)
      raise VideoError(f"{path}: cannot be written ({e})") from None
  if not _warned_no_h264:
    log("warning: PyAV (pip install av) is not installed: annotated videos are MPEG-4 Part 2 "
        "(mp4v), which browsers do not play")
    _warned_no_h264 = True
  return _OpenCVEncoder(path, fps, size)


def face_record(face, landmarks: np.ndarray) -> dict:
  """The JSON object of one tracked face (`landmarks` already in the output layout)."""
  return {"id": int(face.id), "box": [round(v, 3) for v in face.box.as_list()],
          "box_source": face.source, "scale": round(float(face.scale), 6),
          "center": [round(float(c), 3) for c in face.center],
          "landmarks": np.round(np.asarray(landmarks, np.float64), 3).tolist()}


def draw_tracked(frame_rgb: np.ndarray, faces: Sequence, landmarks: Sequence[np.ndarray],
                 edges: Sequence = ()) -> np.ndarray:
  """The frame with each face's curves (`edges` of the landmarks' layout), points, crop square
  and id."""
  canvas = plots.draw_landmarks(frame_rgb, list(landmarks), [f.box.as_list() for f in faces],
                                edges)
  for face in faces:
    x, y = int(round(face.box.x1)), int(round(face.box.y1)) - 4
    cv2.putText(canvas, str(face.id), (max(0, x), max(12, y)), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                (255, 255, 255), 1, cv2.LINE_AA)
  return canvas


class OutputWriter:
  """Writes `<stem>.mp4` (annotated, optional) and `<stem>.jsonl` in a background thread."""

  def __init__(self, out_dir: str, stem: str, info: VideoInfo, *, write_video: bool = True,
               queue_size: int = 8):
    os.makedirs(out_dir, exist_ok=True)
    self.jsonl_path = os.path.join(out_dir, stem + ".jsonl")
    self.video_path = os.path.join(out_dir, stem + ".mp4") if write_video else ""
    self._jsonl = open(self.jsonl_path, "w")
    self._video = None
    if write_video:
      try:
        self._video = open_encoder(self.video_path, info.fps, (info.width, info.height))
      except VideoError:
        self._jsonl.close()
        raise
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
    self._error: BaseException | None = None
    self._warned_nonfinite = False
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self) -> None:
    while True:
      item = self._queue.get()
      if item is _END:
        return
      if self._error is not None:
        continue
      record, canvas_fn = item
      try:
        clean, nonfinite = json_output.finite(record)
        if nonfinite and not self._warned_nonfinite:  # once per video, not once per frame
          self._warned_nonfinite = True
          _log.warning(json_output.nonfinite_warning(self.jsonl_path, nonfinite))
        self._jsonl.write(json.dumps(clean, separators=(",", ":"), allow_nan=False) + "\n")
        if self._video is not None:
          self._video.write(canvas_fn())
      except BaseException as e:  # reported by close()
        self._error = e

  def write(self, record: dict, canvas_fn: Callable[[], np.ndarray]) -> None:
    """Queues one frame: its JSON record and a function drawing its annotated picture."""
    if self._error is not None:
      raise VideoError(f"{self.video_path or self.jsonl_path}: {self._error}")
    self._queue.put((record, canvas_fn))

  def close(self) -> None:
    self._queue.put(_END)
    self._thread.join()
    self._jsonl.close()
    if self._video is not None:
      try:
        self._video.close()
      except Exception as e:  # the encoder's flush can fail (disk full)
        self._error = self._error or e
    if self._error is not None:
      raise VideoError(f"{self.video_path or self.jsonl_path}: {self._error}")


@dataclasses.dataclass
class VideoReport:
  source: str
  frames: int
  frames_with_faces: int
  seconds: float
  video_path: str
  jsonl_path: str
  detections_run: int

  @property
  def fps(self) -> float:
    return self.frames / self.seconds if self.seconds > 0 else 0.0


def run_video(source: str | int, out_dir: str, stem: str, *, tracker,
              to_output_layout: Callable[[np.ndarray], np.ndarray] = lambda p: p,
              edges: Sequence = (), write_video: bool = True, max_frames: int = 0,
              progress: bool = True) -> VideoReport:
  """Tracks faces through a video file or camera, writing `<stem>.mp4` and `<stem>.jsonl`.

  `tracker` is a `star_jax.deploy.tracking.FaceTracker`; `to_output_layout` maps each face's
  landmarks to the layout written (e.g. 98 -> 68 points), whose curves `edges` are drawn
  (`datasets.Edge`s). Ctrl-C on a camera ends the
  recording and keeps what was written.
  """
  label = f"camera{source}" if isinstance(source, int) else str(source)
  frames = with_faces = 0
  start = time.perf_counter()
  with FrameReader(source, max_frames=max_frames) as reader:
    writer = OutputWriter(out_dir, stem, reader.info, write_video=write_video)
    bar = None
    if progress:
      from tqdm import tqdm
      bar = tqdm(total=reader.info.frame_count, desc=os.path.basename(label), unit="frame",
                 file=sys.stderr, smoothing=0.1)
    try:
      for index, time_s, frame in reader:
        faces = tracker.update(frame, time_s)
        points = [to_output_layout(f.landmarks) for f in faces]
        record = {"frame": index, "time_s": round(float(time_s), 6),
                  "faces": [face_record(f, p) for f, p in zip(faces, points)]}
        writer.write(record, lambda frame=frame, faces=faces, points=points:
                     draw_tracked(frame, faces, points, edges))
        frames += 1
        with_faces += bool(faces)
        if bar is not None:
          bar.update(1)
          elapsed = time.perf_counter() - start
          bar.set_postfix(fps=f"{frames / elapsed:.1f}", faces=len(faces), refresh=False)
    except KeyboardInterrupt:
      if not reader.is_camera:
        raise
    finally:
      if bar is not None:
        bar.close()
      writer.close()
  seconds = time.perf_counter() - start
  return VideoReport(label, frames, with_faces, seconds, writer.video_path, writer.jsonl_path,
                     getattr(tracker, "detections_run", 0))


def write_clip(path: str, frames: Sequence[np.ndarray] | Iterator[np.ndarray], fps: float,
               size: tuple[int, int]) -> str:
  """Writes RGB frames (W, H = `size`) as an MPEG-4 file (for demos and tests)."""
  writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
  if not writer.isOpened():
    raise VideoError(f"{path}: cannot be written")
  try:
    for frame in frames:
      writer.write(np.ascontiguousarray(np.asarray(frame, np.uint8)[..., ::-1]))
  finally:
    writer.release()
  return path
