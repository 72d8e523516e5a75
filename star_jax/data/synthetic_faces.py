"""The drawn faces of the embedded dataset: one face-like image and its 98 WFLW-style landmarks.

`generate_sample(rng)` is a pure function of its `numpy.random.Generator` (numpy + OpenCV
drawing): it samples a face (`FaceParams`: pose, size, position, expression, colours, make-up,
lighting, occlusion, blur), lays out the canonical landmarks for the image-left half of the face
and mirrors them through the WFLW flip pairs (so mirroring an image maps every landmark onto its
flip partner), projects them with the pose and paints the image on a random background. The
dataset on disk (splits, TSVs, cache, preview) is `star_jax.data.embedded`.
"""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np

from star_jax.core.schemes import WFLW

_SUBPIXEL_SHIFT = 4  # cv2 drawing with 1/16 pixel precision
_SUBPIXEL = float(1 << _SUBPIXEL_SHIFT)


# ----------------------------------------------------------------------------------------------
# Face layout


@dataclasses.dataclass(frozen=True)
class FaceParams:
  """Everything one face draws; the attribute tags derive from it."""

  roll_deg: float
  yaw: float            # radians, rotation about the vertical axis
  pitch: float          # radians, rotation about the horizontal axis
  mouth_open: float     # inner-lip gap, face half-widths
  smile: float          # mouth-corner lift
  brow_raise: float
  eye_open: tuple[float, float]   # per eye (image-left, image-right), 1 = fully open
  gaze: tuple[float, float]       # pupil offset in eye half-sizes (x, y)

  @property
  def large_pose(self) -> bool:
    return abs(self.roll_deg) > 30.0 or abs(self.yaw) > 0.5

  @property
  def expressive(self) -> bool:
    return (self.mouth_open > 0.12 or self.smile > 0.07 or self.brow_raise > 0.08
            or min(self.eye_open) < 0.35)


def _sample_face_params(rng: np.random.Generator) -> FaceParams:
  if rng.random() < 0.15:
    roll = float(rng.choice([-1.0, 1.0]) * rng.uniform(30.0, 55.0))
  else:
    roll = float(np.clip(rng.normal(0.0, 10.0), -28.0, 28.0))
  if rng.random() < 0.2:
    yaw = float(rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 0.85))
  else:
    yaw = float(rng.uniform(-0.35, 0.35))
  pitch = float(rng.uniform(-0.2, 0.2))
  if rng.random() < 0.35:  # a marked expression
    kind = rng.integers(4)
    mouth_open = float(rng.uniform(0.14, 0.3)) if kind == 0 else float(rng.uniform(0.0, 0.05))
    smile = float(rng.uniform(0.08, 0.14)) if kind == 1 else float(rng.uniform(0.0, 0.03))
    brow_raise = float(rng.uniform(0.09, 0.16)) if kind == 2 else float(rng.uniform(0.0, 0.04))
    if kind == 3:
      eye_open = (float(rng.uniform(0.05, 0.3)), float(rng.uniform(0.05, 0.3)))
    else:
      eye_open = (float(rng.uniform(0.7, 1.0)), float(rng.uniform(0.7, 1.0)))
  else:
    mouth_open = float(rng.uniform(0.0, 0.06))
    smile = float(rng.uniform(0.0, 0.04))
    brow_raise = float(rng.uniform(0.0, 0.05))
    eye_open = (float(rng.uniform(0.65, 1.0)), float(rng.uniform(0.65, 1.0)))
  gaze = (float(rng.uniform(-0.35, 0.35)), float(rng.uniform(-0.2, 0.2)))
  return FaceParams(roll, yaw, pitch, mouth_open, smile, brow_raise, eye_open, gaze)


def _half_face(params: FaceParams, rng: np.random.Generator) -> dict[int, tuple[float, float]]:
  """Canonical points of the image-left half and the midline (x right, y down, unit half-width)."""
  pts: dict[int, tuple[float, float]] = {}
  # Face proportions vary a little from face to face.
  jaw_drop = rng.uniform(1.2, 1.4)
  temple_y = rng.uniform(-0.2, -0.05)
  chin_narrow = rng.uniform(0.1, 0.25)
  for k in range(17):  # 0 (temple) .. 16 (chin)
    theta = math.pi - math.pi / 2 * k / 16
    s = math.sin(theta)
    pts[k] = (math.cos(theta) * (1.0 - chin_narrow * s * s), temple_y + (jaw_drop - temple_y) * s)
  # Right brow (image-left): 33 outer, upper arc to 37 inner, lower arc 38..41 back outward.
  brow_y = rng.uniform(-0.5, -0.4) - params.brow_raise
  outer, inner = -rng.uniform(0.8, 0.9), -rng.uniform(0.12, 0.2)
  arch = rng.uniform(0.1, 0.18)
  thick = rng.uniform(0.06, 0.11)
  for j in range(5):
    f = j / 4
    x = outer + (inner - outer) * f
    pts[33 + j] = (x, brow_y - arch * math.sin(math.pi * (0.15 + 0.7 * f)) + 0.04 * f)
  for j in range(4):
    f = 1 - (j + 1) / 5   # 38 near the inner end, 41 near the outer end
    x = outer + (inner - outer) * f
    pts[38 + j] = (x, brow_y - arch * math.sin(math.pi * (0.15 + 0.7 * f)) + 0.04 * f + thick)
  # Right eye (image-left): 60 outer corner, upper lid 61-63, 64 inner corner, lower lid 65-67.
  eye_cx, eye_cy = -rng.uniform(0.4, 0.48), rng.uniform(-0.15, -0.05)
  eye_hw = rng.uniform(0.19, 0.24)
  eye_hh = rng.uniform(0.08, 0.11) * max(params.eye_open[0], 0.04)
  tilt = rng.uniform(-0.03, 0.03)
  for j in range(5):  # 60..64, outer (left) to inner (right)
    f = j / 4
    x = eye_cx - eye_hw + 2 * eye_hw * f
    pts[60 + j] = (x, eye_cy - tilt * (1 - 2 * f) - eye_hh * math.sin(math.pi * f) * 1.1)
  for j in range(3):  # 65..67, inner to outer
    f = 1 - (j + 1) / 4
    x = eye_cx - eye_hw + 2 * eye_hw * f
    pts[65 + j] = (x, eye_cy - tilt * (1 - 2 * f) + eye_hh * math.sin(math.pi * f) * 0.8)
  pts[96] = (eye_cx + params.gaze[0] * eye_hw * 0.6,
             eye_cy + params.gaze[1] * eye_hh * 0.5)
  # Nose: bridge 51 (top) .. 54 (tip) on the midline; nostrils 55 .. 57 (centre).
  nose_top, nose_tip = rng.uniform(-0.08, 0.0), rng.uniform(0.42, 0.52)
  for j in range(4):
    pts[51 + j] = (0.0, nose_top + (nose_tip - nose_top) * j / 3)
  nostril_w = rng.uniform(0.16, 0.22)
  pts[55] = (-nostril_w, nose_tip + 0.04)
  pts[56] = (-nostril_w / 2, nose_tip + 0.08)
  pts[57] = (0.0, nose_tip + 0.1)
  # Lips: outer 76 (corner), 77-79 upper, 85-87 lower; inner 88 (corner), 89-90 upper, 94-95.
  mouth_y = rng.uniform(0.82, 0.92)
  half_w = rng.uniform(0.28, 0.36) + params.smile
  corner_y = mouth_y - 1.6 * params.smile
  upper_h, lower_h = rng.uniform(0.07, 0.1), rng.uniform(0.08, 0.12)
  gap = params.mouth_open
  top = mouth_y - gap / 2
  bottom = mouth_y + gap / 2
  pts[76] = (-half_w, corner_y)
  pts[77] = (-half_w * 0.62, top - upper_h * 0.8)
  pts[78] = (-half_w * 0.25, top - upper_h * 1.05)
  pts[79] = (0.0, top - upper_h * 0.8)
  pts[87] = (-half_w * 0.62, bottom + lower_h * 0.75)
  pts[86] = (-half_w * 0.28, bottom + lower_h)
  pts[85] = (0.0, bottom + lower_h * 1.05)
  inner_w = half_w * 0.82
  pts[88] = (-inner_w, corner_y + 0.005)
  pts[89] = (-inner_w * 0.45, top - 0.012)
  pts[90] = (0.0, top - 0.008)
  pts[95] = (-inner_w * 0.45, bottom + 0.012)
  pts[94] = (0.0, bottom + 0.015)
  return pts


def _depth(points: np.ndarray) -> np.ndarray:
  """How far each canonical point stands out towards the camera (an ellipsoid plus the nose)."""
  x = points[:, 0]
  z = 0.65 * np.sqrt(np.clip(1.0 - x * x, 0.0, 1.0))
  return z


_NOSE_RELIEF = {51: 0.12, 52: 0.2, 53: 0.28, 54: 0.38, 55: 0.1, 56: 0.16, 57: 0.2, 58: 0.16,
                59: 0.1}


def canonical_landmarks(params: FaceParams, rng: np.random.Generator) -> np.ndarray:
  """The 98 canonical (frontal, unit half-width) points, mirrored through the WFLW flip pairs."""
  half = _half_face(params, rng)
  pts = np.full((WFLW.num_points, 2), np.nan, np.float64)
  for index, xy in half.items():
    pts[index] = xy
  for a, b in WFLW.flip_pairs:
    # Every pair lists its image-left point first; mirror it onto the right one.
    pts[b] = (-pts[a, 0], pts[a, 1])
  # The right eye may be more or less open than the left one.
  right_eye = [68 + j for j in range(8)] + [97]
  eye_cy = pts[[68, 72], 1].mean()
  ratio = max(params.eye_open[1], 0.04) / max(params.eye_open[0], 0.04)
  pts[right_eye, 1] = eye_cy + (pts[right_eye, 1] - eye_cy) * ratio
  # Natural asymmetry: a little independent jitter on every point.
  pts += rng.normal(0.0, 0.006, size=pts.shape)
  assert not np.isnan(pts).any(), "canonical layout misses a point"
  return pts


def _project(points: np.ndarray, relief: np.ndarray, params: FaceParams) -> np.ndarray:
  """Turns canonical points by yaw and pitch (orthographic) and then by the in-plane roll."""
  z = _depth(points) + relief
  x, y = points[:, 0], points[:, 1]
  cy, sy = math.cos(params.yaw), math.sin(params.yaw)
  x1 = x * cy + z * sy
  z1 = -x * sy + z * cy
  cp, sp = math.cos(params.pitch), math.sin(params.pitch)
  y1 = y * cp - z1 * sp
  r = math.radians(params.roll_deg)
  cr, sr = math.cos(r), math.sin(r)
  return np.stack([x1 * cr - y1 * sr, x1 * sr + y1 * cr], axis=-1)


# ----------------------------------------------------------------------------------------------
# Drawing


def _poly(points: np.ndarray) -> np.ndarray:
  return np.round(points * _SUBPIXEL).astype(np.int32).reshape(-1, 1, 2)


def _fill(img: np.ndarray, points: np.ndarray, color) -> None:
  cv2.fillPoly(img, [_poly(points)], _color(color), cv2.LINE_AA, _SUBPIXEL_SHIFT)


def polyline(img: np.ndarray, points: np.ndarray, closed: bool, color, thickness: float) -> None:
  """Anti-aliased polyline at 1/16 pixel precision (`thickness` rounded, at least 1)."""
  cv2.polylines(img, [_poly(points)], closed, _color(color), max(1, int(round(thickness))),
                cv2.LINE_AA, _SUBPIXEL_SHIFT)


def _ellipse(img, center, axes, angle_deg, color, thickness=-1) -> None:
  c = (int(round(center[0] * _SUBPIXEL)), int(round(center[1] * _SUBPIXEL)))
  a = (max(1, int(round(axes[0] * _SUBPIXEL))), max(1, int(round(axes[1] * _SUBPIXEL))))
  cv2.ellipse(img, c, a, angle_deg, 0, 360, _color(color), thickness, cv2.LINE_AA,
              _SUBPIXEL_SHIFT)


def _color(c) -> tuple[float, float, float]:
  return tuple(float(np.clip(v, 0, 255)) for v in c)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  kind = rng.integers(4)
  if kind == 0:  # smooth coloured noise
    cells = int(rng.integers(2, 12))
    low = rng.uniform(0, 255, size=(cells, cells, 3)).astype(np.float32)
    img = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
  elif kind == 1:  # linear gradient between two colours
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (xx * math.cos(angle) + yy * math.sin(angle))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    img = a[None, None, :] * (1 - t[..., None]) + b[None, None, :] * t[..., None]
  else:  # random shapes on a flat or gradient base
    base = np.empty((h, w, 3), np.float32)
    base[:] = rng.uniform(0, 255, 3)
    if kind == 3:
      base *= np.linspace(rng.uniform(0.5, 1.0), rng.uniform(0.8, 1.3), w)[None, :, None]
    # Drawn on uint8: OpenCV anti-aliases only 8-bit images.
    img = np.clip(base, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(6, 25))):
      color = rng.uniform(0, 255, 3)
      shape = rng.integers(3)
      cx, cy = rng.uniform(-0.1, 1.1) * w, rng.uniform(-0.1, 1.1) * h
      size = rng.uniform(0.03, 0.3) * max(h, w)
      if shape == 0:
        _ellipse(img, (cx, cy), (size, size * rng.uniform(0.3, 1.0)), rng.uniform(0, 180), color)
      elif shape == 1:
        box = cv2.boxPoints(((cx, cy), (size, size * rng.uniform(0.2, 1.0)), rng.uniform(0, 180)))
        _fill(img, box, color)
      else:
        end = np.array([cx + rng.normal(0, size), cy + rng.normal(0, size)])
        polyline(img, np.array([[cx, cy], end]), False, color, rng.uniform(1, 6))
  # Fine grain so that no region is perfectly flat.
  img = img.astype(np.float32) + rng.normal(0, rng.uniform(2, 12), size=(h, w, 1))
  return np.clip(np.round(img), 0, 255).astype(np.uint8)


_SKIN_TONES = np.array([[235, 200, 175], [225, 180, 150], [200, 150, 115], [170, 120, 90],
                        [130, 90, 65], [95, 65, 45], [240, 210, 190]], np.float64)  # RGB
_HAIR_COLORS = np.array([[25, 20, 18], [60, 40, 25], [110, 75, 40], [170, 130, 80],
                         [90, 90, 90], [40, 30, 30]], np.float64)


def _blend(img: np.ndarray, layer: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Puts `layer` over `img` where the uint8 coverage `mask` (0..255) says, as uint8."""
  m = mask[..., None].astype(np.float32) / 255.0
  out = img.astype(np.float32) * (1.0 - m) + layer.astype(np.float32) * m
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Sample:
  """One generated image with its annotation."""

  image: np.ndarray      # uint8 (H, W, 3) RGB
  landmarks: np.ndarray  # (98, 2) float64 pixels
  tags: np.ndarray       # (6,) int32


def generate_sample(rng: np.random.Generator) -> Sample:
  """Draws one synthetic face (RGB uint8) with its 98 landmarks and attribute tags."""
  h, w = (int(v) for v in rng.integers(256, 321, size=2))
  params = _sample_face_params(rng)
  canon = canonical_landmarks(params, rng)
  relief = np.zeros(WFLW.num_points)
  for index, r in _NOSE_RELIEF.items():
    relief[index] = r
  relief[76:96] = 0.06
  # Extra outlines (not landmarks): forehead arc, hairline, neck, nostril holes.
  temple_l, temple_r = canon[0], canon[32]
  phi = np.linspace(0.0, math.pi, 25)
  top_h = rng.uniform(0.95, 1.15)
  forehead = np.stack([np.cos(phi) * temple_r[0], (temple_r[1] + temple_l[1]) / 2
                       - top_h * np.sin(phi)], axis=-1)
  hair_outer = forehead * np.array([1.08, 1.0]) + np.array([0.0, -0.06])
  hairline_y = rng.uniform(-0.75, -0.6)
  hairline = np.stack([np.cos(phi[::-1]) * temple_r[0] * 0.96,
                       hairline_y + 0.25 * (np.cos(phi[::-1]) ** 2)], axis=-1)
  neck = np.array([[-0.5, 0.9], [-0.55, 3.0], [0.55, 3.0], [0.5, 0.9]])
  extra = np.concatenate([forehead, hair_outer, hairline, neck])
  extra_relief = np.zeros(len(extra))

  face_units = rng.uniform(0.45, 0.75) * min(h, w) / 2  # pixels per canonical unit
  all_pts = _project(np.concatenate([canon, extra]),
                     np.concatenate([relief, extra_relief]), params) * face_units
  lm = all_pts[:WFLW.num_points]
  # Place the landmark box inside the image (a little overhang allowed), at a random spot.
  lo, hi = lm.min(axis=0), lm.max(axis=0)
  size = np.array([w, h], np.float64)
  margin = 0.03 * size
  low_shift = -lo + margin
  high_shift = size - 1 - hi - margin
  shift = np.where(high_shift > low_shift, rng.uniform(0, 1, 2) * (high_shift - low_shift)
                   + low_shift, (size - 1) / 2 - (lo + hi) / 2)
  all_pts = all_pts + shift
  lm = all_pts[:WFLW.num_points]
  n = len(forehead)
  forehead_px = all_pts[98:98 + n]
  hair_outer_px = all_pts[98 + n:98 + 2 * n]
  hairline_px = all_pts[98 + 2 * n:98 + 3 * n]
  neck_px = all_pts[98 + 3 * n:]
  unit = face_units  # stroke widths scale with the face

  img = _background(rng, h, w)
  skin = _SKIN_TONES[rng.integers(len(_SKIN_TONES))] * rng.uniform(0.9, 1.08, 3)
  hair = _HAIR_COLORS[rng.integers(len(_HAIR_COLORS))] * rng.uniform(0.85, 1.15, 3)
  shade = skin * 0.72

  _fill(img, neck_px, skin * 0.85)
  if rng.random() < 0.7:  # hair behind the head
    _fill(img, np.concatenate([hair_outer_px, lm[32:33], lm[0:1]]), hair)
  contour = lm[0:33]
  _fill(img, np.concatenate([contour, forehead_px[1:-1]]), skin)
  if rng.random() < 0.6:  # hair on the forehead, above the hairline
    _fill(img, np.concatenate([forehead_px, hairline_px]), hair)
  # Cheek shading and jaw line make the contour visible on any background.
  polyline(img, contour, False, shade, 0.025 * unit)

  makeup = rng.random() < 0.2
  if makeup:
    shadow = rng.uniform(40, 200, 3)
    for eye in (lm[60:68], lm[68:76]):
      centre = eye.mean(axis=0)
      _fill(img, centre + (eye - centre) * np.array([1.25, 2.2]), shadow)
  # Brows.
  brow_color = hair * rng.uniform(0.6, 1.0)
  _fill(img, lm[33:42], brow_color)
  _fill(img, lm[42:51], brow_color)
  # Eyes: sclera, iris and pupil clipped to the lids, dark lid line.
  sclera = np.array([235, 232, 225]) * rng.uniform(0.85, 1.0)
  iris_color = rng.choice(np.array([[70, 45, 25], [40, 90, 140], [70, 110, 60], [30, 25, 20]]),
                          axis=0) * rng.uniform(0.8, 1.2)
  iris_r = rng.uniform(0.075, 0.095) * unit
  for eye, pupil in ((lm[60:68], lm[96]), (lm[68:76], lm[97])):
    x0, y0 = np.floor(eye.min(axis=0)).astype(int) - 2
    x1, y1 = np.ceil(eye.max(axis=0)).astype(int) + 3
    x0, y0 = max(x0, 0), max(y0, 0)
    x1, y1 = min(x1, w), min(y1, h)
    if x1 - x0 < 2 or y1 - y0 < 2:
      continue
    roi = img[y0:y1, x0:x1]
    offset = np.array([x0, y0], np.float64)
    layer = np.empty_like(roi)
    layer[:] = _color(sclera)
    _ellipse(layer, pupil - offset, (iris_r, iris_r), 0, iris_color)
    _ellipse(layer, pupil - offset, (iris_r * 0.45, iris_r * 0.45), 0, (10, 10, 10))
    _ellipse(layer, pupil - offset + iris_r * 0.3, (iris_r * 0.15, iris_r * 0.15), 0,
             (250, 250, 250))
    mask = np.zeros(roi.shape[:2], np.uint8)
    _fill(mask, eye - offset, (255, 255, 255))
    img[y0:y1, x0:x1] = _blend(roi, layer, mask)
    polyline(img, eye, True, hair * 0.5, 0.018 * unit)
    polyline(img, eye[:5], False, (20, 15, 15), 0.03 * unit)  # upper lid, heavier
  # Nose: bridge shading, nostril curve, nostril holes.
  polyline(img, lm[51:55], False, shade, 0.03 * unit)
  polyline(img, lm[55:60], False, shade * 0.85, 0.025 * unit)
  for a, b in ((55, 56), (58, 59)):
    centre = (lm[a] + lm[b]) / 2 - (lm[57] - lm[54]) * 0.25
    _ellipse(img, centre, (0.04 * unit, 0.022 * unit),
             math.degrees(math.atan2(lm[b, 1] - lm[a, 1], lm[b, 0] - lm[a, 0])), shade * 0.45)
  # Lips: outer loop filled, inner mouth dark when open, a lip line when closed.
  lip = (np.array([rng.uniform(150, 230), rng.uniform(20, 60), rng.uniform(40, 140)])
         if makeup else skin * np.array([0.85, 0.55, 0.55]) * rng.uniform(0.85, 1.05))
  _fill(img, lm[76:88], lip)
  if params.mouth_open > 0.03:
    _fill(img, lm[88:96], (45, 15, 20))
    teeth = lm[88:96].copy()
    teeth_top = lm[[88, 89, 90, 91, 92]]
    band = np.concatenate([teeth_top, teeth_top[::-1] + np.array([0.0, 0.35]) *
                           (lm[94] - lm[90])[1]])
    del teeth
    _fill(img, band, (235, 230, 215))
  else:
    polyline(img, lm[88:93], False, lip * 0.45, 0.02 * unit)

  # Illumination: a strong directional light or an overall dark / bright cast.
  img = img.astype(np.float32)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  illumination = rng.random() < 0.2
  if illumination:
    angle = rng.uniform(0, 2 * math.pi)
    t = (xx - w / 2) * math.cos(angle) + (yy - h / 2) * math.sin(angle)
    t = t / (0.5 * max(h, w))
    gain = rng.uniform(0.7, 1.1) + rng.uniform(0.3, 0.6) * t
    gain *= rng.choice([rng.uniform(0.45, 0.7), rng.uniform(1.0, 1.3)])
    img = img * np.clip(gain, 0.2, 1.8)[..., None]
  else:
    img = img * rng.uniform(0.9, 1.1) + rng.uniform(-10, 10)

  # Occlusion: one or two patches over part of the face.
  occlusion = False
  if rng.random() < 0.3:
    covered = np.zeros(WFLW.num_points, bool)
    for _ in range(int(rng.integers(1, 3))):
      anchor = lm[rng.integers(WFLW.num_points)]
      half = rng.uniform(0.15, 0.4, 2) * unit * 1.5
      angle = float(rng.uniform(0, 180))
      box = cv2.boxPoints(((float(anchor[0]), float(anchor[1])),
                           (float(2 * half[0]), float(2 * half[1])), angle))
      mask = np.zeros((h, w), np.uint8)
      if rng.random() < 0.5:
        _fill(mask, box, (255, 255, 255))
      else:
        _ellipse(mask, anchor, half, angle, (255, 255, 255))
      if rng.random() < 0.5:
        layer = np.empty_like(img)
        layer[:] = rng.uniform(0, 255, 3)
      else:
        cells = int(rng.integers(2, 8))
        low = rng.uniform(0, 255, size=(cells, cells, 3)).astype(np.float32)
        layer = cv2.resize(low, (w, h), interpolation=cv2.INTER_LINEAR)
      m = mask[..., None].astype(np.float32) / 255.0
      img = img * (1.0 - m) + layer * m
      ij = np.clip(np.round(lm).astype(int), 0, [w - 1, h - 1])
      covered |= mask[ij[:, 1], ij[:, 0]] > 127
    # Tagged only when the patches hide a noticeable part of the face.
    occlusion = covered.sum() >= 5

  # Sensor noise, then blur for some images.
  img = img + rng.normal(0, rng.uniform(1, 5), size=img.shape).astype(np.float32)
  blur = rng.random() < 0.2
  if blur:
    if rng.random() < 0.6:
      sigma = rng.uniform(1.5, 3.0)
      img = cv2.GaussianBlur(img, (0, 0), sigma)
    else:
      length = int(rng.integers(5, 11))
      kernel = np.zeros((length, length), np.float32)
      kernel[length // 2, :] = 1.0 / length
      rot = cv2.getRotationMatrix2D(((length - 1) / 2, (length - 1) / 2), rng.uniform(0, 180), 1)
      kernel = cv2.warpAffine(kernel, rot, (length, length))
      kernel /= max(float(kernel.sum()), 1e-6)
      img = cv2.filter2D(img, -1, kernel)
  image = np.clip(np.round(img), 0, 255).astype(np.uint8)

  tags = np.array([params.large_pose, params.expressive, illumination, makeup, occlusion, blur],
                  np.int32)
  return Sample(image=image, landmarks=lm, tags=tags)
