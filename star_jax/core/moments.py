"""The maths under the STAR loss: what it needs from a heatmap, and the 2x2 eigendecomposition.

- `heatmap_moments`: a `(B, H, W, N)` stack of heatmaps -> seven moments per map (`Moments`), with
  a custom VJP. It is the only code of the loss that touches the full tensor: forward and
  backward together read the heatmaps 3 times and write once (any loss of this shape needs
  2 reads + 1 write; the measured ratio is in benchmarks/RESULTS.md, issue 24).
- `eigh_2x2`: the closed-form eigendecomposition of a symmetric 2x2 matrix (no `eigh`, no host
  round trip) with a derivative that is finite everywhere, degeneracy included.

The x moments are centred on the 1-D column marginal (exact in float32 for sharp maps far from
the centre); the y variance is `sum p y^2 - mean_y^2` from the same GEMM, which keeps the
forward to one GEMM and one reduction. The loss built on them is `star_jax.core.losses`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from star_jax.core import decoder
from star_jax.core.decoder import MIN_MASS

def compute_dtype(x: jnp.ndarray) -> jnp.dtype:
  """float64 stays float64; everything else (bf16, f16, f32) is computed in float32."""
  return jnp.float64 if x.dtype == jnp.float64 else jnp.float32


def nonzero(x: jnp.ndarray, tiny: float) -> jnp.ndarray:
  """`x` with magnitudes below `tiny` replaced by `tiny` (keeping the sign).

  Only reached by inputs for which the official loss divides by zero (e.g. heatmaps whose
  negative values cancel their sum); elsewhere it is the identity, value and gradient.
  """
  return jnp.where(jnp.abs(x) < tiny, jnp.where(x < 0, -tiny, tiny), x)


# ----------------------------------------------------------------------------------------------
# Closed-form eigendecomposition of a symmetric 2x2 matrix.
# ----------------------------------------------------------------------------------------------

def _eig_parts(a, b, d):
  """Half-trace, radius and the (cos 2t, sin 2t) of the eigen-frame of [[a, b], [b, d]]."""
  half_trace = 0.5 * (a + d)
  half_diff = 0.5 * (a - d)
  radius = jnp.hypot(half_diff, b)  # overflow-safe; radius = (l1 - l0) / 2 >= 0
  positive = radius > 0
  safe_radius = jnp.where(positive, radius, 1.0)
  # At radius 0 every frame is an eigen-frame; take the axis-aligned one (t = 0), which is
  # what atan2(0, 0) = 0 gives and what LAPACK returns for a multiple of the identity.
  cos2t = jnp.where(positive, half_diff / safe_radius, 1.0)
  sin2t = jnp.where(positive, b / safe_radius, 0.0)
  return half_trace, radius, cos2t, sin2t


@jax.custom_jvp
def eigh_2x2(a, b, d):
  """Eigenvalues (ascending) and eigen-frame of the symmetric matrix [[a, b], [b, d]].

  Returns `(l0, l1, cos_t, sin_t)`: l0 <= l1; the tangent eigenvector (of l1) is
  `(cos_t, sin_t)` and the normal one (of l0) is `(-sin_t, cos_t)`, i.e. the columns of
  `V = [[-sin_t, cos_t], [cos_t, sin_t]]` in ascending order; t = atan2(b, (a - d) / 2) / 2
  up to a multiple of pi. The loss only sees eigenvectors through even functions of the
  projections, so their signs do not matter.
  """
  half_trace, radius, _, _ = _eig_parts(a, b, d)
  half_diff = 0.5 * (a - d)
  # An unnormalised eigenvector of l1 from whichever row of (S - l1 I) v = 0 has no
  # cancellation: (half_diff + r, b) when a >= d, else (b, r - half_diff). (Half-angle
  # formulas would lose half the digits for near-vertical eigenvectors.)
  upper = half_diff >= 0
  ux = jnp.where(upper, half_diff + radius, b)
  uy = jnp.where(upper, b, radius - half_diff)
  length = jnp.hypot(ux, uy)
  nonzero = length > 0
  safe_length = jnp.where(nonzero, length, 1.0)
  # Zero only at radius 0: the axis-aligned frame, as in `_eig_parts`.
  cos_t = jnp.where(nonzero, ux / safe_length, 1.0)
  sin_t = jnp.where(nonzero, uy / safe_length, 0.0)
  return half_trace - radius, half_trace + radius, cos_t, sin_t


@eigh_2x2.defjvp
def _eigh_2x2_jvp(primals, tangents):
  """Derivative of the eigendecomposition, finite for every input.

  Away from degeneracy this is the exact derivative: `dl_k = v_k^T dS v_k` and the frame turns
  by `dt = v_0^T dS v_1 / (l1 - l0)`.

  At (or numerically at) degeneracy, l0 == l1 (isotropic covariance, including the zero
  covariance of one-hot and all-zero heatmaps):
  - the eigenvalues are not differentiable (l1 - l0 = 2 |((a - d)/2, b)| is a cone). We use
    `dl_k = v_k^T dS v_k` in the frame the value was computed in: the directional derivative
    along every perturbation that keeps this frame, and the exact derivative of anything
    symmetric in (l0, l1), such as the eigenvalue restriction `|l0| + |l1|` (= the trace).
  - the frame rotation `dt` is set to 0 (the frame is held fixed). The exact rate diverges like
    1 / (l1 - l0) and, for the l1/smooth-L1 distances, the loss itself jumps with the arbitrary
    frame at l0 == l1, so no finite gradient exists; 0 is the minimum-norm choice, and below a
    relative gap of a few ulps the frame is rounding noise anyway. (For dist='l2' the loss is a
    smooth function of the covariance, `e^T (S + eps)^(-1/2) e`, whose exact gradient at
    l0 == l1 has a finite rotation part that this convention leaves out.) This is what keeps
    the gradient finite where the official backward of `eigh` returns inf/NaN.
  """
  a, b, d = primals
  da, db, dd = tangents
  half_trace, radius, cos2t, sin2t = _eig_parts(a, b, d)
  l0, l1, cos_t, sin_t = eigh_2x2(a, b, d)
  d_half_trace = 0.5 * (da + dd)
  d_half_diff = 0.5 * (da - dd)
  d_radius = cos2t * d_half_diff + sin2t * db        # = (v1^T dS v1 - v0^T dS v0) / 2
  finfo = jnp.finfo(radius.dtype)
  resolved = radius > 8 * finfo.eps * jnp.abs(half_trace) + jnp.sqrt(finfo.tiny)
  inv_radius = jnp.where(resolved, 1.0 / jnp.where(resolved, radius, 1.0), 0.0)
  d_theta = 0.5 * inv_radius * (cos2t * db - sin2t * d_half_diff)
  return (l0, l1, cos_t, sin_t), (d_half_trace - d_radius, d_half_trace + d_radius,
                                  -sin_t * d_theta, cos_t * d_theta)


class Moments(NamedTuple):
  """Per-map moments of the normalised heatmap `p = h / max(sum h, 1e-6)`; each `(B, N)`.

  `mass = sum p`, `mean = sum p * (x, y)` (no second division, as the official code),
  `cov_* = sum p * (x - mean_x)^a (y - mean_y)^b` (before the unbiased denominator) and
  `sum_sq = sum p^2`. These seven numbers are all STAR needs from a map.
  """

  mass: jnp.ndarray
  mean_x: jnp.ndarray
  mean_y: jnp.ndarray
  cov_xx: jnp.ndarray
  cov_xy: jnp.ndarray
  cov_yy: jnp.ndarray
  sum_sq: jnp.ndarray


@jax.custom_vjp
def heatmap_moments(heatmaps: jnp.ndarray) -> Moments:
  """`(B, H, W, N)` heatmaps -> `Moments` of every map, in the computation dtype.

  The only code that reads the full tensor. Forward, two reads: the column sums `sum_h p`,
  `sum_h p y` and `sum_h p y^2` are one batched GEMM against the `(3, H)` matrix [1, y, y^2]
  (channels-last needs no transpose) and `sum p^2` is one streaming reduction. (XLA:CPU emits
  each reduction output, or a variadic reduce, as a pass of its own or a slow scalar loop, so a
  row-marginal reduction would be a third read.) The x moments are then centred exactly on the
  column marginal, so float32 keeps the small x variance of a sharp map far from the centre.
  Backward: `d moment / d h` is a quadratic polynomial in `(x - mean_x, y - mean_y)` plus a
  multiple of `h`, so the heatmap gradient is one elementwise loop whose per-map coefficients
  are computed once: 3 reads and 1 write of the heatmaps for forward + backward.
  """
  return _heatmap_moments_fwd(heatmaps)[0]


def _heatmap_moments_fwd(heatmaps):
  dtype = compute_dtype(heatmaps)
  h = heatmaps.astype(dtype)
  batch, height, width, points = h.shape
  gx = decoder.heatmap_grid(width, dtype)[None, :, None]          # x along the width (columns)
  gy = decoder.heatmap_grid(height, dtype)
  basis = jnp.stack([jnp.ones((height,), dtype), gy, gy * gy])                    # (3, H)
  cols = lax.dot_general(jnp.broadcast_to(basis, (batch, 3, height)),
                         h.reshape(batch, height, width * points),
                         (((2,), (1,)), ((0,), (0,))),
                         precision=lax.Precision.HIGHEST).reshape(batch, 3, width, points)
  col_mass = cols[:, 0]                                     # (B, W, N)
  sum_sq = jnp.square(h).sum(axis=(1, 2))                   # (B, N)
  total = col_mass.sum(axis=1)                              # (B, N)
  norm = jnp.maximum(total, MIN_MASS)
  inv = 1.0 / norm[:, None]
  p_col, p_col_y = col_mass * inv, cols[:, 1] * inv
  mass = total / norm

  mean_x = (p_col * gx).sum(axis=1)
  mean_y = p_col_y.sum(axis=1)
  dx = gx - mean_x[:, None]                                 # (B, W, N)
  # sum p (y - my)^2 = sum p y^2 - 2 my sum p y + my^2 sum p.
  second_y = cols[:, 2].sum(axis=1) / norm
  moments = Moments(
      mass=mass, mean_x=mean_x, mean_y=mean_y,
      cov_xx=(p_col * dx * dx).sum(axis=1),
      cov_xy=(dx * (p_col_y - mean_y[:, None] * p_col)).sum(axis=1),
      cov_yy=second_y - mean_y * mean_y * (2.0 - mass),
      sum_sq=sum_sq / (norm * norm))
  return moments, (heatmaps, moments, norm, total > MIN_MASS)


def _heatmap_moments_bwd(residuals, ct: Moments):
  heatmaps, m, norm, unclamped = residuals
  # Derivatives with respect to p_i, written around the mean (dx = x_i - mean_x, ...):
  #   mass -> 1;  mean_x -> x_i;  sum_sq -> 2 p_i;
  #   cov_xx -> dx^2 - 2 x_i mean_x (1 - mass)          (the mean moves with p too)
  #   cov_xy -> dx dy - (x_i mean_y + y_i mean_x) (1 - mass)
  # (1 - mass is 0 except for maps with sum below 1e-6). Collected by powers of dx, dy:
  leak = 1.0 - m.mass
  k_xx, k_xy, k_yy = ct.cov_xx, ct.cov_xy, ct.cov_yy
  k_x = ct.mean_x - leak * (2 * k_xx * m.mean_x + k_xy * m.mean_y)
  k_y = ct.mean_y - leak * (2 * k_yy * m.mean_y + k_xy * m.mean_x)
  k_0 = (ct.mass + ct.mean_x * m.mean_x + ct.mean_y * m.mean_y
         - leak * (2 * k_xx * m.mean_x ** 2 + 2 * k_xy * m.mean_x * m.mean_y
                   + 2 * k_yy * m.mean_y ** 2))
  k_sq = 2 * ct.sum_sq
  # p = h / norm with d norm / d h_i = 1 (unless clamped): subtract sum_j (dL/dp_j) p_j.
  through_norm = (k_0 * m.mass + (k_x * m.mean_x + k_y * m.mean_y) * leak + k_xx * m.cov_xx
                  + k_xy * m.cov_xy + k_yy * m.cov_yy + k_sq * m.sum_sq)
  k_0 = k_0 - jnp.where(unclamped, through_norm, 0.0)
  # Each per-map coefficient ends in a division by a same-shape array. XLA does not fuse such
  # an expensive op into the per-pixel loop below, so the per-map chains run once, not H*W
  # times (cheap ops would be fused and repeated for every pixel).
  # Stacked, the seven coefficients are one small kernel rather than seven.
  coefficients = (jnp.stack([k_0, k_x, k_y, k_xx, k_xy, k_yy, k_sq / norm])
                  / jnp.broadcast_to(norm, (7,) + norm.shape))
  c_0, c_x, c_y, c_xx, c_xy, c_yy, c_sq = coefficients

  dtype = c_0.dtype
  _, height, width, _ = heatmaps.shape
  dx = decoder.heatmap_grid(width, dtype)[None, None, :, None] - m.mean_x[:, None, None]
  dy = decoder.heatmap_grid(height, dtype)[None, :, None, None] - m.mean_y[:, None, None]
  e = lambda c: c[:, None, None]                            # (B, N) -> (B, 1, 1, N)
  grad = (e(c_0) + dx * (e(c_x) + e(c_xx) * dx + e(c_xy) * dy) + dy * (e(c_y) + e(c_yy) * dy)
          + e(c_sq) * heatmaps.astype(dtype))
  return (grad.astype(heatmaps.dtype),)


heatmap_moments.defvjp(_heatmap_moments_fwd, _heatmap_moments_bwd)
