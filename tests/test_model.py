"""The stacked hourglass: parameter counts, building blocks, shapes, dtypes, BatchNorm modes.

Equivalence with the official network is tested in tests/test_convert.py (official outputs).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from star_jax.core import schemes as datasets
from star_jax.models import (ModelOutput, StackedHourglass, count_parameters, create_model,
                             init_variables, parameter_shapes)
from star_jax.models import hourglass

WFLW = datasets.get_spec("wflw")


def _tiny(**overrides) -> StackedHourglass:
  fields = dict(num_stacks=2, num_levels=1, channels=16, num_points=WFLW.num_points,
                edge_points=tuple(e.points for e in WFLW.edges))
  fields.update(overrides)
  return StackedHourglass(**fields)


@pytest.fixture(scope="module")
def tiny():
  model = _tiny()
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 64, 96, 3)), jnp.float32)
  variables = init_variables(model, jax.random.PRNGKey(0))
  return model, variables, images


@pytest.fixture(scope="module")
def tiny_outputs(tiny):
  model, variables, images = tiny
  return jax.jit(model.apply)(variables, images)


# ---------------------------------------------------------------------------------------------
# Parameter counts (no allocation).


@pytest.mark.parametrize("dataset,expected", [("wflw", 17_177_332), ("300w", 17_069_572),
                                              ("cofw", 16_925_892)])
def test_full_model_parameter_count_equals_official(dataset, expected):
  model = create_model(base.get_base_config(dataset).model, datasets.get_spec(dataset))
  shapes = parameter_shapes(model)
  assert count_parameters(shapes["params"]) == expected
  assert set(shapes) == {"params", "batch_stats"}  # E2H is a constant, not a variable


def test_unused_skip_convolutions_are_what_the_official_count_adds():
  # Identity-skip bottlenecks: stem 128->128, and per stack 3 * levels + 1 hourglass blocks
  # plus the feature block, each with a 1x1 CxC convolution and bias.
  unused = (128 * 128 + 128) + 4 * (3 * 4 + 1 + 1) * (256 * 256 + 256)
  model = create_model(base.get_base_config("wflw").model, WFLW)
  lean = model.clone(keep_unused_skip=False)
  assert count_parameters(parameter_shapes(lean)["params"]) == 17_177_332 - unused


# ---------------------------------------------------------------------------------------------
# Building blocks against hand-computed or independently written references.


def test_coordinate_maps_orientation_and_values():
  maps = np.asarray(hourglass.coordinate_maps(3, 5))
  chex.assert_shape(maps, (3, 5, 3))
  # "xx" varies along the rows (H), "yy" along the columns (W); both span [-1, 1].
  np.testing.assert_allclose(maps[:, 0, 0], [-1, 0, 1])
  np.testing.assert_allclose(maps[0, :, 1], [-1, -0.5, 0, 0.5, 1])
  assert np.all(maps[:, :, 0] == maps[:, :1, 0]) and np.all(maps[:, :, 1] == maps[:1, :, 1])
  rr = np.hypot(maps[..., 0], maps[..., 1])
  np.testing.assert_allclose(maps[..., 2], rr / np.sqrt(2), rtol=1e-6)
  assert maps[0, 0, 2] == 1 and maps[1, 2, 2] == 0


def test_add_coords_boundary_channels():
  x = jnp.full((1, 3, 3, 2), 7.0)
  boundary = jnp.zeros((1, 3, 3, 1), bool).at[0, 2, 0, 0].set(True)
  out = np.asarray(hourglass.add_coords(x, boundary))
  chex.assert_shape(out, (1, 3, 3, 7))
  np.testing.assert_array_equal(out[..., :2], 7.0)
  # Order: input, xx, yy, rr, xx * mask, yy * mask.
  np.testing.assert_array_equal(out[0, :, :, 5], [[0, 0, 0], [0, 0, 0], [1, 0, 0]])
  np.testing.assert_array_equal(out[0, :, :, 6], [[0, 0, 0], [0, 0, 0], [-1, 0, 0]])
  assert hourglass.add_coords(x).shape == (1, 3, 3, 5)


class InstanceNormTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy(self):
    x = np.random.default_rng(1).normal(2.0, 3.0, (2, 5, 4, 3)).astype(np.float32)
    mean = x.mean(axis=(1, 2), keepdims=True)
    var = ((x - mean) ** 2).mean(axis=(1, 2), keepdims=True)  # biased, like torch
    expected = np.maximum((x - mean) / np.sqrt(var + 1e-5), 0)
    out = self.variant(hourglass.instance_norm_relu)(jnp.asarray(x))
    np.testing.assert_allclose(out, expected, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_statistics_in_float32_for_bfloat16(self):
    x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 4, 4, 2)), jnp.bfloat16)
    out = self.variant(hourglass.instance_norm_relu)(x)
    assert out.dtype == jnp.float32


class MaxPoolTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_value_and_gradient_match_reduce_window_without_ties(self):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 6, 8, 3)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(2, 3, 4, 3)), jnp.float32)
    reference = lambda x: jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1),
                                                (1, 2, 2, 1), "VALID")
    ours = self.variant(lambda x, g: jax.vjp(hourglass.max_pool_2x2, x)[1](g)[0])(x, g)
    expected = jax.vjp(reference, x)[1](g)[0]
    chex.assert_trees_all_equal(hourglass.max_pool_2x2(x), reference(x))
    chex.assert_trees_all_equal(ours, expected)

  @chex.variants(with_jit=True, without_jit=True)
  def test_ties_route_the_gradient_to_the_first_maximum_in_row_major_order(self):
    # torch's max_pool2d keeps the first maximum it meets scanning each window by rows.
    window = np.array([[[1.0, 3.0], [3.0, 3.0]],    # max at (0, 1) first
                       [[2.0, 0.0], [2.0, 2.0]],    # max at (0, 0)
                       [[0.0, -1.0], [5.0, 5.0]],   # max at (1, 0)
                       [[0.0, 0.0], [0.0, 0.0]]])   # all equal: (0, 0)
    x = jnp.asarray(window.transpose(1, 0, 2).reshape(1, 2, 8, 1))  # 4 windows side by side
    g = jnp.asarray([[[[10.0], [20.0], [30.0], [40.0]]]])
    grad = self.variant(lambda x, g: jax.vjp(hourglass.max_pool_2x2, x)[1](g)[0])(x, g)
    expected = np.zeros((4, 2, 2))
    expected[0, 0, 1], expected[1, 0, 0], expected[2, 1, 0], expected[3, 0, 0] = 10, 20, 30, 40
    np.testing.assert_array_equal(np.asarray(grad).reshape(2, 4, 2).transpose(1, 0, 2),
                                  expected)
    np.testing.assert_array_equal(hourglass.max_pool_2x2(x).ravel(), [3, 2, 5, 0])


def test_upsample_nearest_matches_repeat_and_resize():
  x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
  expected = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)
  np.testing.assert_array_equal(hourglass.upsample_nearest_2x(jnp.asarray(x)), expected)
  resized = jax.image.resize(jnp.asarray(x), (2, 6, 8, 5), "nearest")
  np.testing.assert_array_equal(resized, expected)


@pytest.mark.parametrize("dataset,free_points", [("wflw", (96, 97)), ("cofw", (16, 17, 28)),
                                                 ("300w", ())])
def test_edge_to_point_transform(dataset, free_points):
  spec = datasets.get_spec(dataset)
  model = create_model(base.get_base_config(dataset).model, spec)
  weight, bias = model.edge_to_point()
  chex.assert_shape((weight, bias), ((spec.num_edges, spec.num_points), (spec.num_points,)))
  assert set(np.nonzero(bias)[0].tolist()) == set(free_points)
  for e, edge in enumerate(spec.edges):
    assert set(np.nonzero(weight[e])[0].tolist()) == set(edge.points)


def test_host_initialisation_follows_torch_defaults():
  model = create_model(base.get_base_config("wflw").model, WFLW)  # the full model
  variables = init_variables(model, jax.random.PRNGKey(3))
  chex.assert_trees_all_equal_shapes_and_dtypes(
      variables, jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype),
                                        parameter_shapes(model)))
  params = variables["params"]
  kernel = params["hourglass0"]["up1"]["conv2"]["kernel"]  # 3x3, 128 -> 128: fan_in 1152
  bound = 1 / np.sqrt(3 * 3 * 128)
  assert np.abs(kernel).max() <= bound
  np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3), rtol=0.02)
  assert np.abs(params["stem_conv"]["bias"]).max() <= 1 / np.sqrt(7 * 7 * 6)
  np.testing.assert_array_equal(params["stem_bn"]["scale"], 1)
  np.testing.assert_array_equal(params["stem_bn"]["bias"], 0)
  np.testing.assert_array_equal(variables["batch_stats"]["stem_bn"]["var"], 1)
  small = _tiny()
  first, again, other = (init_variables(small, jax.random.PRNGKey(k))["params"] for k in (3, 3, 4))
  chex.assert_trees_all_equal(first, again)
  assert not np.array_equal(first["stem_conv"]["kernel"], other["stem_conv"]["kernel"])


# ---------------------------------------------------------------------------------------------
# The network on small inputs.


def test_output_structure_on_non_square_input(tiny_outputs):
  out = tiny_outputs
  assert isinstance(out, ModelOutput)
  chex.assert_shape(out.landmarks, [(2, 98, 2)] * 2)
  chex.assert_shape(out.heatmaps, [(2, 16, 24, 98)] * 2)
  chex.assert_shape(out.pointmaps, [(2, 16, 24, 98)] * 2)
  chex.assert_shape(out.edgemaps, [(2, 16, 24, 9)] * 2)
  chex.assert_tree_all_finite(out)
  assert np.all(np.abs(np.asarray(out.landmarks[-1])) <= 1)
  for maps in out.pointmaps + out.edgemaps:
    assert np.all((np.asarray(maps) > 0) & (np.asarray(maps) < 1))
  assert all(np.all(np.asarray(h) >= 0) for h in out.heatmaps)
  # Landmarks are the soft-argmax of the fused maps (written out independently here).
  h = np.asarray(out.heatmaps[1], np.float64)
  gy, gx = np.linspace(-1, 1, 16), np.linspace(-1, 1, 24)
  mass = h.sum(axis=(1, 2))
  expected = np.stack([np.einsum("bhwn,w->bn", h, gx) / mass,
                       np.einsum("bhwn,h->bn", h, gy) / mass], axis=-1)
  np.testing.assert_allclose(out.landmarks[1], expected, atol=1e-5)


def test_input_size_must_divide_by_pooling(tiny):
  model, variables, _ = tiny
  with pytest.raises(ValueError, match="60x64 is not divisible by 8"):
    jax.eval_shape(model.apply, variables, jnp.zeros((1, 60, 64, 3)))
  with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
    jax.eval_shape(model.apply, variables, jnp.zeros((1, 3, 64, 64)))


def test_train_mode_updates_batch_stats_and_gradients_flow(tiny):
  model, variables, images = tiny

  def loss_fn(params):
    out, state = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                             images, train=True, mutable=["batch_stats"])
    loss = sum(jnp.mean(lm ** 2) for lm in out.landmarks) + jnp.mean(out.pointmaps[-1])
    return loss, state

  (loss, state), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
  assert np.isfinite(loss)
  stem = state["batch_stats"]["stem_bn"]
  # Running stats moved 10 % towards the batch statistics (torch momentum 0.1).
  assert np.all(np.asarray(stem["var"]) != 1) and np.any(np.asarray(stem["mean"]) != 0)
  assert np.abs(np.asarray(grads["stem_conv"]["kernel"])).sum() > 0
  assert np.abs(np.asarray(grads["heatmap_head0"]["kernel"])).sum() > 0
  # The declared-but-unused identity skips get no gradient.
  np.testing.assert_array_equal(grads["stem_block2"]["skip"]["kernel"], 0)


def test_batch_norm_axis_name_syncs_statistics(tiny):
  """Two shards with bn_axis_name compute the statistics of the whole batch."""
  model, variables, images = tiny
  synced = model.clone(bn_axis_name="data")

  def stats(model, x):
    _, state = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return state["batch_stats"]["stem_bn"]

  whole = jax.jit(lambda x: stats(model, x))(images)
  sharded = jax.jit(jax.vmap(lambda x: stats(synced, x), axis_name="data"))(images[:, None])
  chex.assert_trees_all_close(jax.tree_util.tree_map(lambda a: a[0], sharded), whole,
                              atol=1e-5)
  chex.assert_trees_all_close(jax.tree_util.tree_map(lambda a: a[1], sharded), whole,
                              atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_outputs(tiny, tiny_outputs):
  model, variables, images = tiny
  model16 = model.clone(dtype=jnp.bfloat16)
  params16 = jax.eval_shape(model16.init, jax.random.PRNGKey(0), images)["params"]
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params16))
  out16 = jax.jit(model16.apply)(variables, images)
  out32 = tiny_outputs
  assert out16.landmarks[-1].dtype == jnp.float32 and out16.heatmaps[-1].dtype == jnp.float32
  np.testing.assert_allclose(out16.landmarks[0], out32.landmarks[0], atol=0.05)


def test_without_aam():
  model = _tiny(use_aam=False, edge_points=(), num_stacks=1, num_levels=1, channels=8)
  images = jnp.zeros((1, 32, 32, 3))
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
  out = jax.eval_shape(model.apply, variables, images)
  assert out.pointmaps == () and out.edgemaps == ()
  chex.assert_shape(out.heatmaps[0], (1, 8, 8, 98))
  assert not any("pointmap" in k or "edgemap" in k for k in variables["params"])


def test_create_model_reads_config_and_spec():
  config = base.get_base_config("cofw")
  config.model.update(num_stacks=2, num_levels=3, channels=32, dtype="bfloat16")
  model = create_model(config.model, datasets.get_spec("cofw"))
  assert (model.num_stacks, model.num_levels, model.channels, model.num_points) == (2, 3, 32, 29)
  assert model.dtype == jnp.bfloat16 and model.num_edges == 7
  assert model.edge_points[0] == (0, 4, 2, 5)
