"""Landmarks on arbitrary images: a Python API and the `python -m star_jax.predict` CLI.

    python -m star_jax.predict --checkpoint PATH IMAGE_OR_FOLDER [...] [--box x1,y1,x2,y2 |
        --whole_image] [--box_rule detector|official] [--out DIR] [--points 68] [--batch_size 8]

PATH is a training workdir, a star-jax checkpoint directory or an official STAR `.pkl`;
`--model M.onnx` (or `.tflite`, from `python -m star_jax.export`) runs an exported model with
`star_jax.runtime.RuntimePredictor` instead (same crop, detector and map-back, no JAX).
Without `--box`, faces are found by `star_jax.face_detection.detect_faces`; each box becomes the
crop the model was trained on (see that module for the calibrated rule). Faces of all inputs
are batched through one jitted network call per batch. For every image `DIR/<name>.json`
(boxes, crop, landmarks in original pixels) and `DIR/<name>.png` (annotated) are written; a
missing or unreadable file is reported by name and skipped, a face-less image is reported and
gets a JSON with no faces. `--whole_image` treats each image as one pre-cropped face (a face
filling the frame escapes most detectors). Exit status: 0 when every input was read, 1 when
some could not be, 2 for invalid arguments.

    predictor = Predictor("runs/wflw")                 # or an official .pkl
    faces = predictor.predict(image_rgb)               # list of (N, 2) arrays, pixels
    faces = predictor.predict(image_rgb, boxes=[(x1, y1, x2, y2)], box_rule="official")
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from typing import Callable, Iterable, Sequence

import numpy as np

from star_jax import checkpointing
from star_jax import cli
from star_jax import eval_lib
from star_jax import face_detection
from star_jax import landmark_mappings
from star_jax import plots
from star_jax.data import transforms
from star_jax.face_detection import Box
from star_jax.image_io import ImageError, load_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".pnm", ".bmp", ".dib",
                  ".tif", ".tiff", ".webp", ".gif", ".jp2")


def list_images(target: str) -> list[str]:
  """The image files of a folder (sorted, by suffix), or `[target]` for anything else."""
  if os.path.isdir(target):
    names = sorted(n for n in os.listdir(target) if n.lower().endswith(IMAGE_SUFFIXES))
    return [os.path.join(target, n) for n in names]
  return [target]


@dataclasses.dataclass
class Face:
  """One face's prediction: landmarks in original pixels, and where the crop came from."""

  landmarks: np.ndarray        # (N, 2) x, y
  box: Box
  box_source: str              # 'detector' or 'given'
  scale: float
  center: np.ndarray           # (2,)

  def to_json(self, num_points: int | None = None, source_spec=None) -> dict:
    lm = self.landmarks
    if num_points is not None and source_spec is not None:
      lm = landmark_mappings.convert_landmarks(lm, source_spec, num_points)
    return {"box": self.box.as_list(), "box_source": self.box_source,
            "scale": self.scale, "center": [float(c) for c in self.center],
            "landmarks": np.round(lm.astype(np.float64), 3).tolist()}


class Predictor:
  """Batched, jitted landmark prediction for whole images.

  Args:
    checkpoint: path for `checkpointing.load_model`, or a `checkpointing.LoadedModel`.
    weights: 'default', 'ema' or 'raw' (see `checkpointing.load_model`).
    batch_size: faces per network call; calls are padded to it so one compilation serves all.
    detector: `image_rgb -> list[Box]` used when no boxes are given.
  """

  def __init__(self, checkpoint, *, weights: str = "default", batch_size: int = 8,
               detector: Callable[[np.ndarray], list[Box]] | None = None):
    self.loaded = (checkpoint if isinstance(checkpoint, checkpointing.LoadedModel)
                   else checkpointing.load_model(checkpoint, weights=weights))
    self.spec = self.loaded.spec
    self._landmark_fn = eval_lib.landmark_fn_for(self.loaded)
    self.image_size = self.loaded.image_size
    self.batch_size = int(batch_size)
    self.detector = detector or face_detection.detect_faces

  @property
  def num_points(self) -> int:
    return self.loaded.num_points

  def predict_crops(self, crops_rgb_u8: np.ndarray) -> np.ndarray:
    """`(B, S, S, 3)` uint8 crops -> `(B, N, 2)` landmarks in [-1, 1] (in batches)."""
    crops = np.asarray(crops_rgb_u8)
    out = []
    for start in range(0, len(crops), self.batch_size):
      chunk = eval_lib.normalize_crops(crops[start:start + self.batch_size])
      n = len(chunk)
      if n < self.batch_size:  # pad: fixed shapes, one compilation
        chunk = np.concatenate([chunk, np.zeros((self.batch_size - n,) + chunk.shape[1:],
                                                chunk.dtype)])
      out.append(np.asarray(self._landmark_fn(self.loaded.variables, chunk))[:n])
    if not out:
      return np.zeros((0, self.num_points, 2), np.float32)
    return np.concatenate(out)

  def faces_to_crops(self, image_rgb: np.ndarray, boxes: Sequence[Box], box_rule: str
                     ) -> tuple[np.ndarray, list[tuple[float, np.ndarray, np.ndarray]]]:
    """Crops (K, S, S, 3) uint8 and (scale, center, matrix) per box."""
    crops, geometry = [], []
    for box in boxes:
      scale, center = face_detection.box_to_crop(box, box_rule)
      matrix = transforms.crop_matrix(scale, center[0], center[1], self.image_size)
      crops.append(transforms.warp(image_rgb, matrix, self.image_size))
      geometry.append((scale, center, matrix))
    shape = (0, self.image_size, self.image_size, 3)
    return (np.stack(crops) if crops else np.zeros(shape, np.uint8)), geometry

  def _boxes(self, image_rgb: np.ndarray, boxes) -> tuple[list[Box], str, str]:
    if boxes is None:
      return list(self.detector(image_rgb)), "detector", "detector"
    parsed = [b if isinstance(b, Box) else Box(*map(float, b)) for b in boxes]
    return parsed, "given", "official"

  def predict_faces(self, images: Sequence[np.ndarray], boxes: Sequence | None = None, *,
                    box_rule: str | None = None) -> list[list[Face]]:
    """Faces of several images, batched together. `boxes[i]` (or None: detect) per image."""
    all_crops, owners = [], []
    plans = []
    for i, image in enumerate(images):
      found, source, default_rule = self._boxes(image, None if boxes is None else boxes[i])
      crops, geometry = self.faces_to_crops(image, found, box_rule or default_rule)
      all_crops.append(crops)
      owners.extend([i] * len(found))
      plans.append((found, source, geometry))
    landmarks = self.predict_crops(np.concatenate(all_crops)) if owners else None
    results: list[list[Face]] = [[] for _ in images]
    k = 0
    for i, (found, source, geometry) in enumerate(plans):
      for box, (scale, center, matrix) in zip(found, geometry):
        pts = transforms.landmarks_to_original(landmarks[k], matrix, self.image_size)
        results[i].append(Face(pts, box, source, scale, center))
        k += 1
    return results

  def predict(self, image_rgb: np.ndarray, boxes: Sequence | None = None, *,
              box_rule: str | None = None, num_points: int | None = None) -> list[np.ndarray]:
    """Landmarks `(N, 2)` (original pixels, x y) of each face in an RGB uint8 image.

    `boxes`: `(x1, y1, x2, y2)` per face, or None to detect. A given box is read with the
    official demo's rule (tight around the landmarks) unless `box_rule` says 'detector'.
    `num_points=68` maps 98-point output to the 300W layout.
    """
    faces = self.predict_faces([np.asarray(image_rgb)], None if boxes is None else [boxes],
                               box_rule=box_rule)[0]
    out = [f.landmarks for f in faces]
    if num_points is not None:
      out = [landmark_mappings.convert_landmarks(lm, self.spec, num_points) for lm in out]
    return out


@dataclasses.dataclass
class FileReport:
  path: str
  status: str                  # 'ok', 'no_face', 'error'
  message: str = ""
  json_path: str = ""
  png_path: str = ""
  num_faces: int = 0


def _format_json(record: dict) -> str:
  """Indented JSON with each [x, y] pair (and each box) kept on one line."""
  text = json.dumps(record, indent=1)
  number = r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
  text = re.sub(r"\[\s*(" + number + r")((?:,\s*" + number + r")*)\s*\]",
                lambda m: "[" + m.group(1) + re.sub(r",\s*", ", ", m.group(2)) + "]", text)
  return text + "\n"


def _output_stems(paths: Sequence[str]) -> list[str]:
  """Output names per input: the file stem, or stem_ext when two inputs share a stem."""
  stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  counts = {s: stems.count(s) for s in stems}
  return [s if counts[s] == 1 else f"{s}_{os.path.splitext(p)[1].lstrip('.').lower()}"
          for s, p in zip(stems, paths)]


def predict_files(predictor: Predictor, paths: Sequence[str], out_dir: str, *,
                  boxes: Sequence[Box] | None = None, whole_image: bool = False,
                  box_rule: str | None = None,
                  num_points: int | None = None, images_per_batch: int | None = None,
                  log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
                  progress: bool = True) -> list[FileReport]:
  """Predicts every image file, writing `<stem>.json` and `<stem>.png` into `out_dir`.

  Unreadable and missing files are reported (by `log`) and skipped; the others are processed.
  Images are decoded a group at a time and their faces batched together. `boxes` are used for
  every image; `whole_image=True` takes each image itself as the face box (pre-cropped faces,
  which detectors tend to miss).
  """
  os.makedirs(out_dir, exist_ok=True)
  stems = _output_stems(paths)
  group = max(1, images_per_batch or predictor.batch_size)
  reports: list[FileReport] = []
  iterator: Iterable[int] = range(0, len(paths), group)
  if progress and len(paths) > group:
    from tqdm import tqdm
    iterator = tqdm(iterator, total=-(-len(paths) // group), desc="predict", unit="group",
                    file=sys.stderr)
  for start in iterator:
    loaded = []
    for i in range(start, min(start + group, len(paths))):
      try:
        loaded.append((i, load_image(paths[i])))
      except ImageError as e:
        log(f"skipped {e}")
        reports.append(FileReport(paths[i], "error", str(e)))
    if not loaded:
      continue
    if whole_image:
      # Pixel-centre extent (0 .. W-1), the convention of landmark boxes.
      image_boxes = [[Box(0, 0, img.shape[1] - 1, img.shape[0] - 1)] for _, img in loaded]
    else:
      image_boxes = None if boxes is None else [boxes] * len(loaded)
    faces = predictor.predict_faces([img for _, img in loaded], image_boxes, box_rule=box_rule)
    for (i, image), image_faces in zip(loaded, faces):
      report = FileReport(paths[i], "ok" if image_faces else "no_face",
                          num_faces=len(image_faces))
      record = {"image": os.path.abspath(paths[i]), "width": int(image.shape[1]),
                "height": int(image.shape[0]),
                "num_points": num_points or predictor.num_points,
                "faces": [f.to_json(num_points, predictor.spec) for f in image_faces]}
      report.json_path = os.path.join(out_dir, stems[i] + ".json")
      with open(report.json_path, "w") as f:
        f.write(_format_json(record))
      if image_faces:
        drawn = [np.asarray(face["landmarks"]) for face in record["faces"]]
        canvas = plots.draw_landmarks(image, drawn, [f.box.as_list() for f in image_faces])
        report.png_path = plots.save_png(os.path.join(out_dir, stems[i] + ".png"), canvas)
      else:
        report.message = f"{paths[i]}: no face found"
        log(report.message)
      reports.append(report)
  order = {p: k for k, p in enumerate(paths)}
  reports.sort(key=lambda r: order.get(r.path, 0))
  return reports


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m star_jax.predict",
      description="Facial landmarks on images: writes <name>.json and an annotated <name>.png "
                  "per image.")
  parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER",
                      help="image files and/or folders of images")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--checkpoint",
                      help="training workdir, checkpoint directory or official STAR .pkl")
  source.add_argument("--model", help="an exported .onnx or .tflite model (star_jax.export), "
                                      "run by star_jax.runtime without JAX")
  parser.add_argument("--box", default=None, metavar="x1,y1,x2,y2",
                      help="use this face box (every image) instead of detecting faces")
  parser.add_argument("--whole_image", action="store_true",
                      help="each image is one pre-cropped face: use the whole image as its box")
  parser.add_argument("--box_rule", choices=("official", "detector"), default=None,
                      help="how a box becomes the crop: 'official' (box tight around the "
                           "landmarks, the official demo; default for --box) or 'detector' "
                           "(a box from this package's detector; default without --box)")
  parser.add_argument("--out", default="predictions", help="output folder (default: %(default)s)")
  parser.add_argument("--points", type=int, default=None,
                      help="output layout: e.g. 68 maps 98-point (WFLW) output to 300W points")
  parser.add_argument("--weights", choices=("default", "ema", "raw"), default="default",
                      help="EMA or raw weights (default: EMA; an official .pkl's 'net')")
  parser.add_argument("--batch_size", type=int, default=8, help="faces per network call")
  return parser.parse_args(argv)


def _main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(argv)
  from star_jax import host
  host.configure_process()
  try:
    boxes = None if args.box is None else [Box.parse(args.box)]
  except ValueError as e:
    print(f"error: --box: {e}", file=sys.stderr)
    return 2
  if boxes is not None and args.whole_image:
    print("error: give --box or --whole_image, not both", file=sys.stderr)
    return 2
  paths: list[str] = []
  for target in args.inputs:
    found = list_images(target)
    if os.path.isdir(target) and not found:
      print(f"warning: folder {target} has no image files", file=sys.stderr)
    paths.extend(found)
  if args.model:
    from star_jax.runtime import RuntimePredictor  # pylint: disable=g-import-not-at-top
    predictor = RuntimePredictor(args.model, batch_size=args.batch_size)
  else:
    predictor = Predictor(args.checkpoint, weights=args.weights, batch_size=args.batch_size)
  if args.points is not None:
    # Fail before any work when the mapping does not exist.
    landmark_mappings.convert_landmarks(np.zeros((predictor.num_points, 2)), predictor.spec,
                                        args.points)
  reports = predict_files(predictor, paths, args.out, boxes=boxes,
                          whole_image=args.whole_image, box_rule=args.box_rule,
                          num_points=args.points)
  ok = sum(r.status == "ok" for r in reports)
  no_face = [r.path for r in reports if r.status == "no_face"]
  errors = [r.path for r in reports if r.status == "error"]
  print(f"{ok} image(s) with faces, {len(no_face)} without, {len(errors)} unreadable; "
        f"outputs in {args.out}")
  for path in no_face:
    print(f"  no face: {path}")
  for path in errors:
    print(f"  unreadable: {path}")
  return 1 if errors else 0


main = cli.main_wrapper(_main)


if __name__ == "__main__":
  sys.exit(main())
