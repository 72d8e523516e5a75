"""Short synthetic video clips made from the embedded faces, with the true landmarks per frame.

For the demo (`make demo` writes one and runs the predictor on it), the tests (tracking a
moving face) and the benchmarks (frames/s, jitter). A face drawn by
`star_jax.data.synthetic_faces.generate_sample` is pasted into a frame (default 640x480) by a
similarity transform that changes smoothly over time: it drifts across the frame along an
ellipse, turns by a few degrees and grows and shrinks a little (`motion`), or stays put
(`motion=0`: the same frame repeated, for jitter measurements). `noise` adds Gaussian pixel
noise (standard deviation in grey levels) independently to every frame. A second face can be
added (`faces=2`) to exercise identities.
"""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np

from star_jax.data import synthetic_faces


@dataclasses.dataclass
class Clip:
  frames: list[np.ndarray]     # RGB uint8 (H, W, 3)
  landmarks: np.ndarray        # (T, F, 98, 2) true landmarks per frame and face, pixels
  fps: float


def _background(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
  """A smooth coloured gradient with soft blobs: a plain, face-free scene."""
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  base = rng.uniform(60, 190, 3)
  slope = rng.uniform(-0.08, 0.08, (2, 3))
  image = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
  for _ in range(6):
    cx, cy = rng.uniform(0, width), rng.uniform(0, height)
    radius = rng.uniform(30, 120)
    blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * radius ** 2))
    image += blob[..., None] * rng.uniform(-50, 50, 3)
  return np.clip(image, 0, 255).astype(np.uint8)


def _face_patch(seed: int) -> tuple[np.ndarray, np.ndarray]:
  """A generated face image and its landmarks: the first draw without large pose, occlusion or
  blur (WFLW tags 0, 4, 5), so that a detector finds it in every frame."""
  for k in range(200):
    sample = synthetic_faces.generate_sample(np.random.default_rng([seed, k]))
    if not (sample.tags[0] or sample.tags[4] or sample.tags[5]):
      break
  return sample.image, sample.landmarks


def moving_face_clip(num_frames: int = 60, *, size: tuple[int, int] = (640, 480),
                     fps: float = 30.0, face_side: float = 170.0, motion: float = 1.0,
                     noise: float = 0.0, faces: int = 1, seed: int = 0) -> Clip:
  """A clip of `faces` synthetic faces (landmark box about `face_side` pixels) in a `size`
  frame (W, H); see the module docstring."""
  width, height = size
  rng = np.random.default_rng([seed, 1])
  background = _background(height, width, rng)
  patches = [_face_patch(seed * 100 + f) for f in range(faces)]
  frames, truth = [], []
  for t in range(num_frames):
    frame = background.copy()
    frame_truth = []
    for f, (image, points) in enumerate(patches):
      phase = 2 * math.pi * (t / max(num_frames, 1)) + f * math.pi
      # The face's centre moves on an ellipse around its home position.
      home_x = width * (0.5 if faces == 1 else (0.3 if f == 0 else 0.72))
      cx = home_x + motion * 0.12 * width * math.cos(phase) / faces
      cy = height * 0.5 + motion * 0.1 * height * math.sin(phase)
      angle = motion * 8.0 * math.sin(phase * 2)
      zoom = (face_side / float(np.max(np.ptp(points, axis=0)))) * (
          1.0 + motion * 0.1 * math.sin(phase))
      lo, hi = points.min(axis=0), points.max(axis=0)
      centre = (lo + hi) / 2
      matrix = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), angle, zoom)
      matrix[:, 2] += np.array([cx, cy]) - centre
      warped = cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0)
      mask = cv2.warpAffine(np.full(image.shape[:2], 255, np.uint8), matrix, (width, height),
                            flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
      alpha = (mask.astype(np.float32) / 255.0)[..., None]
      frame = (warped * alpha + frame * (1.0 - alpha)).astype(np.uint8)
      frame_truth.append(np.concatenate([points, np.ones((len(points), 1))], 1) @ matrix.T)
    if noise > 0:
      frame = np.clip(frame + rng.normal(0, noise, frame.shape), 0, 255).astype(np.uint8)
    frames.append(frame)
    truth.append(frame_truth)
  return Clip(frames, np.asarray(truth, np.float64), fps)
