"""Tests of star_jax.core.losses against the official outputs and an independent numpy reference."""

from __future__ import annotations

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from star_jax.core import losses
from star_jax.core import moments

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "official_wflw_small",
                       "star_loss_official.npz")


# Jitted once per configuration: eager float64 runs dispatch hundreds of small ops.
star_loss_jit = jax.jit(losses.star_loss, static_argnames=("w", "dist", "eps", "version"))


def enable_x64():
  """Context in which jnp computes in float64."""
  return jax.enable_x64(True)


@pytest.fixture(scope="module")
def official():
  return dict(np.load(FIXTURE))


def _fixture_inputs(official, dtype=np.float64):
  """Channels-last `(1, 64, 64, C)` heatmaps and `(1, C, 2)` ground truth."""
  heatmaps = official["heatmaps_chw"].transpose(1, 2, 0)[None].astype(dtype)
  return heatmaps, official["gt"][None].astype(dtype)


# ----------------------------------------------------------------------------------------------
# Independent float64 reference of the official formulas (numpy, np.linalg.eigh).
# ----------------------------------------------------------------------------------------------

def _grid(n):
  return (np.arange(n, dtype=np.float32) / np.float32(n - 1) * np.float32(2)
          - np.float32(1)).astype(np.float64)


def _huber(e, beta=0.01):
  e2 = e * e
  return np.where(e2 < beta * beta, 0.5 / beta * e2, np.sqrt(np.maximum(e2, 1e-6)) - 0.5 * beta)


def ref_statistics(heatmaps, gt, eps=1e-5, flip=(1.0, 1.0)):
  """(B, H, W, N), (B, N, 2) -> projections and eigenvalues (B, N, 2), straight from the maths.

  `flip` multiplies the two eigenvectors (to check sign invariance).
  """
  heatmaps = np.asarray(heatmaps, np.float64)
  b, h, w, n = heatmaps.shape
  ys, xs = np.meshgrid(_grid(h), _grid(w), indexing="ij")
  proj = np.zeros((b, n, 2))
  evals = np.zeros((b, n, 2))
  for i in range(b):
    for k in range(n):
      p = heatmaps[i, :, :, k]
      p = p / max(p.sum(), 1e-6)
      mean = np.array([(p * xs).sum(), (p * ys).sum()])
      d = np.stack([xs - mean[0], ys - mean[1]], -1).reshape(-1, 2)
      cov = (p.reshape(-1, 1, 1) * d[:, :, None] * d[:, None, :]).sum(0)
      v1 = p.sum() + eps
      v2 = (p * p).sum() + eps
      cov = cov / (v1 - v2 / v1)
      lam, vec = np.linalg.eigh(cov)          # ascending; eigenvectors are the columns
      vec = vec * np.asarray(flip)[None, :]
      proj[i, k] = vec.T @ (gt[i, k] - mean)
      evals[i, k] = lam
  return proj, evals


_REF_DISTS = {"smoothl1": _huber, "l1": np.abs, "l2": np.square}


def ref_star_v2(heatmaps, gt, w=1.0, dist="smoothl1", eps=1e-5, flip=(1.0, 1.0)):
  proj, evals = ref_statistics(heatmaps, gt, eps, flip)
  per_point = (_REF_DISTS[dist](proj) / np.sqrt(evals + eps)).sum(-1) + w * np.abs(evals).sum(-1)
  return per_point.mean()


def ref_star_v1(heatmaps, gt, w=1.0, dist="smoothl1", eps=1e-5):
  proj, evals = ref_statistics(heatmaps, gt, eps)
  err = proj / np.sqrt(evals + eps)                                  # (B, N, 2)
  if dist == "l1":
    trans = np.abs(err).mean()
  elif dist == "l2":
    trans = (err ** 2).mean()
  else:                                                              # vector losses
    delta2 = (err ** 2).sum(-1)
    delta = np.sqrt(np.maximum(delta2, 1e-6))
    if dist == "smoothl1":
      trans = np.where(delta2 < 1e-4, 50 * delta2, delta - 0.005).mean()
    else:                                                            # wing, omega .01, eps 2
      c = 0.01 - 0.01 * np.log(1 + 0.01 / 2)
      trans = np.where(delta < 0.01, 0.01 * np.log(1 + delta / 2), delta - c).mean()
  return trans + w * np.abs(evals).sum(-1).mean()


def gaussian_maps(rng, batch, points, size=16, sigma=(0.8, 3.0)):
  """Anisotropic, rotated Gaussian heatmaps `(B, S, S, N)` and noisy ground truth `(B, N, 2)`."""
  yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
  maps = np.zeros((batch, size, size, points))
  gt = np.zeros((batch, points, 2))
  for i in range(batch):
    for k in range(points):
      cx, cy = rng.uniform(1, size - 2, 2)
      sx, sy = rng.uniform(*sigma, 2)
      rho = rng.uniform(-0.7, 0.7)
      u, v = (xx - cx) / sx, (yy - cy) / sy
      maps[i, :, :, k] = np.exp(-0.5 * (u * u - 2 * rho * u * v + v * v) / (1 - rho * rho))
      gt[i, k] = (np.array([cx, cy]) + rng.normal(0, 1.0, 2)) / (size - 1) * 2 - 1
  return maps, gt


# ----------------------------------------------------------------------------------------------
# Official equivalence.
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version,dist", [("v2", "smoothl1"), ("v2", "l1"), ("v2", "l2"),
                                          ("v1", "smoothl1"), ("v1", "l1"), ("v1", "l2"),
                                          ("v1", "wing")])
def test_matches_official_value_float64(official, version, dist):
  heatmaps, gt = _fixture_inputs(official)
  with enable_x64():
    value = star_loss_jit(jnp.asarray(heatmaps), jnp.asarray(gt), dist=dist, version=version)
    assert value.dtype == jnp.float64
    np.testing.assert_allclose(float(value), official[f"{version}_{dist}_value"], rtol=1e-6)


def test_matches_official_gradient_float64_and_w0(official):
  heatmaps, gt = _fixture_inputs(official)
  with enable_x64():
    grad = jax.jit(jax.grad(losses.star_loss))(jnp.asarray(heatmaps), jnp.asarray(gt))
    expected = official["v2_smoothl1_grad_chw"].transpose(1, 2, 0)[None]
    scale = np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=0, atol=1e-4 * scale)
    value_w0 = star_loss_jit(jnp.asarray(heatmaps), jnp.asarray(gt), w=0.0)
    np.testing.assert_allclose(float(value_w0), official["v2_smoothl1_w0_value"], rtol=1e-6)


def test_float32_jit_close_to_float64(official):
  heatmaps, gt = _fixture_inputs(official)
  fn = jax.value_and_grad(losses.star_loss)
  value32, grad32 = jax.jit(fn)(jnp.asarray(heatmaps, jnp.float32), jnp.asarray(gt, jnp.float32))
  with enable_x64():
    value64, grad64 = jax.jit(fn)(jnp.asarray(heatmaps), jnp.asarray(gt))
    value64, grad64 = float(value64), np.asarray(grad64)
  assert abs(float(value32) - value64) <= 1e-4 * abs(value64)
  assert np.abs(np.asarray(grad32) - grad64).max() <= 1e-4 * np.abs(grad64).max()


# ----------------------------------------------------------------------------------------------
# Independent reference: values, gradients, special cases.
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dist", ["smoothl1", "l1", "l2"])
def test_v2_matches_numpy_reference(dist):
  rng = np.random.default_rng(0)
  maps, gt = gaussian_maps(rng, 2, 5)
  with enable_x64():
    for w in (1.0, 0.0, 2.5):
      got = star_loss_jit(jnp.asarray(maps), jnp.asarray(gt), w=w, dist=dist)
      np.testing.assert_allclose(float(got), ref_star_v2(maps, gt, w, dist), rtol=1e-10)


@pytest.mark.parametrize("dist", ["smoothl1", "l1", "l2", "wing"])
def test_v1_matches_numpy_reference(dist):
  rng = np.random.default_rng(1)
  maps, gt = gaussian_maps(rng, 2, 4)
  with enable_x64():
    got = star_loss_jit(jnp.asarray(maps), jnp.asarray(gt), dist=dist, version="v1")
    np.testing.assert_allclose(float(got), ref_star_v1(maps, gt, 1.0, dist), rtol=1e-10)


def test_eigenvector_sign_invariance():
  rng = np.random.default_rng(2)
  maps, gt = gaussian_maps(rng, 1, 6)
  values = [ref_star_v2(maps, gt, flip=f) for f in ((1, 1), (-1, 1), (1, -1), (-1, -1))]
  np.testing.assert_allclose(values, values[0], rtol=1e-12)
  with enable_x64():
    got = star_loss_jit(jnp.asarray(maps), jnp.asarray(gt))
  np.testing.assert_allclose(float(got), values[0], rtol=1e-10)


def test_closed_form_eigh_matches_lapack():
  rng = np.random.default_rng(3)
  mats = [rng.normal(size=(2, 2)) for _ in range(20)]
  mats = [m @ m.T for m in mats] + [np.diag([2.0, 1.0]), np.diag([1.0, 2.0]),
                                    np.eye(2) * 0.3, np.zeros((2, 2)), np.array([[1, 1e-9],
                                                                                 [1e-9, 1]])]
  with enable_x64():
    for s in mats:
      l0, l1, c, si = (float(v) for v in moments.eigh_2x2(*map(jnp.float64, (s[0, 0], s[0, 1],
                                                                               s[1, 1]))))
      lam, vec = np.linalg.eigh(s)
      np.testing.assert_allclose([l0, l1], lam, atol=1e-12)
      v = np.array([[-si, c], [c, si]])           # columns: normal, tangent
      np.testing.assert_allclose(v.T @ v, np.eye(2), atol=1e-12)
      np.testing.assert_allclose(s @ v, v * np.array([l0, l1]), atol=1e-9)


@pytest.mark.parametrize("dist,version", [("smoothl1", "v2"), ("l2", "v2"), ("smoothl1", "v1")])
def test_gradient_matches_finite_differences(dist, version):
  rng = np.random.default_rng(4)
  maps, gt = gaussian_maps(rng, 1, 3, size=8, sigma=(0.8, 2.0))
  maps = maps + 0.05 * rng.random(maps.shape)
  with enable_x64():
    fn = jax.jit(lambda h, g: losses.star_loss(h, g, dist=dist, version=version))
    h0, g0 = jnp.asarray(maps), jnp.asarray(gt)
    grad_h, grad_g = jax.grad(fn, argnums=(0, 1))(h0, g0)
    step = 1e-6
    for _ in range(4):
      direction = rng.normal(size=maps.shape)
      fd = (fn(h0 + step * direction, g0) - fn(h0 - step * direction, g0)) / (2 * step)
      np.testing.assert_allclose(float(jnp.vdot(grad_h, direction)), float(fd), rtol=1e-5,
                                 atol=1e-8)
    direction = rng.normal(size=gt.shape)
    fd = (fn(h0, g0 + step * direction) - fn(h0, g0 - step * direction)) / (2 * step)
    np.testing.assert_allclose(float(jnp.vdot(grad_g, direction)), float(fd), rtol=1e-5)


def test_w_zero_and_eigenvalue_term():
  rng = np.random.default_rng(5)
  maps, gt = gaussian_maps(rng, 2, 3)
  _, evals = ref_statistics(maps, gt)
  with enable_x64():
    h, g = jnp.asarray(maps), jnp.asarray(gt)
    difference = star_loss_jit(h, g, w=1.0) - star_loss_jit(h, g, w=0.0)
  np.testing.assert_allclose(float(difference), np.abs(evals).sum(-1).mean(), rtol=1e-10)


def test_isotropic_covariance_gives_scaled_isotropic_distance():
  # A radially symmetric map centred on the middle pixel of an odd grid has covariance
  # lambda * I; STAR-l2 is then |gt - mean|^2 / sqrt(lambda + eps) + 2 w lambda, whatever the
  # eigen-frame.
  size, eps = 15, 1e-5
  yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
  blob = np.exp(-((xx - 7) ** 2 + (yy - 7) ** 2) / 6.0)
  maps = blob[None, :, :, None]
  gt = np.array([[[0.3, -0.2]]])
  p = blob / blob.sum()
  var = (p * _grid(size)[None, :] ** 2).sum()
  lam = var / ((1 + eps) - ((p * p).sum() + eps) / (1 + eps))
  err = gt[0, 0]                                        # the mean is 0
  with enable_x64():
    value, grad = jax.jit(jax.value_and_grad(
        lambda h, g: losses.star_loss(h, g, dist="l2")))(jnp.asarray(maps), jnp.asarray(gt))
    # An exactly isotropic matrix gets the axis-aligned frame (as LAPACK returns for c * I).
    frame = [float(v) for v in moments.eigh_2x2(*map(jnp.float64, (0.3, 0.0, 0.3)))]
  # rtol: the float32-rounded grid is symmetric only to ~1e-8.
  np.testing.assert_allclose(float(value), (err ** 2).sum() / np.sqrt(lam + eps) + 2 * lam,
                             rtol=1e-6)
  assert np.isfinite(np.asarray(grad)).all()
  np.testing.assert_allclose(frame, [0.3, 0.3, 1.0, 0.0])


# ----------------------------------------------------------------------------------------------
# Degenerate inputs, shapes, dtypes, transformations.
# ----------------------------------------------------------------------------------------------

def _degenerate_maps():
  rng = np.random.default_rng(6)
  size = 8
  onehot = np.zeros((size, size))
  onehot[2, 5] = 1.0
  yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
  iso = np.exp(-((xx - 3.5) ** 2 + (yy - 3.5) ** 2) / 3.0)
  maps = [np.zeros((size, size)), onehot, np.ones((size, size)), iso,
          rng.normal(size=(size, size)), -rng.random((size, size)),
          1e6 * rng.random((size, size)), 1e6 * rng.normal(size=(size, size)),
          1e-30 * rng.random((size, size))]
  return np.stack(maps, -1)[None]                      # (1, 8, 8, 9)


@pytest.mark.parametrize("version,dist", [("v2", "smoothl1"), ("v2", "l1"), ("v2", "l2"),
                                          ("v1", "smoothl1"), ("v1", "wing")])
def test_degenerate_inputs_finite(version, dist):
  maps = jnp.asarray(_degenerate_maps(), jnp.float32)
  fn = jax.jit(jax.value_and_grad(
      lambda h, g: losses.star_loss(h, g, dist=dist, version=version), argnums=(0, 1)))
  for gt in (np.zeros((1, maps.shape[-1], 2)), np.full((1, maps.shape[-1], 2), 0.4)):
    value, (grad_h, grad_g) = fn(maps, jnp.asarray(gt, jnp.float32))
    assert np.isfinite(float(value))
    assert np.isfinite(np.asarray(grad_h)).all() and np.isfinite(np.asarray(grad_g)).all()


def test_degenerate_gradient_is_frame_fixed_derivative():
  # Zero covariance (one-hot map): the eigenvalue term's gradient is the trace's gradient and
  # the whole gradient is finite and equal to the frame-fixed derivative, which for a map with
  # zero spread is the derivative along any perturbation that keeps the covariance diagonal.
  size = 8
  onehot = np.zeros((1, size, size, 1))
  onehot[0, 3, 4, 0] = 1.0
  with enable_x64():
    h = jnp.asarray(onehot)
    gt = jnp.asarray([[[0.5, -0.25]]])
    grad = jax.jit(jax.grad(lambda m: losses.star_loss(m, gt, dist="l2")))(h)
    assert np.isfinite(np.asarray(grad)).all()
    # Perturb the mass along the x axis only: the covariance stays diagonal.
    direction = np.zeros_like(onehot)
    direction[0, 3, 5, 0] = 1.0
    # Tiny step: near a one-hot map the unbiased denominator V1 - V2/V1 is itself ~eps.
    step = 1e-12
    fn = jax.jit(lambda m: losses.star_loss(m, gt, dist="l2"))
    one_sided = (fn(h + step * direction) - fn(h)) / step
    np.testing.assert_allclose(float(jnp.vdot(grad, direction)), float(one_sided), rtol=1e-3)


class ShapesAndDtypesTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_shapes_and_dtypes(self):
    rng = np.random.default_rng(7)
    maps, gt = gaussian_maps(rng, 2, 3, size=8)
    loss_and_grad = self.variant(jax.value_and_grad(losses.star_loss))
    for dtype in (jnp.float32, jnp.bfloat16):
      value, grad = loss_and_grad(jnp.asarray(maps, dtype), jnp.asarray(gt, jnp.float32))
      chex.assert_shape(value, ())
      self.assertEqual(value.dtype, jnp.float32)     # bf16 maps are computed in float32
      chex.assert_shape(grad, maps.shape)
      self.assertEqual(grad.dtype, dtype)
      chex.assert_tree_all_finite((value, grad))

  @chex.variants(with_jit=True)
  def test_float64_stays_float64(self):
    rng = np.random.default_rng(7)
    maps, gt = gaussian_maps(rng, 2, 3, size=8)
    with enable_x64():
      value, grad = self.variant(jax.value_and_grad(losses.star_loss))(jnp.asarray(maps),
                                                                       jnp.asarray(gt))
      chex.assert_shape(value, ())
      self.assertEqual(value.dtype, jnp.float64)
      self.assertEqual(grad.dtype, jnp.float64)
      chex.assert_shape(grad, maps.shape)

  @chex.variants(with_jit=True, without_jit=True)
  def test_bfloat16_close_to_float32(self):
    rng = np.random.default_rng(8)
    maps, gt = gaussian_maps(rng, 2, 3, size=8)
    rounded = np.asarray(jnp.asarray(maps, jnp.bfloat16).astype(jnp.float32))
    loss = self.variant(losses.star_loss)
    chex.assert_trees_all_close(loss(jnp.asarray(maps, jnp.bfloat16), jnp.asarray(gt)),
                                loss(jnp.asarray(rounded), jnp.asarray(gt)), rtol=1e-6)


def test_vmap_jit_equivalence():
  rng = np.random.default_rng(9)
  maps, gt = gaussian_maps(rng, 2, 3, size=8)
  h, g = jnp.asarray(maps, jnp.float32), jnp.asarray(gt, jnp.float32)
  per_point = [losses.star_point_loss(h[i, :, :, k], g[i, k])
               for i in range(maps.shape[0]) for k in range(maps.shape[-1])]
  jitted = jax.jit(losses.star_loss)(h, g)
  chex.assert_trees_all_close(jitted, jnp.mean(jnp.stack(per_point)), rtol=1e-6)
  chex.assert_trees_all_close(jitted, losses.star_loss(h, g), rtol=1e-6)
  # A leading vmapped axis gives the per-sample losses.
  per_sample = jax.jit(jax.vmap(lambda a, b: losses.star_loss(a[None], b[None])))(h, g)
  chex.assert_trees_all_close(per_sample.mean(), jitted, rtol=1e-6)


def test_errors_name_the_problem():
  h = jnp.zeros((1, 8, 8, 3))
  with pytest.raises(ValueError, match="landmarks"):
    losses.star_loss(h, jnp.zeros((1, 4, 2)))
  with pytest.raises(ValueError, match="dist='wing'"):
    losses.star_loss(h, jnp.zeros((1, 3, 2)), dist="wing")
  with pytest.raises(ValueError, match="version"):
    losses.star_loss(h, jnp.zeros((1, 3, 2)), version="v3")


# ----------------------------------------------------------------------------------------------
# AWing and the landmark-vector losses.
# ----------------------------------------------------------------------------------------------

def ref_awing(pred, target, omega=14.0, theta=0.5, epsilon=1.0, alpha=2.1):
  """numpy AWing with the 3x3 max-pool weight map, NHWC."""
  delta = np.abs(pred - target)
  power = alpha - target
  ratio = theta / epsilon
  a = omega / (1 + ratio ** power) * power * ratio ** (power - 1) / epsilon
  c = theta * a - omega * np.log(1 + ratio ** power)
  loss = np.where(delta < theta, omega * np.log(1 + (delta / epsilon) ** power), a * delta - c)
  padded = np.pad(target, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  h, w = target.shape[1:3]
  pooled = np.max([padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=0)
  return (loss * (1 + 10 * (pooled >= 0.2))).mean()


def test_awing_matches_official_and_reference(official):
  pred = official["awing_pred_chw"].transpose(0, 2, 3, 1)
  target = official["awing_target_chw"].transpose(0, 2, 3, 1)
  with enable_x64():
    value, grad = jax.value_and_grad(losses.awing_loss)(jnp.asarray(pred), jnp.asarray(target))
  np.testing.assert_allclose(float(value), official["awing_value"], rtol=1e-10)
  np.testing.assert_allclose(float(value), ref_awing(pred, target), rtol=1e-10)
  np.testing.assert_allclose(np.asarray(grad)[0], official["awing_grad_chw"].transpose(1, 2, 0),
                             rtol=1e-8, atol=1e-14)


def test_awing_weight_map_and_finite_gradient_at_zero_error():
  target = np.zeros((1, 5, 5, 1))
  target[0, 0, 0, 0] = 0.2
  target[0, 3, 3, 0] = 0.19
  weights = np.asarray(losses.awing_weight_map(jnp.asarray(target)))[0, :, :, 0]
  expected = np.ones((5, 5))
  expected[:2, :2] = 11.0    # dilated corner peak; 0.19 < 0.2
  np.testing.assert_array_equal(weights, expected)
  grad = jax.grad(losses.awing_loss)(jnp.asarray(target), jnp.asarray(target))
  assert np.isfinite(np.asarray(grad)).all()
  np.testing.assert_allclose(np.asarray(grad), 0.0, atol=1e-12)


def test_vector_losses_match_formulas():
  rng = np.random.default_rng(10)
  pred, target = rng.normal(0, 0.02, (3, 5, 2)), rng.normal(0, 0.02, (3, 5, 2))
  d = pred - target
  norm2 = (d ** 2).sum(-1)
  norm = np.sqrt(np.maximum(norm2, 1e-6))
  with enable_x64():
    p, t = jnp.asarray(pred), jnp.asarray(target)
    np.testing.assert_allclose(float(losses.l1_loss(p, t)), np.abs(d).mean(), rtol=1e-12)
    np.testing.assert_allclose(float(losses.l2_loss(p, t)), (d ** 2).mean(), rtol=1e-12)
    np.testing.assert_allclose(
        np.asarray(losses.smooth_l1_loss(p, t, reduction="none")),
        np.where(norm2 < 1e-4, 50 * norm2, norm - 0.005), rtol=1e-12)
    c = 0.01 - 0.01 * np.log(1 + 0.005)
    np.testing.assert_allclose(
        float(losses.wing_loss(p, t, reduction="sum")),
        np.where(norm < 0.01, 0.01 * np.log(1 + norm / 2), norm - c).sum(), rtol=1e-12)
  with pytest.raises(ValueError, match="reduction"):
    losses.l1_loss(p, t, reduction="max")
