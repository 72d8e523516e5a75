"""The STAR loss family (STAR v2 and v1, AWing, Wing, smooth-L1, L1, L2) and the registry of
loss terms the training objective is assembled from (`config.loss.terms`: name -> weight).

A term of your own is a function registered with `@register_term("<name>")` in a module
`star_jax/loss_terms/<name>.py` (imported the first time the name is asked for); one config line
`config.loss.terms.<name> = weight` switches it on. Built-in terms: `star`, `pointmap`,
`edgemap` (the official STAR recipe) and `smoothl1`, `l1`, `l2`, `wing` on the decoded landmarks
(the official trainer's `--loss_func` alternatives).

Everything is channels-last (`(B, H, W, N)` heatmaps, `(B, N, 2)` landmarks as `(x, y)` in
[-1, 1] on the align_corners grid, pixel j of n at -1 + 2j/(n-1)) and jit/vmap/grad-safe.

STAR follows the official `STARLoss_v2` (default) and `STARLoss` (`version="v1"`) maths:
per-channel normalisation `p = h / max(sum h, 1e-6)`, soft-argmax mean, unbiased weighted
covariance `sum p d d^T / (V1 - V2 / V1)` with `V1 = sum p + eps`, `V2 = sum p^2 + eps`,
projection of `gt - mean` on the eigenvectors (ascending eigenvalues: normal, then tangent),
`dist(proj) / sqrt(lambda + eps)` plus `w * (|l0| + |l1|)`, mean over batch and points.

Differences from the official code are numerical only:
- the 2x2 eigendecomposition is closed form (no `eigh`, no host round trip) and its derivative
  is finite everywhere (`star_jax.core.moments.eigh_2x2`);
- sqrt/division arguments that only non-finite official values would reach are floored, so the
  loss and its gradient stay finite for any input (negative, all-zero, huge heatmaps).

Structure: `star_jax.core.moments.heatmap_moments` is the only code that touches the
`(B, H, W, N)` tensor (seven moments per map, custom VJP); the loss here is written per
(moments, point) and vmapped over points and batch.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from star_jax.core import moments as moments_lib
from star_jax.errors import UsageError
from star_jax.registry import Registry

# Official SmoothL1Loss threshold ("scale"); Huber with this beta on the projected error.
SMOOTH_L1_BETA = 0.01
# The official SmoothL1Loss / WingLoss clamp the squared norm from below before the sqrt.
_NORM_SQ_FLOOR = 1e-6
STAR_DISTS = ("smoothl1", "l1", "l2")
STAR_DISTS_V1 = STAR_DISTS + ("wing",)
# What the `star` term may apply to the heatmaps first (see `_star_term`).
STAR_ACTIVATIONS = ("none", "relu")


def _star_point_statistics(moments: moments_lib.Moments, landmark: jnp.ndarray, eps: float):
  """One map's `Moments` (scalars) and its ground truth `(2,)` -> (projections, eigenvalues).

  Returns `(proj, evals)`, both `(2,)` ordered (normal, tangent): `proj_k = v_k . (gt - mean)`
  and the ascending eigenvalues of the official unbiased weighted covariance
  `cov / (V1 - V2 / V1)`, `V1 = sum p + eps`, `V2 = sum p^2 + eps`.
  """
  dtype = moments.mean_x.dtype
  gt = landmark.astype(dtype)
  tiny = jnp.sqrt(jnp.finfo(dtype).tiny)
  v1 = moments_lib.nonzero(moments.mass + eps, tiny)
  v2 = moments.sum_sq + eps
  denominator = moments_lib.nonzero(v1 - v2 / v1, tiny)
  l0, l1, cos_t, sin_t = moments_lib.eigh_2x2(moments.cov_xx / denominator,
                                               moments.cov_xy / denominator,
                                               moments.cov_yy / denominator)
  err_x, err_y = gt[0] - moments.mean_x, gt[1] - moments.mean_y
  normal_proj = -sin_t * err_x + cos_t * err_y
  tangent_proj = cos_t * err_x + sin_t * err_y
  return jnp.stack([normal_proj, tangent_proj]), jnp.stack([l0, l1])


def _star_statistics(heatmaps, landmarks, eps: float):
  """`(B, H, W, N)`, `(B, N, 2)` -> per-point `(proj, evals)`, each `(B, N, 2)`.

  The per-point statistics are vmapped over points and then over the batch.
  """
  moments = moments_lib.heatmap_moments(heatmaps)
  per_point = functools.partial(_star_point_statistics, eps=eps)
  return jax.vmap(jax.vmap(per_point))(moments, landmarks)


def _inv_scale(evals: jnp.ndarray, eps: float) -> jnp.ndarray:
  """1 / sqrt(lambda + eps), with the argument floored so that it stays finite.

  For heatmaps >= 0 the covariance is positive semi-definite and lambda + eps >= eps, so the
  floor (far below eps) never acts; only indefinite covariances from negative heatmaps, where
  the official loss is NaN, reach it.
  """
  floor = jnp.finfo(evals.dtype).eps * eps
  return lax.rsqrt(jnp.maximum(evals + eps, floor))


def _huber(e: jnp.ndarray, beta: float = SMOOTH_L1_BETA) -> jnp.ndarray:
  """Official SmoothL1Loss of a scalar error: 0.5/beta e^2 below beta, else |e| - beta/2."""
  e2 = e * e
  return jnp.where(e2 < beta * beta, 0.5 / beta * e2,
                   jnp.sqrt(jnp.maximum(e2, _NORM_SQ_FLOOR)) - 0.5 * beta)


_SCALAR_DISTS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "smoothl1": _huber,
    "l1": jnp.abs,
    "l2": jnp.square,
}


def _check_dist(dist: str, version: str) -> None:
  allowed = STAR_DISTS if version == "v2" else STAR_DISTS_V1
  if dist not in allowed:
    raise ValueError(f"star_loss: dist={dist!r} with version={version!r}; expected one of "
                     f"{allowed} (the official STARLoss_v2 cannot apply 'wing' per element)")


def _star_v2_point(proj, evals, *, w: float, dist: str, eps: float) -> jnp.ndarray:
  """Official v2 loss of one point from its `(2,)` projections and eigenvalues."""
  scaled = _SCALAR_DISTS[dist](proj) * _inv_scale(evals, eps)
  return scaled.sum() + w * jnp.abs(evals).sum()


def star_point_loss(heatmap: jnp.ndarray, landmark: jnp.ndarray, *, w: float = 1.0,
                    dist: str = "smoothl1", eps: float = 1e-5) -> jnp.ndarray:
  """STAR (v2) loss of one landmark: heatmap `(H, W)`, landmark `(2,)` -> scalar.

  `sum_k dist(v_k . (gt - mean)) / sqrt(l_k + eps) + w * (|l0| + |l1|)`; `star_loss` is the
  mean of this over points and batch.
  """
  _check_dist(dist, "v2")
  moments = moments_lib.heatmap_moments(heatmap[None, :, :, None])
  proj, evals = _star_point_statistics(jax.tree.map(lambda m: m[0, 0], moments), landmark, eps)
  return _star_v2_point(proj, evals, w=w, dist=dist, eps=eps)


def _check_star_inputs(heatmaps, landmarks):
  if heatmaps.ndim != 4 or landmarks.ndim != 3 or landmarks.shape[-1] != 2:
    raise ValueError(f"star_loss: expected heatmaps (B, H, W, N) and landmarks (B, N, 2), got "
                     f"heatmaps {heatmaps.shape} and landmarks {landmarks.shape}")
  b, _, _, n = heatmaps.shape
  if landmarks.shape[:2] != (b, n):
    raise ValueError(f"star_loss: heatmaps {heatmaps.shape} (B, H, W, N) and landmarks "
                     f"{landmarks.shape} (B, N, 2) disagree on B or N")


def star_loss(heatmaps: jnp.ndarray, landmarks: jnp.ndarray, *, w: float = 1.0,
              dist: str = "smoothl1", eps: float = 1e-5, version: str = "v2") -> jnp.ndarray:
  """STAR loss of heatmaps `(B, H, W, N)` against landmarks `(B, N, 2)` -> scalar.

  Args:
    heatmaps: non-negative maps (the fused heatmaps), channels-last, any float dtype
      (bf16/f16 are computed in float32; float64 stays float64).
    landmarks: ground truth `(x, y)` in [-1, 1] on the heatmap grid (pixel j at -1 + 2j/(n-1)).
    w: weight of the eigenvalue restriction.
    dist: 'smoothl1' (Huber, beta 0.01), 'l1' or 'l2'; v1 also accepts 'wing'.
    eps: the official EPSILON (covariance V1/V2 and sqrt(lambda + eps)).
    version: 'v2' (official STARLoss_v2, the default) or 'v1' (official STARLoss: the
      projections are scaled first, then `dist` is applied to the 2-vector and averaged, and the
      eigenvalue term is averaged separately).

  Returns:
    The loss, a scalar in the computation dtype.
  """
  if version not in ("v1", "v2"):
    raise ValueError(f"star_loss: version={version!r}; expected 'v2' or 'v1'")
  _check_dist(dist, version)
  _check_star_inputs(heatmaps, landmarks)
  proj, evals = _star_statistics(heatmaps, landmarks, eps)       # (B, N, 2) each
  if version == "v2":
    per_point = functools.partial(_star_v2_point, w=w, dist=dist, eps=eps)
    return jax.vmap(jax.vmap(per_point))(proj, evals).mean()
  scaled = proj * _inv_scale(evals, eps)
  trans = {"smoothl1": smooth_l1_loss, "l1": l1_loss, "l2": l2_loss,
           "wing": wing_loss}[dist](jnp.zeros_like(scaled), scaled)
  return trans + w * jnp.abs(evals).sum(-1).mean()


# ----------------------------------------------------------------------------------------------
# Landmark-vector losses (official SmoothL1Loss / WingLoss: the last axis is a vector).
# ----------------------------------------------------------------------------------------------

def _reduce(loss: jnp.ndarray, reduction: str, name: str) -> jnp.ndarray:
  if reduction == "mean":
    return loss.mean()
  if reduction == "sum":
    return loss.sum()
  if reduction == "none":
    return loss
  raise ValueError(f"{name}: reduction={reduction!r}; expected 'mean', 'sum' or 'none'")


def _norm_sq(pred, target):
  diff = pred - target
  return (diff * diff).sum(-1)


def smooth_l1_loss(pred: jnp.ndarray, target: jnp.ndarray, *, beta: float = SMOOTH_L1_BETA,
                   reduction: str = "mean") -> jnp.ndarray:
  """Official SmoothL1Loss: Huber on the Euclidean norm of the last axis, then `reduction`.

  `(..., D)` -> per-vector `0.5/beta |d|^2` if `|d| < beta` else `|d| - beta/2`.
  """
  d2 = _norm_sq(pred, target)
  loss = jnp.where(d2 < beta * beta, 0.5 / beta * d2,
                   jnp.sqrt(jnp.maximum(d2, _NORM_SQ_FLOOR)) - 0.5 * beta)
  return _reduce(loss, reduction, "smooth_l1_loss")


def wing_loss(pred: jnp.ndarray, target: jnp.ndarray, *, omega: float = 0.01,
              epsilon: float = 2.0, reduction: str = "mean") -> jnp.ndarray:
  """Official WingLoss on the Euclidean norm of the last axis (`(..., D)` -> mean)."""
  delta = jnp.sqrt(jnp.maximum(_norm_sq(pred, target), _NORM_SQ_FLOOR))
  c = omega - omega * jnp.log1p(omega / epsilon)
  loss = jnp.where(delta < omega, omega * jnp.log1p(delta / epsilon), delta - c)
  return _reduce(loss, reduction, "wing_loss")


def l1_loss(pred: jnp.ndarray, target: jnp.ndarray, *, reduction: str = "mean") -> jnp.ndarray:
  """Mean absolute error over all elements (torch `F.l1_loss`)."""
  return _reduce(jnp.abs(pred - target), reduction, "l1_loss")


def l2_loss(pred: jnp.ndarray, target: jnp.ndarray, *, reduction: str = "mean") -> jnp.ndarray:
  """Mean squared error over all elements (torch `F.mse_loss`)."""
  return _reduce(jnp.square(pred - target), reduction, "l2_loss")


# ----------------------------------------------------------------------------------------------
# AWing on heatmaps.
# ----------------------------------------------------------------------------------------------

def awing_weight_map(target: jnp.ndarray, *, threshold: float = 0.2,
                     weight: float = 10.0) -> jnp.ndarray:
  """`1 + weight * [maxpool3x3(target) >= threshold]` on `(B, H, W, C)` maps.

  The 3x3 max-pool (stride 1, padding 1, padding never wins) dilates the foreground so that
  the pixels next to a peak are weighted too, as in the official AWingLoss.
  """
  pooled = lax.reduce_window(target, -jnp.inf, lax.max, window_dimensions=(1, 3, 3, 1),
                             window_strides=(1, 1, 1, 1),
                             padding=((0, 0), (1, 1), (1, 1), (0, 0)))
  return 1.0 + weight * (pooled >= threshold).astype(target.dtype)


def awing_loss(pred: jnp.ndarray, target: jnp.ndarray, *, omega: float = 14.0,
               theta: float = 0.5, epsilon: float = 1.0, alpha: float = 2.1,
               use_weight_map: bool = True) -> jnp.ndarray:
  """Official Adaptive Wing loss on `(B, H, W, C)` maps, weighted, mean over all elements."""
  if pred.shape != target.shape or pred.ndim != 4:
    raise ValueError(f"awing_loss: expected pred and target of the same (B, H, W, C) shape, "
                     f"got {pred.shape} and {target.shape}")
  dtype = moments_lib.compute_dtype(pred)
  pred, target = pred.astype(dtype), target.astype(dtype)
  delta = jnp.abs(pred - target)
  power = alpha - target
  ratio = theta / epsilon
  ratio_pow = ratio ** power
  a = omega / (1.0 + ratio_pow) * power * ratio ** (power - 1.0) / epsilon
  c = theta * a - omega * jnp.log1p(ratio_pow)
  # delta ** power with a safe base: the unused branch must not produce NaN gradients.
  small = delta < theta
  safe_delta = jnp.where(small, delta, 0.0) / epsilon
  loss = jnp.where(small, omega * jnp.log1p(safe_delta ** power), a * delta - c)
  if use_weight_map:
    loss = loss * awing_weight_map(target)
  return loss.mean()


# ----------------------------------------------------------------------------------------------
# Loss terms: the training objective, chosen by name.
# ----------------------------------------------------------------------------------------------

class StackPrediction(NamedTuple):
  """One stack's outputs, what a loss term sees (maps channels-last, landmarks in [-1, 1])."""

  landmarks: jnp.ndarray                 # (B, N, 2) soft-argmax of the fused heatmaps
  heatmaps: jnp.ndarray                  # (B, H, W, N) fused heatmaps
  pointmaps: jnp.ndarray | None          # (B, H, W, N), None without the AAM heads
  edgemaps: jnp.ndarray | None           # (B, H, W, E), None without the AAM heads


# A term maps (one stack's prediction, the batch, the term's options) to a scalar. The batch
# holds `landmarks` (B, N, 2) normalised, and `pointmaps` / `edgemaps` targets.
LossTerm = Callable[[StackPrediction, Mapping[str, Any], Mapping[str, Any]], jnp.ndarray]


class _Term(NamedTuple):
  fn: LossTerm
  needs_aam: bool


# `star_jax.loss_terms.<name>` is imported the first time an unknown name is asked for.
_TERMS: Registry[_Term] = Registry("loss term", lazy_package="star_jax.loss_terms")


def register_term(name: str, *, needs_aam: bool = False) -> Callable[[LossTerm], LossTerm]:
  """Decorator: makes `fn` available as `config.loss.terms.<name> = weight`.

  `needs_aam`: the term reads point or edge maps, so it is skipped for networks without the
  AAM heads (as the official trainer drops its AWing terms when use_AAM is off).
  """
  def add(fn: LossTerm) -> LossTerm:
    current = dict(_TERMS.items()).get(name)
    if current is not None and current.fn is not fn:
      raise ValueError(f"loss term {name!r} is already registered")
    if current is None:
      _TERMS.register(name, _Term(fn, needs_aam))
    return fn
  return add


def term_names() -> list[str]:
  return _TERMS.names()


def get_term(name: str) -> _Term:
  """The registered term `name`, importing `star_jax.loss_terms.<name>` on first use."""
  term = _TERMS.lookup(name)
  if term is None:
    raise UsageError(f"config.loss.terms.{name}: no such loss term; known: "
                     f"{', '.join(term_names())}")
  return term


def _options(options: Mapping[str, Any], allowed: Sequence[str], term: str) -> dict[str, Any]:
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise UsageError(f"config.loss.{term}: unknown option(s) {', '.join(unknown)}; this term "
                     f"takes {', '.join(allowed) or 'none'}")
  return dict(options)


@register_term("star")
def _star_term(pred: StackPrediction, batch, options) -> jnp.ndarray:
  """STAR loss on the fused heatmaps (official STARLoss_v2; options w, dist, eps, version).

  Option `activation`: "none" (default: the maps as given, non-negative for the hourglass) or
  "relu" for networks with raw, signed heatmaps (HRNet), which STAR cannot read as
  distributions.
  """
  kwargs = _options(options, ("w", "dist", "eps", "version", "activation"), "star")
  activation = str(kwargs.pop("activation", "none"))
  if activation not in STAR_ACTIVATIONS:
    raise UsageError(f"config.loss.star.activation={activation!r} is not one of "
                     f"{', '.join(STAR_ACTIVATIONS)}")
  heatmaps = jax.nn.relu(pred.heatmaps) if activation == "relu" else pred.heatmaps
  return star_loss(heatmaps, jnp.asarray(batch["landmarks"], pred.heatmaps.dtype),
                   **{k: (float(v) if k in ("w", "eps") else str(v)) for k, v in kwargs.items()})


@register_term("pointmap", needs_aam=True)
def _pointmap_term(pred: StackPrediction, batch, options) -> jnp.ndarray:
  """Adaptive Wing loss of the point maps against their Gaussian targets."""
  _options(options, (), "pointmap")
  return awing_loss(pred.pointmaps, jnp.asarray(batch["pointmaps"], pred.pointmaps.dtype))


@register_term("edgemap", needs_aam=True)
def _edgemap_term(pred: StackPrediction, batch, options) -> jnp.ndarray:
  """Adaptive Wing loss of the edge maps against the drawn boundaries."""
  _options(options, (), "edgemap")
  return awing_loss(pred.edgemaps, jnp.asarray(batch["edgemaps"], pred.edgemaps.dtype))


def _coordinate_term(name: str, fn: Callable[..., jnp.ndarray], allowed: Sequence[str]):
  def term(pred: StackPrediction, batch, options) -> jnp.ndarray:
    kwargs = {k: float(v) for k, v in _options(options, allowed, name).items()}
    dtype = moments_lib.compute_dtype(pred.landmarks)
    return fn(pred.landmarks.astype(dtype), jnp.asarray(batch["landmarks"], dtype), **kwargs)
  term.__doc__ = (f"The official `{name}` criterion on the decoded landmarks (`--loss_func "
                  f"{name}` of the official trainer).")
  return register_term(name)(term)


_coordinate_term("smoothl1", smooth_l1_loss, ("beta",))
_coordinate_term("l1", l1_loss, ())
_coordinate_term("l2", l2_loss, ())
_coordinate_term("wing", wing_loss, ("omega", "epsilon"))
