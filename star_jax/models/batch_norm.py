"""Batch normalisation (optionally followed by ReLU) with a hand-written training gradient.

This module owns the network's BatchNorm layer. Its variables, their names and initial values
and its forward values are those of `flax.linen.BatchNorm` with `use_fast_variance=False`
(two-pass variance, statistics in at least float32, torch's momentum and epsilon passed in by
the model); official checkpoints therefore convert unchanged. The running variance is updated as
torch's (Sync)BatchNorm does it, with the unbiased batch variance `var * n / (n - 1)` over the
n = batch x height x width values of the global batch (flax uses the biased one; at batch 4 the
4x4 maps of the innermost hourglass level have n = 64, a 1.6 % difference).

What differs is how the training-mode gradient is computed. Differentiating the forward
formula leaves XLA one pass per term of the chain rule (through the mean, through the
variance, through the normalisation, then the ReLU mask), each a separate loop over the
activations. Here the standard closed form is used instead:

  g    = dy * [y > 0]                       (ReLU, when fused)
  dx   = scale / sigma * (g - mean(g) - xhat * mean(g * xhat))
  dscale = sum(g * xhat), dbias = sum(g)

two reductions and one elementwise pass. With cross-device statistics (`axis_name`, i.e.
SyncBatchNorm under `jax.pmap`) the two means are averaged over the devices with one `pmean`,
which is the gradient of the global-batch normalisation; the parameter gradients stay
per-device sums, as the automatic derivative gives them, and the training step averages them
over devices with the other gradients. `tests/test_model.py` checks values and gradients
against `flax.linen.BatchNorm` differentiated by JAX, on one device and across two.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
_REDUCE_AXES = (0, 1, 2)  # NHWC: statistics per channel over batch, height and width


def _wide(dtype: Dtype) -> Dtype:
  """float32 for bf16/f16/f32 inputs, float64 for float64: the statistics' dtype."""
  return jnp.promote_types(dtype, jnp.float32)


def _mean_over_devices(values: tuple[jnp.ndarray, ...], axis_name: str | None
                       ) -> tuple[jnp.ndarray, ...]:
  """Averages per-device means over `axis_name` (one collective for all of them)."""
  if axis_name is None:
    return values
  stacked = jax.lax.pmean(jnp.stack(values), axis_name)
  return tuple(stacked[i] for i in range(len(values)))


def batch_statistics(x: jnp.ndarray, axis_name: str | None = None
                     ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Per-channel (mean, biased variance) of NHWC `x`, two-pass, in at least float32.

  With `axis_name`, over the global batch of all devices on that mapped axis.
  """
  x = x.astype(_wide(x.dtype))
  (mean,) = _mean_over_devices((jnp.mean(x, axis=_REDUCE_AXES),), axis_name)
  centred = x - mean
  (var,) = _mean_over_devices((jnp.mean(centred * centred, axis=_REDUCE_AXES),), axis_name)
  return mean, var


def _normalise(x, mean, var, scale, bias, epsilon, relu):
  """`(x - mean) * (rsqrt(var + eps) * scale) + bias` (flax's operation order), then ReLU."""
  wide = _wide(x.dtype)
  multiplier = jax.lax.rsqrt(var.astype(wide) + epsilon) * scale.astype(wide)
  y = (x.astype(wide) - mean.astype(wide)) * multiplier + bias.astype(wide)
  return jnp.maximum(y, 0) if relu else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def normalise_with_batch_statistics(x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray,
                                    axis_name: str | None, epsilon: float, relu: bool
                                    ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Training-mode batch norm (+ ReLU) of NHWC `x`: `(y, mean, var)`.

  `y` has x's dtype; `mean` and `var` are the batch statistics (for the running averages; no
  gradient flows back through them).
  """
  mean, var = batch_statistics(x, axis_name)
  y = _normalise(x, mean, var, scale, bias, epsilon, relu).astype(x.dtype)
  return y, mean, var


def _forward(x, scale, bias, axis_name, epsilon, relu):
  outputs = normalise_with_batch_statistics(x, scale, bias, axis_name, epsilon, relu)
  _, mean, var = outputs
  return outputs, (x, scale, bias, mean, var)


def _backward(axis_name, epsilon, relu, residuals, cotangents):
  x, scale, bias, mean, var = residuals
  dy = cotangents[0]  # the statistics' cotangents are ignored (see the docstring)
  wide = _wide(x.dtype)
  inv_sigma = jax.lax.rsqrt(var + epsilon)
  xhat = (x.astype(wide) - mean) * inv_sigma
  g = dy.astype(wide)
  if relu:  # the mask from the forward expression itself, so both agree on every element
    g = jnp.where(_normalise(x, mean, var, scale, bias, epsilon, relu=False) > 0, g, 0)
  sum_g = jnp.sum(g, axis=_REDUCE_AXES)
  sum_g_xhat = jnp.sum(g * xhat, axis=_REDUCE_AXES)
  count = x.shape[0] * x.shape[1] * x.shape[2]
  mean_g, mean_g_xhat = _mean_over_devices((sum_g / count, sum_g_xhat / count), axis_name)
  dx = (scale.astype(wide) * inv_sigma) * (g - mean_g - xhat * mean_g_xhat)
  return dx.astype(x.dtype), sum_g_xhat.astype(scale.dtype), sum_g.astype(bias.dtype)


normalise_with_batch_statistics.defvjp(_forward, _backward)


class BatchNorm(nn.Module):
  """`flax.linen.BatchNorm` over the last axis of NHWC input, optionally fused with ReLU.

  Variables: params `scale` (ones) and `bias` (zeros), batch_stats `mean` (zeros) and `var`
  (ones), all float32 and of shape (C,), as flax's. Training mode (`use_running_average=False`)
  normalises with the batch statistics (over `axis_name` too, when set and not initialising) and
  updates the running averages as `momentum * old + (1 - momentum) * batch`, with the batch's
  unbiased variance (torch's rule).
  """

  use_running_average: bool
  momentum: float
  epsilon: float
  axis_name: str | None = None
  dtype: Dtype = jnp.float32
  relu: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    if x.ndim != 4:
      raise ValueError(f"BatchNorm expects NHWC input, got shape {x.shape}")
    features = (x.shape[-1],)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
    scale = self.param("scale", nn.initializers.ones, features, jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, features, jnp.float32)
    if self.use_running_average:
      y = _normalise(x, running_mean.value, running_var.value, scale, bias, self.epsilon,
                     self.relu)
      return y.astype(self.dtype)
    axis_name = None if self.is_initializing() else self.axis_name
    y, mean, var = normalise_with_batch_statistics(x, scale, bias, axis_name, self.epsilon,
                                                   self.relu)
    if not self.is_initializing():
      mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
      count = x.shape[0] * x.shape[1] * x.shape[2]
      if axis_name is not None:
        count = count * jax.lax.psum(1, axis_name)
      count = jnp.asarray(count, var.dtype)
      unbiased_var = var * (count / jnp.maximum(count - 1, 1))
      running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
      running_var.value = (self.momentum * running_var.value
                           + (1 - self.momentum) * unbiased_var)
    return y.astype(self.dtype)
