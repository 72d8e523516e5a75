"""The `heatmap` term: a network's heatmaps regressed onto the Gaussian point-map targets.

For networks whose heatmaps are their only output (HRNet: no AAM point maps), this is the
heatmap loss that goes with STAR. `config.loss.heatmap.dist` chooses the regression:
- "awing" (default): the Adaptive Wing loss with its foreground weight map, what the STAR recipe
  puts on the AAM point maps (`pointmap`), so STAR + 10 heatmap mirrors STAR + 10 pointmap;
- "mse": the mean squared error over all pixels, the loss HRNet's own face trainer uses.
The targets are the batch's `pointmaps` (Gaussian, sigma `config.data.gaussian_sigma`, peak 1).
"""

from __future__ import annotations

import jax.numpy as jnp

from star_jax.core import losses
from star_jax.errors import UsageError

DISTS = ("awing", "mse")


@losses.register_term("heatmap")
def heatmap_term(pred: losses.StackPrediction, batch, options) -> jnp.ndarray:
  """Regression of the heatmaps onto the point-map targets (option dist: awing or mse)."""
  options = losses._options(options, ("dist",), "heatmap")
  dist = str(options.get("dist", "awing"))
  if dist not in DISTS:
    raise UsageError(f"config.loss.heatmap.dist={dist!r} is not one of {', '.join(DISTS)}")
  target = jnp.asarray(batch["pointmaps"], pred.heatmaps.dtype)
  if target.shape != pred.heatmaps.shape:
    raise UsageError(f"loss term heatmap: the point-map targets {tuple(target.shape)} do not "
                     f"match the heatmaps {tuple(pred.heatmaps.shape)}")
  if dist == "awing":
    return losses.awing_loss(pred.heatmaps, target)
  return losses.l2_loss(pred.heatmaps, target)
