"""Landmarks on photos and videos: a Python API and the `python -m star_jax.predict` CLI.

    python -m star_jax.predict --checkpoint PATH INPUT... [--out DIR] [--detector NAME]
        [--box x1,y1,x2,y2 | --whole_image] [--box_rule official|landmarks|detector]
        [--points 68] [--batch_size 8] [--workers 2]
        [--camera N] [--redetect_every 10] [--no_smooth] [--max_frames N] [--no_video]

PATH is a released model's name (`wflw`, `300w`, `cofw`: downloaded on first use, see
`star_jax.deploy.released`), a training workdir, a star-jax checkpoint directory or an official STAR
`.pkl`;
`--model M.onnx` (or `.tflite`, from `python -m star_jax.export`) runs an exported model with
`star_jax.deploy.runtime.RuntimePredictor` instead (the same pipeline, no JAX).
INPUT is an image, a folder (its images and videos) or a video file (by suffix, see
`star_jax.deploy.video.VIDEO_SUFFIXES`); `--camera N` reads a live camera until Ctrl-C.

Images: faces are found by `--detector` (default: BlazeFace, see `star_jax.deploy.detection`) unless
`--box` or `--whole_image` is given; each box becomes the crop the model was trained on with the
detector's calibrated rule (a given box is read as the official demo reads it). Images are
decoded and searched in `--workers` threads and their faces batched through the network; JSON
and PNG files are written in the background. Per image: `DIR/<name>.json` (boxes, crop,
landmarks in original pixels) and `DIR/<name>.png` (annotated). Inputs whose names collide
(`a/face.png`, `b/face.png`) get names that keep the folder (`a_face`, `b_face`). No output
replaces an input or a file star-jax did not write (`star_jax.core.outputs`; refused before any
work); files an earlier run wrote into a folder are not read as inputs.

Videos: faces are tracked from frame to frame (`star_jax.deploy.tracking`): `DIR/<name>.mp4`
(annotated) and `DIR/<name>.jsonl` (one JSON object per frame: frame, time_s, faces with ids).

A missing or unreadable input is reported by name and skipped; a face-less image gets a JSON
with no faces. Exit status: 0 when every input was read, 1 when some could not be (or for a
bad checkpoint), 2 for invalid arguments; errors are one line (`STAR_JAX_DEBUG=1` shows the
traceback).

    predictor = Predictor("runs/wflw")                 # or an official .pkl
    faces = predictor.predict(image_rgb)               # list of (N, 2) arrays, pixels
    faces = predictor.predict(image_rgb, boxes=[(x1, y1, x2, y2)], box_rule="official")
    for faces in predictor.track(frames):              # video frames (RGB), in order
      ...                                              # list of tracking.TrackedFace
"""

from __future__ import annotations

import logging
import collections
import concurrent.futures
import dataclasses
import os
import re
import sys
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from star_jax.core import json_output
from star_jax.core import landmark_mappings
from star_jax.training import plots
from star_jax.deploy import video
from star_jax.deploy.detection import Box
from star_jax.deploy.inference import TTA_MODES, Face, Predictor  # noqa: F401 (the public API)
from star_jax.deploy.image_io import ImageError, load_image

_log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".pnm", ".bmp", ".dib",
                  ".tif", ".tiff", ".webp", ".gif", ".jp2")
BOX_RULES = ("official", "landmarks", "detector")


def list_images(target: str) -> list[str]:
  """The image files of a folder (sorted, by suffix), or `[target]` for anything else."""
  if os.path.isdir(target):
    names = sorted(n for n in os.listdir(target) if n.lower().endswith(IMAGE_SUFFIXES))
    return [os.path.join(target, n) for n in names]
  return [target]


def list_inputs(target: str) -> tuple[list[str], list[str]]:
  """(images, videos) named by `target`: a folder's files by suffix, or the file itself."""
  if os.path.isdir(target):
    names = sorted(os.listdir(target))
    return ([os.path.join(target, n) for n in names if n.lower().endswith(IMAGE_SUFFIXES)],
            [os.path.join(target, n) for n in names if video.is_video(n)])
  return ([], [target]) if video.is_video(target) else ([target], [])


@dataclasses.dataclass
class FileReport:
  path: str
  status: str                  # 'ok', 'no_face', 'error'
  message: str = ""
  json_path: str = ""
  png_path: str = ""
  num_faces: int = 0


def _format_json(record: dict, where: str = "predictions") -> str:
  """Indented JSON with each [x, y] pair (and each box) kept on one line; a non-finite number is
  null (and one warning line naming `where`)."""
  text = json_output.dumps(record, where=where, indent=1)
  number = r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
  text = re.sub(r"\[\s*(" + number + r")((?:,\s*" + number + r")*)\s*\]",
                lambda m: "[" + m.group(1) + re.sub(r",\s*", ", ", m.group(2)) + "]", text)
  return text + "\n"


def _output_stems(paths: Sequence[str]) -> list[str]:
  """Distinct output names for the inputs: the file stem; where stems collide, the stem with
  its extension, then with as many parent folders as it takes (`a_face`, `b_face`), then a
  counter (the same file given twice)."""
  def name(path: str, parents: int, with_ext: bool) -> str:
    stem, ext = os.path.splitext(os.path.basename(path))
    if with_ext and ext:
      stem = f"{stem}_{ext.lstrip('.').lower()}"
    folders = os.path.normpath(os.path.dirname(os.path.abspath(path))).split(os.sep)
    folders = [f for f in folders if f][-parents:] if parents else []
    return "_".join(folders + [stem])

  stems = [name(p, 0, False) for p in paths]
  for parents, with_ext in ((0, True), (1, False), (1, True), (2, False), (3, False),
                            (4, False)):
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for i, stem in enumerate(stems):
      groups[stem].append(i)
    for members in groups.values():
      # Only names of different files are worth lengthening.
      if len({os.path.abspath(paths[i]) for i in members}) > 1:
        for i in members:
          stems[i] = name(paths[i], parents, with_ext)
  seen: dict[str, int] = collections.Counter()
  unique = []
  for s in stems:
    seen[s] += 1
    unique.append(s if seen[s] == 1 else f"{s}_{seen[s]}")
  return unique


@dataclasses.dataclass
class _Prepared:
  index: int
  image: np.ndarray | None = None
  plan: tuple | None = None
  error: str = ""


def predict_files(predictor: Predictor, paths: Sequence[str], out_dir: str, *,
                  boxes: Sequence[Box] | None = None, whole_image: bool = False,
                  box_rule: str | None = None, num_points: int | None = None,
                  images_per_batch: int | None = None, workers: int = 2,
                  log: Callable[[str], None] = _log.warning,
                  progress: bool = True, write_png: bool = True,
                  stems: Sequence[str] | None = None) -> list[FileReport]:
  """Predicts every image file, writing `<stem>.json` and `<stem>.png` into `out_dir`.

  `workers` threads decode the images, find the faces and cut the crops, ahead of the network;
  faces of consecutive images are batched together (a batch is run once `images_per_batch`
  images, default `batch_size`, or `batch_size` faces are waiting); the outputs are written in
  a background thread. Unreadable and missing files are reported (by `log`) and skipped.
  `boxes` are used for every image; `whole_image=True` takes each image itself as the face box
  (pre-cropped faces, which detectors tend to miss).
  """
  os.makedirs(out_dir, exist_ok=True)
  paths = list(paths)
  outputs = _FileOutputs(predictor, paths, list(stems) if stems is not None
                         else _output_stems(paths), out_dir, num_points, write_png,
                         detected=boxes is None and not whole_image)
  group = max(1, images_per_batch or predictor.batch_size)
  workers = max(1, int(workers))
  prepare = lambda i: _prepare(predictor, i, paths[i], boxes, whole_image, box_rule)
  bar = _progress_bar(len(paths)) if progress and len(paths) > 1 else None
  reports: list[FileReport] = []
  with concurrent.futures.ThreadPoolExecutor(workers) as pool, \
       concurrent.futures.ThreadPoolExecutor(1) as writer:
    written: list[concurrent.futures.Future] = []
    prepared = _prepared_in_order(pool, prepare, len(paths), ahead=2 * max(group, workers))
    for batch in _batches(prepared, group, predictor.batch_size):
      if batch[0].error:
        log(f"skipped {batch[0].error}")
        reports.append(FileReport(paths[batch[0].index], "error", batch[0].error))
      else:
        faces = predictor.predict_plans([p.image for p in batch], [p.plan for p in batch])
        written += [writer.submit(outputs.write, p.index, p.image, image_faces)
                    for p, image_faces in zip(batch, faces)]
      if bar is not None:
        bar.update(len(batch))
    for future in written:
      report = future.result()
      if report.message:
        log(report.message)
      reports.append(report)
  if bar is not None:
    bar.close()
  order = {p: k for k, p in enumerate(paths)}
  reports.sort(key=lambda r: order.get(r.path, 0))
  return reports


def _prepare(predictor: Predictor, index: int, path: str, boxes: Sequence[Box] | None,
             whole_image: bool, box_rule: str | None) -> _Prepared:
  """One image decoded and its faces' crops planned (or the reason it cannot be read)."""
  try:
    image = load_image(path)
  except ImageError as e:
    return _Prepared(index, error=str(e))
  if whole_image:
    # Pixel-centre extent (0 .. W-1), the convention of landmark boxes.
    boxes = [Box(0, 0, image.shape[1] - 1, image.shape[0] - 1)]
  return _Prepared(index, image, predictor.plan(image, boxes, box_rule=box_rule))


def _prepared_in_order(pool: concurrent.futures.Executor, prepare: Callable[[int], _Prepared],
                       count: int, ahead: int) -> Iterator[_Prepared]:
  """`prepare(0)`, ..., `prepare(count - 1)` in order, computed in `pool` at most `ahead`
  images ahead of the one taken (which bounds the decoded images held in memory)."""
  lookahead: collections.deque = collections.deque()
  next_index = 0
  while next_index < count or lookahead:
    while next_index < count and len(lookahead) < ahead:
      lookahead.append(pool.submit(prepare, next_index))
      next_index += 1
    yield lookahead.popleft().result()


def _batches(prepared: Iterable[_Prepared], images: int, faces: int
             ) -> Iterator[list[_Prepared]]:
  """Consecutive readable images in batches of at most `images` images, a batch closed as soon
  as it holds `faces` faces; an unreadable image comes alone, as it is met."""
  pending: list[_Prepared] = []
  for item in prepared:
    if item.error:
      yield [item]
      continue
    pending.append(item)
    if len(pending) >= images or sum(len(p.plan[2]) for p in pending) >= faces:
      yield pending
      pending = []
  if pending:
    yield pending


def _progress_bar(total: int):
  from tqdm import tqdm
  return tqdm(total=total, desc="predict", unit="image", file=sys.stderr)


@dataclasses.dataclass
class _FileOutputs:
  """Writes one image's `<stem>.json` (and `<stem>.png` with its faces drawn)."""

  predictor: Predictor
  paths: list[str]
  stems: list[str]
  out_dir: str
  num_points: int | None
  write_png: bool
  detected: bool  # the faces come from the predictor's detector (recorded in the JSON)

  def write(self, i: int, image: np.ndarray, faces: list[Face]) -> FileReport:
    predictor, path, stem = self.predictor, self.paths[i], self.stems[i]
    report = FileReport(path, "ok" if faces else "no_face", num_faces=len(faces))
    record = {"image": os.path.abspath(path), "width": int(image.shape[1]),
              "height": int(image.shape[0]),
              "num_points": self.num_points or predictor.num_points,
              "detector": predictor.detector_name if self.detected else None,
              "faces": [f.to_json(self.num_points, predictor.spec) for f in faces]}
    report.json_path = os.path.join(self.out_dir, stem + ".json")
    with open(report.json_path, "w") as f:
      f.write(_format_json(record, report.json_path))
    if faces and self.write_png:
      drawn = [np.asarray(face["landmarks"]) for face in record["faces"]]
      edges = landmark_mappings.output_spec(predictor.spec, self.num_points).edges
      canvas = plots.draw_landmarks(image, drawn, [f.box.as_list() for f in faces], edges)
      report.png_path = plots.save_png(os.path.join(self.out_dir, stem + ".png"), canvas)
    elif not faces:
      report.message = f"{path}: no face found"
    return report
