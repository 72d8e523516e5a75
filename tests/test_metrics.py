"""NME, FR/AUC, subsets and the 98 -> 68 mapping against hand-computed cases and the official
formulas (written out independently here)."""

import numpy as np
import pytest
import scipy.integrate

from star_jax.core import landmark_mappings
from star_jax.core import metrics
from star_jax.core.schemes import get_spec

WFLW = get_spec("wflw")
W300 = get_spec("300w")
COFW = get_spec("cofw")


def _face(spec, rng, eye_distance=10.0):
  """Random ground truth whose ocular end points are `eye_distance` apart horizontally."""
  gt = rng.uniform(0, 100, size=(spec.num_points, 2))
  left, right = spec.ocular
  gt[left] = (40.0, 50.0)
  gt[right] = (40.0 + eye_distance, 50.0)
  return gt


# ---------------------------------------------------------------- NME


def test_nme_constant_offset_is_offset_over_eye_distance():
  rng = np.random.default_rng(0)
  gt = _face(WFLW, rng)
  pred = gt + np.array([3.0, 4.0])  # every point 5 px off; inter-ocular distance 10
  np.testing.assert_allclose(metrics.nme(pred[None], gt[None], WFLW), [0.5], rtol=1e-12)


def test_nme_single_point_error_is_averaged_over_all_points():
  rng = np.random.default_rng(1)
  gt = _face(WFLW, rng, eye_distance=20.0)
  pred = gt.copy()
  pred[5] += (6.0, 8.0)  # 10 px on one point of 98
  np.testing.assert_allclose(metrics.nme(pred, gt, WFLW), [10.0 / 98 / 20.0], rtol=1e-12)


def test_nme_batch_matches_official_loop():
  """Per image: mean_i ||p_i - g_i|| / ||g_L - g_R||, written as the official loop."""
  rng = np.random.default_rng(2)
  gt = rng.uniform(0, 200, size=(4, 98, 2))
  pred = gt + rng.normal(0, 3, size=gt.shape)
  expected = []
  for p, g in zip(pred, gt):
    span = np.sqrt(((g[60] - g[72]) ** 2).sum())
    expected.append(sum(np.sqrt(((p[i] - g[i]) ** 2).sum()) / span for i in range(98)) / 98)
  np.testing.assert_allclose(metrics.nme(pred, gt, WFLW), expected, rtol=1e-12)


def test_nme_pupil_uses_point_means_for_300w():
  rng = np.random.default_rng(3)
  gt = rng.uniform(0, 100, size=(68, 2))
  # Eye contours centred at (30, 50) and (70, 50): inter-pupil distance 40.
  gt[36:42] = np.array([30.0, 50.0]) + rng.normal(0, 2, size=(6, 2))
  gt[36:42] -= gt[36:42].mean(0) - (30.0, 50.0)
  gt[42:48] = np.array([70.0, 50.0]) + rng.normal(0, 2, size=(6, 2))
  gt[42:48] -= gt[42:48].mean(0) - (70.0, 50.0)
  pred = gt + (0.0, 2.0)
  np.testing.assert_allclose(metrics.nme(pred, gt, W300, "pupil"), [2.0 / 40.0], rtol=1e-10)
  # Inter-ocular (36 / 45) differs from it.
  ocular = np.linalg.norm(gt[36] - gt[45])
  np.testing.assert_allclose(metrics.nme(pred, gt, W300, "ocular"), [2.0 / ocular], rtol=1e-10)


def test_nme_default_norms_follow_official_config():
  rng = np.random.default_rng(4)
  for spec, (left, right) in ((WFLW, (60, 72)), (COFW, (16, 17)), (W300, (36, 45))):
    gt = rng.uniform(0, 100, size=(2, spec.num_points, 2))
    pred = gt + 1.0
    span = np.linalg.norm(gt[:, left] - gt[:, right], axis=-1)
    np.testing.assert_allclose(metrics.nme(pred, gt, spec), np.sqrt(2) / span, rtol=1e-12)
  # WFLW inter-pupil: 96 / 97.
  gt = rng.uniform(0, 100, size=(1, 98, 2))
  np.testing.assert_allclose(metrics.nme(gt + 1.0, gt, WFLW, "pupil"),
                             np.sqrt(2) / np.linalg.norm(gt[:, 96] - gt[:, 97], axis=-1))


def test_nme_rejects_bad_shapes():
  with pytest.raises(ValueError, match="98"):
    metrics.nme(np.zeros((1, 68, 2)), np.zeros((1, 68, 2)), WFLW)
  with pytest.raises(ValueError, match="zero normalising"):
    metrics.nme(np.zeros((1, 98, 2)), np.zeros((1, 98, 2)), WFLW)


# ---------------------------------------------------------------- FR / AUC


def _official_curve(nmes, thresh, step=1e-4):
  xs = np.arange(0, thresh + step, step)
  ys = np.array([np.count_nonzero(nmes <= x) for x in xs]) / float(len(nmes))
  return xs, ys


def _old_scipy_simps(y, x):
  """scipy < 1.11 `simps(even='avg')`, assembled from odd-count Simpson (unchanged across
  versions) and trapezoids."""
  if len(y) % 2:
    return scipy.integrate.simpson(y, x=x)
  first = scipy.integrate.simpson(y[:-1], x=x[:-1]) + 0.5 * (x[-1] - x[-2]) * (y[-1] + y[-2])
  last = 0.5 * (x[1] - x[0]) * (y[1] + y[0]) + scipy.integrate.simpson(y[1:], x=x[1:])
  return 0.5 * (first + last)


@pytest.mark.parametrize("thresh", [0.1, 0.05, 0.08])
def test_fr_auc_matches_official_formula(thresh):
  rng = np.random.default_rng(5)
  nmes = np.abs(rng.normal(0.045, 0.03, size=257))
  xs, ys = _official_curve(nmes, thresh)
  fr, auc = metrics.fr_auc(nmes, thresh)
  assert fr == pytest.approx(1.0 - ys[-1], abs=1e-15)
  assert auc == pytest.approx(_old_scipy_simps(ys, xs) / thresh, abs=1e-12)
  _, auc_new = metrics.fr_auc(nmes, thresh, even_rule="cartwright")
  assert auc_new == pytest.approx(scipy.integrate.simpson(ys, x=xs) / thresh, abs=1e-12)


def test_300w_grid_has_even_count_where_rules_differ():
  xs, _ = metrics.ced(np.array([0.01]), 0.05)
  assert len(xs) % 2 == 0          # the official 300W grid: Simpson's even case
  xs, _ = metrics.ced(np.array([0.01]), 0.1)
  assert len(xs) % 2 == 1          # WFLW / COFW: plain composite Simpson
  # Jumps of the curve in the first and last intervals make the two even-count rules differ.
  nmes = np.concatenate([np.full(5, 0.00005), np.full(3, 0.04995),
                         np.random.default_rng(6).uniform(0, 0.06, 100)])
  a = metrics.fr_auc(nmes, 0.05, even_rule="average")[1]
  b = metrics.fr_auc(nmes, 0.05, even_rule="cartwright")[1]
  assert a != b and abs(a - b) < 1e-3
  a = metrics.fr_auc(nmes, 0.1, even_rule="average")[1]
  b = metrics.fr_auc(nmes, 0.1, even_rule="cartwright")[1]
  assert a == b


def test_fr_auc_hand_cases():
  # Perfect predictions: nothing fails, the curve is 1 everywhere.
  fr, auc = metrics.fr_auc(np.zeros(10), 0.1)
  assert fr == 0.0 and auc == pytest.approx(1.0, abs=1e-9)
  # Everything beyond the threshold: all fail, area 0.
  fr, auc = metrics.fr_auc(np.full(10, 0.5), 0.1)
  assert fr == 1.0 and auc == 0.0
  # Half the images at 0 and half failing: FR 0.5, AUC 0.5.
  fr, auc = metrics.fr_auc(np.array([0.0, 0.0, 1.0, 1.0]), 0.1)
  assert fr == 0.5 and auc == pytest.approx(0.5, abs=1e-9)
  # One image at 0.05 of a 0.1 threshold: the step sits mid-range, AUC about 0.5, FR 0.
  fr, auc = metrics.fr_auc(np.array([0.05]), 0.1)
  assert fr == 0.0 and auc == pytest.approx(0.5, abs=2e-3)


def test_failure_threshold_is_inclusive():
  # An NME equal to the last grid point counts as a success (`nme <= x`).
  xs, _ = metrics.ced(np.array([0.0]), 0.1)
  fr, _ = metrics.fr_auc(np.array([xs[-1]]), 0.1)
  assert fr == 0.0
  fr, _ = metrics.fr_auc(np.array([np.nextafter(xs[-1], 1.0)]), 0.1)
  assert fr == 1.0


def test_simpson_is_exact_for_cubics_on_uneven_grid():
  x = np.sort(np.random.default_rng(7).uniform(0, 2, 9))
  x = np.concatenate([[0.0], x, [2.0]])           # 11 samples (odd), uneven spacing
  y = x ** 2
  assert metrics.simpson(y, x) == pytest.approx(8.0 / 3.0, rel=1e-12)


# ---------------------------------------------------------------- subsets


def test_wflw_subsets_from_tags():
  tags = np.array([[0, 1, 0, 0, 1, 0], [1, 0, 0, 0, 0, 1], [0, 0, 1, 1, 0, 0]])
  masks = metrics.subset_masks(WFLW, ["a", "b", "c"], tags)
  assert list(masks) == ["full", "largepose", "expression", "illumination", "makeup",
                         "occlusion", "blur"]
  assert masks["full"].tolist() == [True, True, True]
  assert masks["largepose"].tolist() == [False, True, False]
  assert masks["occlusion"].tolist() == [True, False, False]
  assert masks["makeup"].tolist() == [False, False, True]
  nmes = np.array([0.02, 0.2, 0.04])
  out = metrics.subset_metrics(nmes, masks, 0.1)
  assert out["full"]["count"] == 3 and out["full"]["nme"] == pytest.approx(0.26 / 3)
  assert out["full"]["fr"] == pytest.approx(1 / 3)
  assert out["blur"] == {"nme": 0.2, "fr": 1.0, "auc": 0.0, "count": 1}


def test_300w_subsets_from_relative_paths():
  root = "/data/helen_lab/300w/images"  # a parent folder whose name contains 'helen'
  paths = [f"{root}/lfpw/testset/image_0001.png", f"{root}/helen/testset/2968560214_1.jpg",
           f"{root}/ibug/image_003_1.jpg", f"{root}/IBUG/image_004.jpg"]
  masks = metrics.subset_masks(W300, paths, image_dir=root)
  assert masks["common"].tolist() == [True, True, False, False]
  assert masks["challenge"].tolist() == [False, False, True, True]
  assert masks["full"].tolist() == [True, True, True, True]


def test_300w_paths_without_source_names_give_full_only():
  masks = metrics.subset_masks(W300, ["/data/faces/0001.jpg", "/data/faces/0002.jpg"])
  assert list(masks) == ["full"] and masks["full"].all()


def test_cofw_has_only_full():
  masks = metrics.subset_masks(COFW, ["x.jpg", "y.jpg"])
  assert list(masks) == ["full"] and masks["full"].all()


def test_empty_subset_reports_none():
  out = metrics.summarize(np.array([]), 0.1)
  assert out == {"nme": None, "fr": None, "auc": None, "count": 0}


# ---------------------------------------------------------------- 98 -> 68


def test_98_to_68_mapping_respects_flip_pairs_and_curves():
  mapping = np.array(landmark_mappings.WFLW98_TO_300W68)
  assert len(set(mapping.tolist())) == 68
  # Mirroring commutes with the mapping: 300W flip partners map onto WFLW flip partners.
  perm98, perm68 = WFLW.flip_permutation(), W300.flip_permutation()
  np.testing.assert_array_equal(perm98[mapping], mapping[perm68])
  # Each 300W curve lands on the WFLW curve of the same name, in order.
  wflw_edges = {e.name: e.points for e in WFLW.edges}
  for edge in W300.edges:
    mapped = mapping[list(edge.points)]
    assert set(mapped) <= set(wflw_edges[edge.name]), edge.name
    assert np.all(np.diff(mapped) > 0), edge.name
  # Normalisation end points correspond (outer eye corners).
  assert mapping[W300.ocular[0]] == WFLW.ocular[0]
  assert mapping[W300.ocular[1]] == WFLW.ocular[1]


def test_convert_landmarks_shapes_and_errors():
  lm = np.arange(98 * 2, dtype=np.float32).reshape(98, 2)
  out = landmark_mappings.convert_landmarks(lm[None], "wflw", 68)
  assert out.shape == (1, 68, 2)
  np.testing.assert_array_equal(out[0, 36], lm[60])
  np.testing.assert_array_equal(out[0, 8], lm[16])   # chin
  assert landmark_mappings.convert_landmarks(lm, WFLW, 98) is lm
  with pytest.raises(ValueError, match="98 -> 68"):
    landmark_mappings.convert_landmarks(lm, WFLW, 29)
