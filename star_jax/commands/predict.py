"""`python -m star_jax.predict`: landmarks on photos, folders, videos and cameras (the arguments;
the work is star_jax.deploy.predict and the predictors).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import numpy as np

from star_jax.commands import cli
from star_jax.deploy import detection
from star_jax.core import landmark_mappings
from star_jax.core import outputs
from star_jax.deploy import tracking
from star_jax.deploy import video
from star_jax.core.schemes import SPECS
from star_jax.deploy.detection import Box
from star_jax.errors import UsageError
from star_jax.deploy.inference import TTA_MODES, Face, Predictor  # noqa: F401 (the public API)
from star_jax.deploy.predict import BOX_RULES, _output_stems, list_inputs, predict_files


def _parse_box(text: str) -> Box:
  try:
    return Box.parse(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


_positive_int = cli.int_at_least(1)
_non_negative_int = cli.int_at_least(0)


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
  source.add_argument("--model", help="an exported .onnx or .tflite model (python -m "
                                      "star_jax.export), run by star_jax.deploy.runtime without "
                                      "JAX")
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
  parser.add_argument("--spin", action="store_true",
                      help="with --model x.onnx: ONNX Runtime's threads spin between operators "
                           "instead of sleeping (faster on cores of its own, e.g. real-time "
                           "video; slower on a shared machine)")
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
  if args.spin and not args.model:
    parser.error("--spin applies to exported models (--model x.onnx), not to --checkpoint")
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
                                 tta=args.tta, spin=args.spin)
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
