"""Soft-argmax decoding of heatmaps into landmark coordinates (the official default decoder).

Coordinates are (x, y) in [-1, 1] on the heatmap grid with pixel centres 0 and n-1 at -1 and +1
(align_corners=True); heatmaps are channels-last `(..., H, W, N)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# The official decoder clamps each channel's mass from below so that all-zero maps decode to 0.
MIN_MASS = 1e-6


def heatmap_grid(n: int, dtype=jnp.float32) -> jnp.ndarray:
  """Pixel-centre coordinates of an n-pixel axis in [-1, 1] (pixel j at -1 + 2j/(n-1)).

  Rounded exactly as the official float32 `arange(n) / (n - 1) * 2 - 1`: built with numpy's IEEE
  division because XLA may turn the division into a multiplication by the reciprocal, one ulp off
  for some pixels. The float32 values are then cast to `dtype`, as the official code does.
  """
  grid = np.arange(n, dtype=np.float32) / np.float32(n - 1) * np.float32(2) - np.float32(1)
  return jnp.asarray(grid).astype(dtype)


def soft_argmax(heatmaps: jnp.ndarray) -> jnp.ndarray:
  """`(..., H, W, N)` non-negative heatmaps -> `(..., N, 2)` expected (x, y) coordinates.

  No softmax: each channel is divided by its (clamped) sum, as the official decoder does.
  """
  h, w = heatmaps.shape[-3], heatmaps.shape[-2]
  gx = heatmap_grid(w, heatmaps.dtype)
  gy = heatmap_grid(h, heatmaps.dtype)
  mass = jnp.maximum(heatmaps.sum(axis=(-3, -2)), MIN_MASS)          # (..., N)
  # Full precision: on GPUs the default float32 dot may run in TF32, which moves landmarks by
  # ~1e-3; these reductions are tiny next to the network, so exactness costs nothing.
  highest = jax.lax.Precision.HIGHEST
  x = jnp.einsum("...hwn,w->...n", heatmaps, gx, precision=highest) / mass
  y = jnp.einsum("...hwn,h->...n", heatmaps, gy, precision=highest) / mass
  return jnp.stack([x, y], axis=-1)
