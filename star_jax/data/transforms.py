"""Geometry and appearance transforms of the official STAR data path, on RGB numpy arrays.

Owns: the crop matrix from (scale, center), point mapping, landmark normalisation, the horizontal
flip, the training augmentation's parameter sampler (stateless: every draw of the example at
global position i comes from a generator keyed by (seed, i)), the random similarity, the
texture operations and the source window a crop reads (so only that part of a photo is decoded).

Conventions (those of the official code; see tests/fixtures/official_wflw_data/README.md):
pixel centres at integer coordinates, (x, y) point order, a 3x3 float32 matrix maps
original-image pixels to crop pixels with the crop centre at (S-1)/2 (align_corners=True), while
normalised landmarks use `(2p+1)/S - 1` (align_corners=False), clipped to [-1, 1].

The official pipeline is BGR end to end; ours is RGB. Every operation here is channel-symmetric
except the gray conversion, whose official channel weighting is reproduced (see `to_gray`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import cv2
import numpy as np

from star_jax.core.schemes import DatasetSpec

# The official face box is `scale * 200` pixels; the crop operation keeps a face scale of 1.
FACE_BOX_UNIT = 200.0
TARGET_FACE_SCALE = 1.0

# The official augmentation parameters (lib/dataset/augmentation.py as the STAR dataset calls
# it): the one copy; configs/base.py and the TFDS margin read it from here.
OFFICIAL_AUGMENT = dict(flip=0.5, rotation_sigma_deg=18.0, scale_sigma=0.1, shift_sigma=0.05,
                        occlusion=0.4, blur=0.3, gamma=0.2, noise=0.2, gray=0.2)

_UINT64 = (1 << 64) - 1


# ---------------------------------------------------------------------------------------------
# Matrices and points


def similarity_matrix(angle: float, scale: float, shift_xy: tuple[float, float],
                      from_center: tuple[float, float],
                      to_center: tuple[float, float]) -> np.ndarray:
  """Rotation by `angle` and scaling about `from_center`, moved to `to_center` plus a shift.

  Computed in float64 in the official operation order, returned as float32 (as the official).
  """
  cos_s = scale * math.cos(angle)
  sin_s = scale * math.sin(angle)
  fx, fy = from_center
  tx, ty = to_center
  return np.array([
      [cos_s, -sin_s, tx - cos_s * fx + sin_s * fy + shift_xy[0]],
      [sin_s, cos_s, ty - sin_s * fx - cos_s * fy + shift_xy[1]],
      [0.0, 0.0, 1.0]], np.float32)


def crop_matrix(scale: float, center_w: float, center_h: float, image_size: int) -> np.ndarray:
  """Original-image pixels -> crop pixels: the face box `scale*200` onto `image_size`, centred.

  `s = image_size / (scale * 200)`; the box centre lands on ((S-1)/2, (S-1)/2).
  """
  s = image_size / (float(scale) * TARGET_FACE_SCALE * FACE_BOX_UNIT)
  mid = (image_size - 1) / 2.0
  return similarity_matrix(0.0, s, (0.0, 0.0), (float(center_w), float(center_h)), (mid, mid))


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
  """Maps (N, 2) points by a 3x3 matrix with the perspective divide, in the points' dtype."""
  dtype = points.dtype
  homo = np.concatenate([points, np.ones_like(points[:, :1])], axis=1)
  mapped = homo @ np.transpose(matrix).astype(dtype)
  return (mapped[:, :2] / mapped[:, 2:3]).astype(dtype)


def normalize_landmarks(points_px: np.ndarray, image_size: int) -> np.ndarray:
  """Crop pixels -> [-1, 1] with the align_corners=False convention, clipped (float32)."""
  p = points_px.astype(np.float32)
  return np.clip((p * 2 + 1) / np.float32(image_size) - 1, -1, 1).astype(np.float32)


def denormalize_landmarks(points: np.ndarray, image_size: int) -> np.ndarray:
  """The inverse of `normalize_landmarks` (without the clipping): [-1, 1] -> crop pixels."""
  p = np.asarray(points, np.float32)
  return ((p + 1) * np.float32(image_size) - 1) / 2


def landmarks_to_original(landmarks: np.ndarray, matrix: np.ndarray,
                          image_size: int) -> np.ndarray:
  """Network landmarks in [-1, 1] -> original image pixels, as the official evaluate.py does.

  Denormalise (`denormalize_landmarks`), then apply the affine part of `inv(matrix)` in float32
  with no perspective divide. `(..., N, 2)` points with matching leading `(..., 3, 3)` matrices.
  """
  crop_px = denormalize_landmarks(landmarks, image_size)
  inv = np.linalg.inv(np.asarray(matrix, np.float32)).astype(np.float32)
  out = np.einsum("...ij,...nj->...ni", inv[..., :2, :2], crop_px) + inv[..., None, :2, 2]
  return out.astype(np.float32)


def warp(image: np.ndarray, matrix: np.ndarray, image_size: int) -> np.ndarray:
  """The crop: `cv2.warpPerspective`, bilinear, constant 0 border (the official call)."""
  return cv2.warpPerspective(image, np.asarray(matrix), (image_size, image_size),
                             flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                             borderValue=0)


def source_window(matrix: np.ndarray, image_hw: tuple[int, int], image_size: int,
                  margin: int = 2) -> tuple[int, int, int, int] | None:
  """The part `(y, x, h, w)` of the image that warping with `matrix` reads, or None if empty.

  The crop's corners are mapped back to the image; the box around them plus `margin` pixels
  holds every pixel the bilinear warp touches (it reads floor(x) and floor(x)+1), with one
  more so that a windowed JPEG decode is exact where it is used (see images.py).
  """
  inv = np.linalg.inv(np.asarray(matrix, np.float64))
  last = image_size - 1
  corners = np.array([[0, 0, 1], [last, 0, 1], [0, last, 1], [last, last, 1]], np.float64)
  src = corners @ inv.T
  src = src[:, :2] / src[:, 2:3]
  h, w = int(image_hw[0]), int(image_hw[1])
  x0 = max(0, int(math.floor(src[:, 0].min())) - margin)
  y0 = max(0, int(math.floor(src[:, 1].min())) - margin)
  x1 = min(w, int(math.floor(src[:, 0].max())) + 1 + margin)
  y1 = min(h, int(math.floor(src[:, 1].max())) + 1 + margin)
  if x1 <= x0 or y1 <= y0:
    return None
  return y0, x0, y1 - y0, x1 - x0


def translation(dx: float, dy: float) -> np.ndarray:
  return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]], np.float64)


# ---------------------------------------------------------------------------------------------
# Horizontal flip


def flip_landmarks(landmarks: np.ndarray, width: int, spec: DatasetSpec) -> np.ndarray:
  """Landmarks of the mirrored image: swap the flip pairs, then `x -> W + spec.flip_offset - x`
  (the official mirror about pixel centres; 0 instead of -1 for COFW, as its models were
  trained)."""
  flipped = landmarks[spec.flip_permutation()].copy()
  flipped[:, 0] = (width + spec.flip_offset) - flipped[:, 0]
  return flipped


def flip_center_w(center_w: float, width: int, spec: DatasetSpec) -> float:
  return width + spec.flip_offset - center_w


# ---------------------------------------------------------------------------------------------
# Augmentation parameters


@dataclasses.dataclass(frozen=True)
class AugmentParams:
  """Every random decision of one training example (official semantics, see `sample_params`)."""

  augment: bool = False            # the aug_prob gate; False: plain eval-style crop
  flip: bool = False
  shift_xy: tuple[float, float] = (0.0, 0.0)   # crop pixels
  angle: float = 0.0               # radians; positive turns content clockwise on screen
  scale: float = 1.0
  # Occlusion rectangle, inclusive crop-pixel bounds (x0, x1, y0, y1); sizes for statistics.
  occlusion: tuple[int, int, int, int] | None = None
  occlusion_wh: tuple[int, int] | None = None
  blur_ksize: int = -1             # -1: gate closed; the box blur runs only when > 1
  gamma: float | None = None
  noise_alpha: float | None = None
  noise_seed: int = 0
  gray: bool = False


def example_rng(seed: int, position: int) -> np.random.Generator:
  """The generator of the example at global stream position `position` (Philox keyed by both)."""
  key = np.array([int(seed) & _UINT64, int(position) & _UINT64], np.uint64)
  return np.random.Generator(np.random.Philox(key=key))


def sample_params(rng: np.random.Generator, augment: Mapping[str, float], aug_prob: float,
                  image_size: int) -> AugmentParams:
  """Draws one example's augmentation as the official Augmentation.process does.

  A fixed number of draws per example (15 uniforms, 4 normals, one noise seed), whatever the
  gates decide, so draws never shift between examples. Official semantics:
    gate u < aug_prob; flip u < p_flip; shift = N(0, shift_sigma) * (S-1) per axis;
    angle = N(0, rotation_sigma) radians; scale = N(1, scale_sigma); nothing is clipped;
    occlusion u < p: rh = .2 + .6u, rw = rh - .2 + .4u, centre int((S-1)u) per axis,
      size int(S/2 * r), inclusive rectangle clipped to the crop, set to 0;
    blur u < p: k = int(S * 0.05 u), box filter when k > 1;
    gamma u < p: u' < .5 ? .25 + .75u : 1 + 3u;
    noise blend u < p: alpha = .5u with uniform noise bytes (the official draws them from
      os.urandom, which no seed reproduces; here they come from the example's generator);
    gray u < p.
  """
  u = rng.random(15)
  normal = rng.standard_normal(4)
  noise_seed = int(rng.integers(0, 1 << 63))
  if not u[0] < aug_prob:
    return AugmentParams()
  size = image_size
  last = size - 1
  flip = bool(u[1] < augment["flip"])
  shift = (float(normal[0] * augment["shift_sigma"] * last),
           float(normal[1] * augment["shift_sigma"] * last))
  angle = float(normal[2] * math.radians(augment["rotation_sigma_deg"]))
  scale = float(1.0 + normal[3] * augment["scale_sigma"])

  occlusion = occlusion_wh = None
  if u[2] < augment["occlusion"]:
    rh = 0.2 + 0.6 * u[3]
    rw = rh - 0.2 + 0.4 * u[4]
    cx = int(last * u[5])
    cy = int(last * u[6])
    dh = int(size / 2 * rh)
    dw = int(size / 2 * rw)
    occlusion = (max(0, cx - dw // 2), min(last, cx + dw // 2),
                 max(0, cy - dh // 2), min(last, cy + dh // 2))
    occlusion_wh = (dw, dh)
  blur_ksize = int((size + size) / 2 * (0.05 * u[8])) if u[7] < augment["blur"] else -1
  gamma = None
  if u[9] < augment["gamma"]:
    gamma = 0.25 + 0.75 * u[11] if u[10] < 0.5 else 1.0 + 3.0 * u[11]
  noise_alpha = 0.5 * u[13] if u[12] < augment["noise"] else None
  gray = bool(u[14] < augment["gray"])
  return AugmentParams(augment=True, flip=flip, shift_xy=shift, angle=angle, scale=scale,
                       occlusion=occlusion, occlusion_wh=occlusion_wh, blur_ksize=blur_ksize,
                       gamma=gamma, noise_alpha=noise_alpha, noise_seed=noise_seed, gray=gray)


def geometry_matrix(params: AugmentParams, image_size: int) -> np.ndarray:
  """The random similarity G about the crop centre ((S-1)/2, (S-1)/2), float32."""
  mid = (image_size - 1) / 2.0
  return similarity_matrix(params.angle, params.scale, params.shift_xy, (mid, mid), (mid, mid))


@dataclasses.dataclass(frozen=True)
class CropPlan:
  """Where an example's crop comes from, in the frame of the (possibly mirrored) image."""

  matrix: np.ndarray         # (3, 3) float32, (mirrored) image -> crop, as the official
  landmarks_px: np.ndarray   # (N, 2) float32 crop pixels, unclipped
  flip: bool


def plan_crop(landmarks: np.ndarray, scale: float, center: np.ndarray, image_hw: tuple[int, int],
              params: AugmentParams, spec: DatasetSpec, image_size: int) -> CropPlan:
  """Flip (of the whole image, before cropping), crop matrix, random similarity, as official."""
  center_w, center_h = float(center[0]), float(center[1])
  if params.augment and params.flip:
    landmarks = flip_landmarks(landmarks, int(image_hw[1]), spec)
    center_w = flip_center_w(center_w, int(image_hw[1]), spec)
  matrix = crop_matrix(scale, center_w, center_h, image_size)
  if params.augment:
    matrix = geometry_matrix(params, image_size) @ matrix
  return CropPlan(matrix=matrix, landmarks_px=transform_points(landmarks, matrix),
                  flip=bool(params.augment and params.flip))


# ---------------------------------------------------------------------------------------------
# Texture operations (uint8 RGB crops)


def occlude(image: np.ndarray, rect: tuple[int, int, int, int]) -> np.ndarray:
  x0, x1, y0, y1 = rect
  image[y0:y1 + 1, x0:x1 + 1] = 0
  return image


def box_blur(image: np.ndarray, ksize: int) -> np.ndarray:
  return cv2.blur(image, (ksize, ksize)) if ksize > 1 else image


def adjust_gamma(image: np.ndarray, gamma: float) -> np.ndarray:
  """`uint8((x/255)^gamma * 255)`, truncated like the official; a lookup table gives the same."""
  table = ((np.arange(256) / 255.0) ** gamma * 255).astype(np.uint8)
  return cv2.LUT(image, table)


def blend_noise(image: np.ndarray, alpha: float, noise_seed: int) -> np.ndarray:
  """`uint8((1-alpha) * image + alpha * noise)` with uniform noise bytes, truncated."""
  noise = np.random.default_rng(noise_seed).integers(0, 256, image.shape, np.uint8)
  return ((1 - alpha) * image + alpha * noise).astype(np.uint8)


def to_gray(image: np.ndarray) -> np.ndarray:
  """Gray replicated to 3 channels, with the official channel weighting.

  The official code calls `cvtColor(COLOR_RGB2GRAY)` on BGR data, so BLUE gets 0.299 and RED
  0.114. On our RGB data the same effect is `COLOR_BGR2GRAY` (0.114 on channel 0 = red,
  0.587 green, 0.299 on channel 2 = blue): bit-identical to the official result, channel order
  aside.
  """
  gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
  return np.repeat(gray[:, :, None], 3, axis=2)


def apply_texture(image: np.ndarray, params: AugmentParams) -> np.ndarray:
  """Occlusion, blur, gamma, noise blend, then gray: the official fixed order."""
  if not params.augment:
    return image
  image = image.copy()
  if params.occlusion is not None:
    image = occlude(image, params.occlusion)
  if params.blur_ksize > 1:
    image = box_blur(image, params.blur_ksize)
  if params.gamma is not None:
    image = adjust_gamma(image, params.gamma)
  if params.noise_alpha is not None:
    image = blend_noise(image, params.noise_alpha, params.noise_seed)
  if params.gray:
    image = to_gray(image)
  return image
