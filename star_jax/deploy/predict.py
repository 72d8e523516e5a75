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

import argparse
import collections
import concurrent.futures
import dataclasses
import os
import re
import sys
from typing import Callable, Sequence

import numpy as np

from star_jax.commands import cli
from star_jax.deploy import detection
from star_jax.core import json_output
from star_jax.core import landmark_mappings
from star_jax.core import outputs
from star_jax.training import plots
from star_jax.deploy import tracking
from star_jax.deploy import video
from star_jax.core.schemes import SPECS
from star_jax.deploy.detection import Box
from star_jax.errors import UsageError
from star_jax.deploy.inference import TTA_MODES, Face, Predictor  # noqa: F401 (the public API)
from star_jax.deploy.image_io import ImageError, load_image

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
                  log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
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
  stems = list(stems) if stems is not None else _output_stems(paths)
  group = max(1, images_per_batch or predictor.batch_size)
  workers = max(1, int(workers))

  def prepare(i: int) -> _Prepared:
    try:
      image = load_image(paths[i])
    except ImageError as e:
      return _Prepared(i, error=str(e))
    if whole_image:
      # Pixel-centre extent (0 .. W-1), the convention of landmark boxes.
      given = [Box(0, 0, image.shape[1] - 1, image.shape[0] - 1)]
    else:
      given = boxes
    return _Prepared(i, image, predictor.plan(image, given, box_rule=box_rule))

  reports: list[FileReport] = []
  bar = None
  if progress and len(paths) > 1:
    from tqdm import tqdm
    bar = tqdm(total=len(paths), desc="predict", unit="image", file=sys.stderr)

  def write(i: int, image: np.ndarray, faces: list[Face]) -> FileReport:
    report = FileReport(paths[i], "ok" if faces else "no_face", num_faces=len(faces))
    record = {"image": os.path.abspath(paths[i]), "width": int(image.shape[1]),
              "height": int(image.shape[0]),
              "num_points": num_points or predictor.num_points,
              "detector": predictor.detector_name if boxes is None and not whole_image
                          else None,
              "faces": [f.to_json(num_points, predictor.spec) for f in faces]}
    report.json_path = os.path.join(out_dir, stems[i] + ".json")
    with open(report.json_path, "w") as f:
      f.write(_format_json(record, report.json_path))
    if faces and write_png:
      drawn = [np.asarray(face["landmarks"]) for face in record["faces"]]
      canvas = plots.draw_landmarks(image, drawn, [f.box.as_list() for f in faces],
                                    landmark_mappings.output_spec(predictor.spec, num_points).edges)
      report.png_path = plots.save_png(os.path.join(out_dir, stems[i] + ".png"), canvas)
    elif not faces:
      report.message = f"{paths[i]}: no face found"
    return report

  with concurrent.futures.ThreadPoolExecutor(workers) as pool, \
       concurrent.futures.ThreadPoolExecutor(1) as writer:
    lookahead = collections.deque()
    next_index = 0
    pending: list[_Prepared] = []
    written: list[concurrent.futures.Future] = []

    def flush() -> None:
      if not pending:
        return
      faces = predictor._run_plans([p.image for p in pending], [p.plan for p in pending])
      for prepared, image_faces in zip(pending, faces):
        written.append(writer.submit(write, prepared.index, prepared.image, image_faces))
      if bar is not None:
        bar.update(len(pending))
      pending.clear()

    while next_index < len(paths) or lookahead:
      while next_index < len(paths) and len(lookahead) < 2 * max(group, workers):
        lookahead.append(pool.submit(prepare, next_index))
        next_index += 1
      prepared = lookahead.popleft().result()
      if prepared.error:
        if bar is not None:
          bar.update(1)
        log(f"skipped {prepared.error}")
        reports.append(FileReport(paths[prepared.index], "error", prepared.error))
        continue
      pending.append(prepared)
      if (len(pending) >= group
          or sum(len(p.plan[2]) for p in pending) >= predictor.batch_size):
        flush()
    flush()
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


def _parse_box(text: str) -> Box:
  try:
    return Box.parse(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def _int_at_least(minimum: int) -> Callable[[str], int]:
  """An argparse type: an integer of at least `minimum`."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
      raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value
  return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _layout(text: str) -> int:
  known = sorted({spec.num_points for spec in SPECS.values()})
  try:
    value = int(text)
  except ValueError:
    value = -1
  if value not in known:
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a landmark layout; use one of {', '.join(map(str, known))}")
  return value


def _parser() -> argparse.ArgumentParser:
  parser = cli.ArgumentParser(
      prog="python -m star_jax.predict",
      description="Facial landmarks on images and videos: writes <name>.json and an annotated "
                  "<name>.png per image, <name>.mp4 and <name>.jsonl per video.")
  parser.add_argument("inputs", nargs="*", metavar="INPUT",
                      help="image files, video files and/or folders")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--checkpoint",
                      help="a released model (wflw, 300w, cofw: downloaded once), a training "
                           "workdir, a checkpoint directory or an official STAR .pkl")
  source.add_argument("--model", help="an exported .onnx or .tflite model (star_jax.deploy.export), "
                                      "run by star_jax.deploy.runtime without JAX")
  parser.add_argument("--out", default="predictions", help="output folder (default: %(default)s)")
  parser.add_argument("--detector", default=detection.DEFAULT,
                      choices=[detection.DEFAULT] + detection.names(),
                      help="face detector (default: blazeface when installed, else lbp)")
  parser.add_argument("--box", type=_parse_box, default=None, metavar="x1,y1,x2,y2",
                      help="use this face box (every image) instead of detecting faces")
  parser.add_argument("--whole_image", action="store_true",
                      help="each image is one pre-cropped face: use the whole image as its box")
  parser.add_argument("--box_rule", choices=BOX_RULES, default=None,
                      help="how a box becomes the crop: 'official' (a box tight around the "
                           "landmarks, as the official demo reads it; default for --box), "
                           "'landmarks' (a landmark box read as the training crop) or "
                           "'detector' (the detector's calibrated rule; default otherwise)")
  parser.add_argument("--points", type=_layout, default=None,
                      help="output layout: e.g. 68 maps 98-point (WFLW) output to 300W points")
  parser.add_argument("--weights", choices=("default", "ema", "raw"), default="default",
                      help="EMA or raw weights (default: EMA; an official .pkl's 'net')")
  parser.add_argument("--batch_size", type=_positive_int, default=8,
                      help="faces per network call")
  parser.add_argument("--tta", choices=TTA_MODES, default="none",
                      help="test-time augmentation: 'flip' averages the prediction with that of "
                           "the mirrored crop")
  parser.add_argument("--workers", type=_positive_int, default=2,
                      help="threads decoding images and finding faces")
  video_group = parser.add_argument_group("video")
  video_group.add_argument("--camera", type=_non_negative_int, default=None, metavar="N",
                           help="read camera N (until Ctrl-C or --max_frames)")
  video_group.add_argument("--redetect_every", type=_positive_int, default=10, metavar="K",
                           help="run the detector every K frames (and when a track is lost)")
  video_group.add_argument("--no_smooth", action="store_true",
                           help="report raw landmarks (no One-Euro smoothing)")
  video_group.add_argument("--smooth_min_cutoff", type=float, default=0.3, metavar="HZ",
                           help="One-Euro cutoff of a still face (lower: steadier, more lag)")
  video_group.add_argument("--smooth_beta", type=float, default=4.0,
                           help="One-Euro speed coefficient, per face size per second")
  video_group.add_argument("--max_faces", type=_non_negative_int, default=0,
                           help="track at most this many faces, the largest (0: all)")
  video_group.add_argument("--max_frames", type=_non_negative_int, default=0,
                           help="stop after this many frames (0: all)")
  video_group.add_argument("--no_video", action="store_true",
                           help="write only the .jsonl of a video, not the annotated .mp4")
  return parser


def _output_names(image_stems: Sequence[str], video_stems: Sequence[str]) -> list[str]:
  """Every file a run may write into --out: per image <stem>.json and .png, per video
  <stem>.mp4 and .jsonl."""
  return ([s + ext for s in image_stems for ext in (".json", ".png")]
          + [s + ext for s in video_stems for ext in (".mp4", ".jsonl")])


def _main(argv: Sequence[str] | None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  if args.box is not None and args.whole_image:
    parser.error("give --box or --whole_image, not both")
  if not args.inputs and args.camera is None:
    parser.error("give an image, video or folder, or --camera N")
  if args.smooth_min_cutoff <= 0 or args.smooth_beta < 0:
    parser.error("--smooth_min_cutoff must be > 0 and --smooth_beta >= 0")
  from star_jax.commands import host
  host.configure_process()
  outputs.check_folder("--out", args.out)
  images: list[str] = []
  videos: list[str] = []
  for target in args.inputs:
    found_images, found_videos = list_inputs(target)
    if os.path.isdir(target):  # what an earlier run wrote there is not an input
      ours = outputs.written_here(target)
      found_images = [p for p in found_images if os.path.basename(p) not in ours]
      found_videos = [p for p in found_videos if os.path.basename(p) not in ours]
    if os.path.isdir(target) and not found_images and not found_videos:
      print(f"warning: folder {target} has no image or video files", file=sys.stderr)
    images.extend(found_images)
    videos.extend(found_videos)
  if (videos or args.camera is not None) and (args.box is not None or args.whole_image):
    print("warning: --box and --whole_image apply to images only; videos are tracked from "
          "detections", file=sys.stderr)
  stems = _output_stems(images + videos + ([f"camera{args.camera}"] if args.camera is not None
                                           else []))
  image_stems, video_stems = stems[:len(images)], stems[len(images):]
  if args.camera is not None:
    video_stems[-1] = f"camera{args.camera}"
  names = _output_names(image_stems, video_stems)
  outputs.check_folder_outputs("--out", args.out, names, inputs=images + videos)
  if args.detector != detection.DEFAULT:
    detection.get_detector(args.detector)  # an uninstalled detector fails before the model loads
  if args.model:
    from star_jax.deploy.runtime import RuntimePredictor
    predictor = RuntimePredictor(args.model, batch_size=args.batch_size, detector=args.detector,
                                 tta=args.tta)
  else:
    cli.require_training_install("predict --checkpoint (the JAX predictor; --model runs exports)")
    predictor = Predictor(args.checkpoint, weights=args.weights, batch_size=args.batch_size,
                          detector=args.detector, tta=args.tta)
  if args.points is not None:
    try:
      landmark_mappings.convert_landmarks(np.zeros((predictor.num_points, 2)), predictor.spec,
                                          args.points)
    except ValueError as e:
      raise UsageError(f"--points {args.points}: {e}") from None
  outputs.record_folder_outputs(args.out, names)
  reports = []
  if images:
    reports = predict_files(predictor, images, args.out, boxes=None if args.box is None
                            else [args.box], whole_image=args.whole_image,
                            box_rule=args.box_rule, num_points=args.points,
                            workers=args.workers, stems=image_stems)
  config = tracking.TrackerConfig(redetect_every=args.redetect_every, max_faces=args.max_faces)
  smoothing = tracking.SmoothingConfig(enabled=not args.no_smooth,
                                       min_cutoff=args.smooth_min_cutoff, beta=args.smooth_beta)

  def layout(points: np.ndarray) -> np.ndarray:
    if args.points is None:
      return points
    return landmark_mappings.convert_landmarks(points, predictor.spec, args.points)

  video_errors, video_reports = [], []
  sources: list[str | int] = list(videos) + ([args.camera] if args.camera is not None else [])
  for source, stem in zip(sources, video_stems):
    try:
      video_reports.append(video.run_video(
          source, args.out, stem, tracker=predictor.tracker(config, smoothing),
          to_output_layout=layout,
          edges=landmark_mappings.output_spec(predictor.spec, args.points).edges,
          write_video=not args.no_video, max_frames=args.max_frames))
    except video.VideoError as e:
      print(f"skipped {e}", file=sys.stderr)
      video_errors.append(str(source))
  ok = sum(r.status == "ok" for r in reports)
  no_face = [r.path for r in reports if r.status == "no_face"]
  errors = [r.path for r in reports if r.status == "error"] + video_errors
  if images:
    print(f"{ok} image(s) with faces, {len(no_face)} without, "
          f"{len(errors) - len(video_errors)} unreadable; outputs in {args.out}")
  for report in video_reports:
    print(f"{report.source}: {report.frames} frames ({report.frames_with_faces} with faces) in "
          f"{report.seconds:.1f} s, {report.fps:.1f} frames/s, {report.detections_run} "
          f"detector runs -> {report.video_path or report.jsonl_path}")
  for path in no_face:
    print(f"  no face: {path}")
  for path in errors:
    print(f"  unreadable: {path}")
  return 1 if errors else 0


def main(argv: Sequence[str] | None = None) -> int:
  """The CLI under the error contract (`star_jax.commands.cli.run`): one-line errors, exit 2 / 1."""
  return cli.run(lambda: _main(argv))


if __name__ == "__main__":
  sys.exit(main())
