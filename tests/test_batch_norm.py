"""star_jax.models.batch_norm against flax.linen.BatchNorm differentiated by JAX.

The layer replaces flax's BatchNorm (+ ReLU) in the network with a closed-form training
gradient; these tests hold it to flax's values, gradients and running-average updates: in
float64 to rounding, in float32 and bfloat16 to their precision, on one device and with the
statistics synchronised over a mapped axis.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from star_jax.models.batch_norm import BatchNorm, batch_statistics

MOMENTUM, EPSILON = 0.9, 1e-5


def _reference(axis_name=None, dtype=jnp.float32, train=True):
  return nn.BatchNorm(use_running_average=not train, momentum=MOMENTUM, epsilon=EPSILON,
                      axis_name=axis_name, dtype=dtype, param_dtype=jnp.float32,
                      use_fast_variance=False)


def _ours(axis_name=None, dtype=jnp.float32, train=True, relu=True):
  return BatchNorm(use_running_average=not train, momentum=MOMENTUM, epsilon=EPSILON,
                   axis_name=axis_name, dtype=dtype, relu=relu)


def _inputs(dtype, shape=(3, 5, 4, 6), seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(0.7, 2.0, shape)
  cotangent = rng.normal(size=shape)
  variables = {
      "params": {"scale": rng.uniform(0.5, 1.5, shape[-1]).astype(np.float32),
                 "bias": rng.normal(0, 0.5, shape[-1]).astype(np.float32)},
      "batch_stats": {"mean": rng.normal(0, 0.1, shape[-1]).astype(np.float32),
                      "var": rng.uniform(0.8, 1.2, shape[-1]).astype(np.float32)},
  }
  return jnp.asarray(x, dtype), jnp.asarray(cotangent, dtype), variables


def _value_and_grads(module, variables, x, cotangent, relu):
  """(y, running stats, d<y, cotangent>/d(params, x)) of a module in training mode."""
  def objective(params, x):
    y, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                              mutable=["batch_stats"])
    if relu and isinstance(module, nn.BatchNorm):
      y = jax.nn.relu(y)
    wide = jnp.promote_types(y.dtype, jnp.float32)
    return jnp.sum(y.astype(wide) * cotangent.astype(wide)), (y, updates["batch_stats"])

  (_, (y, stats)), grads = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
      variables["params"], x)
  return y, stats, grads


def _with_torch_running_var(result, x, variables):
  """flax's (y, stats, grads) with the running variance torch's rule gives instead of flax's.

  torch (and star-jax) feed the unbiased batch variance `var * n / (n - 1)` into the running
  average; flax feeds the biased one.
  """
  y, stats, grads = result
  values = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  n = values.shape[0]
  old = np.asarray(variables["batch_stats"]["var"])
  # momentum * old is a float32 product (the stored average is float32), as in both layers.
  decayed = (np.float32(MOMENTUM) * old.astype(np.float32)).astype(np.float64)
  running_var = decayed + (1 - MOMENTUM) * values.var(axis=0) * n / (n - 1)
  return y, {**stats, "var": jnp.asarray(running_var, stats["var"].dtype)}, grads


class BatchNormTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_float64_values_gradients_and_running_stats_equal_flax(self):
    with jax.enable_x64(True):
      x, cotangent, variables = _inputs(jnp.float64)
      for relu in (True, False):
        ours = self.variant(lambda v, x, c, relu=relu: _value_and_grads(
            _ours(dtype=jnp.float64, relu=relu), v, x, c, relu))(variables, x, cotangent)
        reference = _with_torch_running_var(self.variant(lambda v, x, c, relu=relu: (
            _value_and_grads(_reference(dtype=jnp.float64), v, x, c, relu)))(
                variables, x, cotangent), x, variables)
        chex.assert_trees_all_close(ours, reference, atol=1e-12, rtol=1e-12)

  @chex.variants(with_jit=True, without_jit=True)
  def test_float32_equals_flax(self):
    x, cotangent, variables = _inputs(jnp.float32)
    ours = self.variant(lambda v, x, c: _value_and_grads(_ours(), v, x, c, True))(
        variables, x, cotangent)
    reference = _with_torch_running_var(self.variant(
        lambda v, x, c: _value_and_grads(_reference(), v, x, c, True))(variables, x, cotangent),
                                        x, variables)
    chex.assert_trees_all_close(ours, reference, atol=2e-5, rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_bfloat16_compute_float32_statistics_and_parameter_gradients(self):
    x, cotangent, variables = _inputs(jnp.bfloat16)
    y, stats, (param_grads, x_grad) = self.variant(
        lambda v, x, c: _value_and_grads(_ours(dtype=jnp.bfloat16), v, x, c, True))(
            variables, x, cotangent)
    chex.assert_type([y, x_grad], jnp.bfloat16)
    chex.assert_type(jax.tree_util.tree_leaves((stats, param_grads)), jnp.float32)
    ref = _with_torch_running_var(self.variant(lambda v, x, c: _value_and_grads(
        _reference(dtype=jnp.bfloat16), v, x, c, True))(variables, x, cotangent), x, variables)
    chex.assert_trees_all_close((y, stats, (param_grads, x_grad)), ref, atol=0.05, rtol=0.02)

  def test_forward_matches_numpy_and_eval_mode_uses_running_averages(self):
    x, _, variables = _inputs(jnp.float32)
    xn = np.asarray(x, np.float64)
    mean, var = xn.mean(axis=(0, 1, 2)), xn.var(axis=(0, 1, 2))  # biased, as torch normalises
    n = xn.size // xn.shape[-1]
    scale, bias = (np.asarray(variables["params"][k], np.float64) for k in ("scale", "bias"))
    expected = np.maximum((xn - mean) / np.sqrt(var + EPSILON) * scale + bias, 0)
    y, updates = _ours().apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y, expected, atol=1e-5)
    running = variables["batch_stats"]
    np.testing.assert_allclose(updates["batch_stats"]["mean"],
                               MOMENTUM * running["mean"] + (1 - MOMENTUM) * mean, atol=1e-6)
    # The running variance takes the unbiased batch variance, as torch's BatchNorm2d does.
    np.testing.assert_allclose(updates["batch_stats"]["var"],
                               MOMENTUM * running["var"] + (1 - MOMENTUM) * var * n / (n - 1),
                               atol=1e-6)
    y_eval = _ours(train=False).apply(variables, x)
    expected_eval = np.maximum((xn - running["mean"]) / np.sqrt(running["var"] + EPSILON)
                               * scale + bias, 0)
    np.testing.assert_allclose(y_eval, expected_eval, atol=1e-5)
    chex.assert_trees_all_close(y_eval, jax.nn.relu(_reference(train=False).apply(variables, x)))

  def test_variables_match_flax_names_shapes_and_initial_values(self):
    x = jnp.zeros((2, 4, 4, 5))
    ours = _ours().init(jax.random.PRNGKey(0), x)
    reference = _reference().init(jax.random.PRNGKey(0), x)
    chex.assert_trees_all_equal(ours, reference)

  def test_rejects_non_nhwc_input(self):
    with pytest.raises(ValueError, match="NHWC"):
      _ours().init(jax.random.PRNGKey(0), jnp.zeros((2, 5)))


def test_synchronised_statistics_and_gradients_equal_the_whole_batch():
  """Two shards with `axis_name` behave as one BatchNorm over the concatenated batch.

  The input gradient of each shard is the whole-batch input gradient; parameter gradients are
  per-shard sums that add up to the whole-batch gradient (the training step then averages
  gradients over devices); flax's BatchNorm under the same mapping gives the same numbers.
  """
  with jax.enable_x64(True):
    x, cotangent, variables = _inputs(jnp.float64, shape=(4, 3, 5, 6), seed=3)
    whole = _value_and_grads(_ours(dtype=jnp.float64), variables, x, cotangent, True)

    def sharded(module, relu):
      run = lambda x, c: _value_and_grads(module, variables, x, c, relu)
      return jax.vmap(run, axis_name="data")(x.reshape(2, 2, 3, 5, 6),
                                             cotangent.reshape(2, 2, 3, 5, 6))

    y, stats, (param_grads, x_grad) = sharded(_ours("data", jnp.float64), True)
    np.testing.assert_allclose(y.reshape(x.shape), whole[0], atol=1e-12)
    np.testing.assert_allclose(x_grad.reshape(x.shape), whole[2][1], atol=1e-12)
    for shard in range(2):
      chex.assert_trees_all_close(jax.tree_util.tree_map(lambda a, s=shard: a[s], stats), whole[1],
                                  atol=1e-12)
    chex.assert_trees_all_close(jax.tree_util.tree_map(lambda a: a.sum(0), param_grads),
                                whole[2][0], atol=1e-12)
    reference_y, _, reference_grads = sharded(_reference("data", jnp.float64), True)
    chex.assert_trees_all_close((y, (param_grads, x_grad)), (reference_y, reference_grads),
                                atol=1e-12)
    # n / (n - 1) with n the global count (both shards), not a shard's.
    _, expected_stats, _ = _with_torch_running_var((None, whole[1], None), x, variables)
    chex.assert_trees_all_close(jax.tree_util.tree_map(lambda a: a[0], stats), expected_stats,
                                atol=1e-12)


def test_batch_statistics_are_two_pass_and_at_least_float32():
  rng = np.random.default_rng(5)
  x = rng.normal(1000.0, 0.01, (2, 3, 3, 4))  # large mean, tiny spread
  mean, var = batch_statistics(jnp.asarray(x, jnp.bfloat16))
  chex.assert_type([mean, var], jnp.float32)
  mean, var = batch_statistics(jnp.asarray(x, jnp.float32))
  expected = x.astype(np.float32).astype(np.float64).var(axis=(0, 1, 2))
  # A one-pass E[x^2] - E[x]^2 in float32 loses everything here (1e6 - 1e6); two passes keep
  # the variance to a few percent.
  np.testing.assert_allclose(var, expected, rtol=0.05)
