"""Crop matrix, flip, augmentation sampler statistics and texture operations."""

import json
import math
import os

import cv2
import numpy as np
import pytest

from star_jax.data import annotations, transforms
from star_jax.core.schemes import get_spec

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "official_wflw_data")
WFLW = get_spec("wflw")
# The official augmentation parameters (lib/dataset/augmentation.py as alignmentDataset.py calls
# it), written out here: a wrong default in the library cannot hide behind its own value.
AUG = dict(flip=0.5, rotation_sigma_deg=18.0, scale_sigma=0.1, shift_sigma=0.05, occlusion=0.4,
           blur=0.3, gamma=0.2, noise=0.2, gray=0.2)
N_DRAWS = 4000


@pytest.fixture(scope="module")
def expected():
  return np.load(os.path.join(FIXTURE, "dataset_eval_expected.npz"))


@pytest.fixture(scope="module")
def ann():
  return annotations.read_tsv(os.path.join(FIXTURE, "test.tsv"), WFLW)


@pytest.fixture(scope="module")
def draws():
  return [transforms.sample_params(transforms.example_rng(7, i), AUG, 1.0, 256)
          for i in range(N_DRAWS)]


def test_crop_matrix_and_landmarks_match_official(expected, ann):
  for row in range(3):
    matrix = transforms.crop_matrix(ann.scale[row], *ann.center[row], 256)
    np.testing.assert_array_equal(matrix, expected["matrix"][row])
    px = transforms.transform_points(ann.landmarks[row], matrix)
    np.testing.assert_allclose(px, expected["landmarks_crop_px"][row], atol=1e-4)
    norm = transforms.normalize_landmarks(px, 256)
    np.testing.assert_allclose(norm, expected["landmarks"][row], atol=1e-6)
    np.testing.assert_allclose(transforms.denormalize_landmarks(norm, 256), px, atol=1e-3)
    # Hand-computed: s = 256 / (scale * 200), the centre goes to 127.5.
    s = 256 / (ann.scale[row] * 200)
    np.testing.assert_allclose(matrix[:2, :2], [[s, 0], [0, s]], rtol=1e-6)
    np.testing.assert_allclose(matrix[:2] @ [*ann.center[row], 1], [127.5, 127.5], atol=1e-3)


def test_eval_warp_matches_official_crop(expected, ann):
  for row in range(3):
    image = cv2.imread(ann.image_paths[row], cv2.IMREAD_COLOR)[..., ::-1]
    crop = transforms.warp(np.ascontiguousarray(image), expected["matrix"][row], 256)
    np.testing.assert_array_equal(crop, expected["crop_bgr_uint8"][row][..., ::-1])


def _flip_reference(landmarks, pairs, width):
  out = landmarks.copy()
  for i, j in pairs:
    out[i], out[j] = landmarks[j].copy(), landmarks[i].copy()
  out[:, 0] = width - 1 - out[:, 0]
  return out


def test_flip_landmarks_match_independent_reference(ann, expected):
  for row in range(3):
    width = int(expected["image_hw"][row][1])
    flipped = transforms.flip_landmarks(ann.landmarks[row], width, WFLW)
    np.testing.assert_array_equal(flipped, _flip_reference(ann.landmarks[row], WFLW.flip_pairs,
                                                           width))
    # Twice is the identity.
    np.testing.assert_allclose(transforms.flip_landmarks(flipped, width, WFLW),
                               ann.landmarks[row], atol=1e-4)
  # COFW mirrors with x -> W - x in the official code.
  cofw = get_spec("cofw")
  pts = np.arange(58, dtype=np.float32).reshape(29, 2)
  np.testing.assert_array_equal(transforms.flip_landmarks(pts, 100, cofw)[:, 0],
                                100 - pts[cofw.flip_permutation(), 0])


def test_flipped_crop_is_mirrored_crop(ann):
  # Mirroring the photo and the centre gives the mirror image of the crop.
  row = 0
  image = np.ascontiguousarray(cv2.imread(ann.image_paths[row])[..., ::-1])
  width = image.shape[1]
  cw, ch = ann.center[row]
  crop = transforms.warp(image, transforms.crop_matrix(ann.scale[row], cw, ch, 256), 256)
  flipped = transforms.warp(np.ascontiguousarray(image[:, ::-1]), transforms.crop_matrix(
      ann.scale[row], transforms.flip_center_w(cw, width, WFLW), ch, 256), 256)
  diff = np.abs(flipped.astype(int) - crop[:, ::-1].astype(int))
  assert diff.max() <= 2 and (diff > 0).mean() < 0.01


def _within(count, n, p, k=4.0):
  se = math.sqrt(p * (1 - p) / n)
  return abs(count / n - p) <= k * se


def test_gate_rates_match_official_parameters(draws):
  n = len(draws)
  assert all(d.augment for d in draws)
  assert _within(sum(d.flip for d in draws), n, AUG["flip"])
  assert _within(sum(d.occlusion is not None for d in draws), n, AUG["occlusion"])
  assert _within(sum(d.blur_ksize >= 0 for d in draws), n, AUG["blur"])
  assert _within(sum(d.gamma is not None for d in draws), n, AUG["gamma"])
  assert _within(sum(d.noise_alpha is not None for d in draws), n, AUG["noise"])
  assert _within(sum(d.gray for d in draws), n, AUG["gray"])
  # Effective blur: k = int(12.8 u) > 1 needs u >= 2/12.8.
  assert _within(sum(d.blur_ksize > 1 for d in draws), n, AUG["blur"] * (1 - 2 / 12.8))


def test_aug_prob_gate():
  params = [transforms.sample_params(transforms.example_rng(1, i), AUG, 0.3, 256)
            for i in range(2000)]
  assert _within(sum(p.augment for p in params), 2000, 0.3)
  assert all(p == transforms.AugmentParams() for p in params if not p.augment)


def _std_within(values, sigma, k=4.0):
  values = np.asarray(values)
  n = len(values)
  return (abs(values.mean()) <= k * sigma / math.sqrt(n)
          and abs(values.std(ddof=1) - sigma) <= k * sigma / math.sqrt(2 * (n - 1)))


def test_geometry_spread_matches_official_parameters(draws):
  angles = [d.angle for d in draws]
  assert _std_within(np.degrees(angles), AUG["rotation_sigma_deg"])
  assert _std_within(np.array([d.scale for d in draws]) - 1, AUG["scale_sigma"])
  shifts = np.array([d.shift_xy for d in draws])
  assert _std_within(shifts[:, 0], AUG["shift_sigma"] * 255)
  assert _std_within(shifts[:, 1], AUG["shift_sigma"] * 255)
  assert abs(np.corrcoef(shifts.T)[0, 1]) < 4 / math.sqrt(len(draws))


def test_geometry_parameters_recovered_from_matrix(draws):
  # G about the crop centre: recover angle, scale and shift from G @ C and C.
  crop = transforms.crop_matrix(1.3, 200.0, 150.0, 256)
  for d in draws[:50]:
    g = (transforms.geometry_matrix(d, 256) @ crop).astype(np.float64) @ np.linalg.inv(crop)
    assert math.isclose(math.atan2(g[1, 0], g[0, 0]), d.angle, abs_tol=1e-5)
    assert math.isclose(math.hypot(g[0, 0], g[1, 0]), d.scale, rel_tol=1e-5)
    centre = g @ [127.5, 127.5, 1]
    np.testing.assert_allclose(centre[:2] - 127.5, d.shift_xy, atol=1e-3)


def test_texture_parameters_match_official_draws(draws):
  """Compare with the official run's 2000 draws (fixture) by two-sample mean tests."""
  official = np.load(os.path.join(FIXTURE, "dataset_train_samples.npz"))

  def same_mean(ours, theirs, k=4.0):
    ours, theirs = np.asarray(ours, float), np.asarray(theirs, float)
    se = math.sqrt(ours.var(ddof=1) / len(ours) + theirs.var(ddof=1) / len(theirs))
    return abs(ours.mean() - theirs.mean()) <= k * se

  # The fixture records the drawn rectangle (inclusive, clipped to the crop).
  rect = np.array([d.occlusion for d in draws if d.occlusion is not None])
  assert same_mean(rect[:, 1] - rect[:, 0] + 1, official["occ_w_px"][official["occlusion"]])
  assert same_mean(rect[:, 3] - rect[:, 2] + 1, official["occ_h_px"][official["occlusion"]])
  occ = np.array([d.occlusion_wh for d in draws if d.occlusion_wh is not None])
  assert same_mean([d.blur_ksize for d in draws if d.blur_ksize >= 0],
                   official["blur_ksize"][official["blur"]])
  assert same_mean([d.gamma for d in draws if d.gamma is not None],
                   official["gamma_value"][official["gamma"]])
  assert same_mean([d.noise_alpha for d in draws if d.noise_alpha is not None],
                   official["noise_alpha"][official["noise"]])
  stats = json.load(open(os.path.join(FIXTURE, "dataset_train_stats.json")))
  assert stats["official_parameters"]  # the fixture documents the parameters we test against
  # Hand-derived ranges: occlusion heights int(128 * [0.2, 0.8]), blur k in 0..12.
  assert occ[:, 1].min() >= 25 and occ[:, 1].max() <= 102
  assert max(d.blur_ksize for d in draws) <= 12


def test_draws_are_stateless(draws):
  again = transforms.sample_params(transforms.example_rng(7, 123), AUG, 1.0, 256)
  assert again == draws[123]
  other = transforms.sample_params(transforms.example_rng(8, 123), AUG, 1.0, 256)
  assert other != draws[123]


def test_occlusion_rectangle_hand_computed():
  image = np.full((256, 256, 3), 200, np.uint8)
  out = transforms.occlude(image.copy(), (10, 20, 30, 35))
  assert (out[30:36, 10:21] == 0).all()
  assert out.sum() == 200 * 3 * (256 * 256 - 6 * 11)


def test_gamma_equals_official_formula():
  image = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
  for gamma in (0.3, 0.81, 1.0, 2.7):
    official = (((image / 255.0) ** gamma) * 255).astype("uint8")
    np.testing.assert_array_equal(transforms.adjust_gamma(image, gamma), official)


def test_gray_reproduces_official_bgr_quirk():
  rgb = np.random.default_rng(0).integers(0, 256, (8, 9, 3), np.uint8)
  bgr = np.ascontiguousarray(rgb[..., ::-1])
  # Official: COLOR_RGB2GRAY applied to BGR data.
  official = cv2.cvtColor(bgr, cv2.COLOR_RGB2GRAY)
  ours = transforms.to_gray(rgb)
  for c in range(3):
    np.testing.assert_array_equal(ours[..., c], official)
  # That is 0.114 on red and 0.299 on blue.
  weights = 0.114 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.299 * rgb[..., 2]
  assert np.abs(ours[..., 0] - weights).max() <= 1


def test_noise_blend_is_seeded_and_truncates():
  image = np.full((4, 4, 3), 100, np.uint8)
  a = transforms.blend_noise(image, 0.3, 5)
  np.testing.assert_array_equal(a, transforms.blend_noise(image, 0.3, 5))
  noise = np.random.default_rng(5).integers(0, 256, image.shape, np.uint8)
  np.testing.assert_array_equal(a, np.floor(0.7 * 100 + 0.3 * noise.astype(float)))


def test_blur_box_filter():
  image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
  np.testing.assert_array_equal(transforms.box_blur(image, 1), image)
  np.testing.assert_array_equal(transforms.box_blur(image, 5), cv2.blur(image, (5, 5)))


def test_source_window_covers_every_read_pixel(ann):
  # Warping only the window (moved into its frame) equals warping the whole image.
  image = np.ascontiguousarray(cv2.imread(ann.image_paths[1])[..., ::-1])
  for i in range(20):
    params = transforms.sample_params(transforms.example_rng(3, i), AUG, 1.0, 256)
    plan = transforms.plan_crop(ann.landmarks[1], ann.scale[1], ann.center[1],
                                image.shape[:2], params, WFLW, 256)
    src = np.ascontiguousarray(image[:, ::-1]) if plan.flip else image
    full = transforms.warp(src, plan.matrix, 256)
    window = transforms.source_window(plan.matrix, image.shape[:2], 256)
    y, x, h, w = window
    local = plan.matrix.astype(np.float64) @ transforms.translation(x, y)
    part = transforms.warp(np.ascontiguousarray(src[y:y + h, x:x + w]), local, 256)
    diff = np.abs(part.astype(int) - full.astype(int))
    # Only OpenCV's 1/32-pixel rounding of the moved matrix can differ (rarely, by a level).
    assert diff.max() <= 2 and (diff > 0).mean() < 1e-3


def test_official_augmentation_defaults_in_library_and_configs():
  from configs import base, demo
  assert transforms.OFFICIAL_AUGMENT == AUG
  for config in (base.get_base_config("wflw"), base.get_base_config("cofw"), demo.get_config()):
    assert dict(config.data.augment) == AUG
    assert config.data.aug_prob == 1.0 and config.data.gaussian_sigma == 1.5
