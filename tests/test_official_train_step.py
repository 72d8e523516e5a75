"""One official STAR training step, reproduced in float64: the test that pins training.

The fixture (tests/fixtures/official_train_wflw, see its README) is the official code's own
step: its StackedHGNetV1 (WFLW, 4 stacks, 32 channels, AAM, 128 px) from `checkpoint.pkl`, its
augmented batches, the twelve weighted loss terms (STARLoss_v2 + AWing on point and edge maps per
stack), backward, Adam (lr 1e-3) and the parameter-and-buffer EMA, all in float64, and the state
after it. star-jax's `train_step` (the function `train.py` maps over devices) runs the same step
from the converted checkpoint and must land on the same state.

Only the official CoordConv `rr` maps are taken from the fixture: torch's float32 `sqrt` is not
correctly rounded on the CPU that made it (1 ulp on some pixels), and that alone moves a float64
step by ~1e-7 (fixture README). `coordinate_maps.npz` holds the official maps, made by the
official `AddCoordsTh` formula with that torch build.
"""

from __future__ import annotations

import collections
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import base
from star_jax.foreign import official
from star_jax.foreign.star_layout import FIRST_CONV_INPUT_ORDER, layer_mapping
from star_jax.models import hourglass
from star_jax.training import parallel, train_lib

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "official_train_wflw")
LR = 1e-3
BATCH = 2
HALF_LIFE_EXAMPLES = 10000.0   # the official EMA: decay 0.5 ** (2 / 10000) per step of 2
HOURGLASS_COORDINATE_MAPS = hourglass.coordinate_maps   # before the module fixture patches it


@pytest.fixture(scope="module")
def fixture():
  load = lambda name: dict(np.load(os.path.join(FIXTURE, name)))
  return {"batches": load("batches.npz"), "final": load("final_state.npz"),
          "three_steps": load("losses_3steps.npz"), "maps": load("coordinate_maps.npz")}


def _official_coordinate_maps(maps, height, width, dtype=jnp.float32):
  """`hourglass.coordinate_maps` with the official rr map of that size (xx and yy are exact)."""
  assert height == width, (height, width)
  coords = HOURGLASS_COORDINATE_MAPS(height, width, np.float32)
  coords[..., 2] = maps[f"rr_{height}"]
  return coords.astype(dtype)


def _batch(batches, j):
  """Batch j in star-jax's layout: NHWC RGB images (the official feeds NCHW BGR), float64."""
  nhwc = lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1), np.float64)
  return {"image": nhwc(batches[f"data_{j}"])[..., ::-1].copy(),
          "landmarks": batches[f"landmarks_{j}"].astype(np.float64),
          "pointmaps": nhwc(batches[f"pointmaps_{j}"]),
          "edgemaps": nhwc(batches[f"edgemaps_{j}"])}


def _config():
  config = base.get_base_config("wflw")   # the official recipe's loss terms and weights
  config.batch_size = BATCH
  config.optim.lr = LR
  config.optim.milestones = ()
  config.optim.weight_decay = 0.0
  config.ema.enabled = True
  config.ema.half_life_examples = HALF_LIFE_EXAMPLES
  return config


def _as_ours(arrays, prefix, arch, stats_only=False):
  """The official state-dict arrays under `prefix` as star-jax variables (float64)."""
  params, stats = {}, {}
  for kind, name, ours in layer_mapping(arch):
    if stats_only and kind == "conv":
      continue
    get = lambda suffix, name=name: np.asarray(arrays[f"{prefix}/{name}.{suffix}"], np.float64)
    if kind == "conv":
      kernel = get("weight").transpose(2, 3, 1, 0)   # OIHW -> HWIO
      if name == "pre.0.conv":
        kernel = kernel[:, :, list(FIRST_CONV_INPUT_ORDER), :]
      params[ours + ("kernel",)], params[ours + ("bias",)] = kernel, get("bias")
    else:
      if not stats_only:
        params[ours + ("scale",)], params[ours + ("bias",)] = get("weight"), get("bias")
      stats[ours + ("mean",)], stats[ours + ("var",)] = get("running_mean"), get("running_var")
  return params, stats


@pytest.fixture(scope="module")
def converted():
  """(architecture, float32 variables) of the official checkpoint, through the converter."""
  return official.read_official(os.path.join(FIXTURE, "checkpoint.pkl"))


@pytest.fixture(scope="module")
def run(fixture, converted, monkeypatch_module):
  """star-jax's train_step for three steps on batches 0, 1, 2, from the official weights."""
  arch, variables = converted
  monkeypatch_module.setattr(hourglass, "coordinate_maps",
                             functools.partial(_official_coordinate_maps, fixture["maps"]))
  with jax.enable_x64(True):
    model = official.model_from_architecture(arch, dtype=jnp.float64).clone(
        bn_axis_name=parallel.AXIS_NAME)
    variables = jax.tree.map(lambda x: np.asarray(x, np.float64), variables)  # net.double()
    config = _config()
    tx = train_lib.make_optimizer(config, epoch_steps=1000)
    decay = train_lib.ema_decay(config)
    state = train_lib.create_train_state(variables, tx)
    step = jax.pmap(functools.partial(
        train_lib.train_step, model=model, tx=tx, decay=decay,
        loss_fn=functools.partial(train_lib.compute_loss, config)),
        axis_name=parallel.AXIS_NAME, devices=jax.local_devices()[:1])
    state_r = jax.tree.map(lambda x: np.asarray(x)[None], state)
    states, metrics = [], []
    for j in range(3):
      batch = jax.tree.map(lambda x: x[None], _batch(fixture["batches"], j))
      state_r, m = step(state_r, batch)
      states.append(jax.tree.map(lambda x: np.asarray(x)[0], state_r))
      metrics.append({k: float(np.asarray(v)[0]) for k, v in m.items()})
  return {"initial": state, "states": states, "metrics": metrics, "decay": decay, "arch": arch}


@pytest.fixture(scope="module")
def monkeypatch_module():
  with pytest.MonkeyPatch.context() as patch:
    yield patch


def test_the_fixture_maps_are_the_official_formula_up_to_sqrt_rounding(fixture):
  # The stored maps differ from a correctly rounded float32 sqrt by 1 ulp before the division by
  # the maximum, so by at most 2 after it; on most pixels not at all.
  for size in (128, 32):
    official_rr = fixture["maps"][f"rr_{size}"]
    ours = HOURGLASS_COORDINATE_MAPS(size, size, np.float32)[..., 2]
    ulps = np.abs(official_rr.view(np.int32).astype(np.int64) - ours.view(np.int32))
    assert official_rr.dtype == np.float32 and ulps.max() <= 2, size
    assert 0 < np.count_nonzero(ulps) < official_rr.size // 4, size


def test_recipe_constants_are_the_official_ones(run, fixture):
  final = fixture["final"]
  np.testing.assert_allclose(run["decay"], final["ema_decay"], rtol=1e-15)
  # The official loss weights: 2^i / 2^3 * (STAR 1, point maps 10, edge maps 10) per stack i.
  np.testing.assert_array_equal(final["loss_weights"],
                                [0.125, 1.25, 1.25, 0.25, 2.5, 2.5, 0.5, 5, 5, 1, 10, 10])
  weights = train_lib.stack_weights(4)
  assert weights == [0.125, 0.25, 0.5, 1.0]


def test_losses_and_gradient_norm_match_the_official_step(run, fixture):
  final = fixture["final"]
  metrics = run["metrics"][0]
  terms = (final["losses"][0] * final["loss_weights"]).reshape(4, 3).sum(axis=0)
  for name, official_value in zip(("star", "pointmap", "edgemap"), terms):
    np.testing.assert_allclose(metrics[f"loss_{name}"], official_value, rtol=1e-12, err_msg=name)
  np.testing.assert_allclose(metrics["loss"], final["total"][0], rtol=1e-12)
  np.testing.assert_allclose(metrics["grad_norm"], final["grad_norm"][0], rtol=1e-10)


def test_three_steps_follow_the_official_run(run, fixture):
  official_run = fixture["three_steps"]
  totals = [m["loss"] for m in run["metrics"]]
  norms = [m["grad_norm"] for m in run["metrics"]]
  # Rounding differences grow with every step (the README: x10^2 to x10^4 per step), so the
  # bounds are those of the last step, the gradient norm's a step later than the loss's.
  np.testing.assert_allclose(totals, official_run["total"], rtol=1e-9)
  np.testing.assert_allclose(norms, official_run["grad_norm"], rtol=1e-6)


def _kind_of_update(name, update):
  """How the official step moved a parameter: 'unused' (not in the graph, e.g. the skip conv
  the official ResBlock builds but does not call when its input and output widths agree),
  'null' (a convolution bias followed by BatchNorm: analytically zero gradient, which Adam
  turns from rounding noise into a step well below lr) or 'step' (Adam's first, sign-like step
  of about lr per weight)."""
  largest = np.max(np.abs(update))
  if largest == 0:
    return "unused"
  if name[-1] == "bias" and largest < 1e-2 * LR:
    return "null"
  return "step"


def test_parameters_after_one_step_match_the_official(run, fixture):
  params, _ = _as_ours(fixture["final"], "net", run["arch"])
  initial = traverse_util.flatten_dict(run["initial"].params)
  ours = traverse_util.flatten_dict(run["states"][0].params)
  assert set(ours) == set(params)
  kinds = collections.Counter()
  for name, official_value in params.items():
    start = np.asarray(initial[name], np.float64)
    kind = _kind_of_update(name, official_value - start)
    kinds[kind] += 1
    if kind == "unused":
      np.testing.assert_array_equal(ours[name], start, err_msg="/".join(name))
    elif kind == "null":
      assert np.max(np.abs(ours[name] - start)) < 1e-2 * LR, name
    else:
      assert np.max(np.abs(official_value - start)) > 0.5 * LR, name
      np.testing.assert_allclose(ours[name], official_value, rtol=0, atol=1e-9,
                                 err_msg="/".join(name))
  assert kinds["step"] > kinds["null"] + kinds["unused"] and kinds["null"] > 0, kinds


def test_batch_norm_statistics_after_one_step_match_the_official(run, fixture):
  _, stats = _as_ours(fixture["final"], "net", run["arch"])
  _, ema_stats = _as_ours(fixture["final"], "net_ema", run["arch"], stats_only=True)
  state = run["states"][0]
  initial = traverse_util.flatten_dict(run["initial"].batch_stats)
  for ours_tree, official_stats in ((state.batch_stats, stats),
                                    (state.ema_batch_stats, ema_stats)):
    ours = traverse_util.flatten_dict(ours_tree)
    assert set(ours) == set(official_stats)
    for name, official_value in official_stats.items():
      change = np.max(np.abs(official_value - initial[name]))
      assert change > 0, name   # the running averages really moved
      np.testing.assert_allclose(ours[name], official_value, rtol=0, atol=1e-10 * (1 + change),
                                 err_msg="/".join(name))


def test_ema_parameters_after_one_step_follow_the_official_rule(run, fixture):
  # The fixture keeps net_ema's buffers only: its parameters are the official accumulate_net of
  # the initial and the stepped `net`, decay * initial + (1 - decay) * stepped.
  params, _ = _as_ours(fixture["final"], "net", run["arch"])
  decay = float(fixture["final"]["ema_decay"])
  initial = traverse_util.flatten_dict(run["initial"].params)
  ours = traverse_util.flatten_dict(run["states"][0].ema_params)
  for name, stepped in params.items():
    start = np.asarray(initial[name], np.float64)
    if _kind_of_update(name, stepped - start) == "null":
      continue   # compared through the stepped parameters above
    expected = decay * start + (1 - decay) * stepped
    np.testing.assert_allclose(ours[name], expected, rtol=0, atol=1e-12, err_msg="/".join(name))
