"""The recipe's constants and glue against literal official values (never read back from the
module under test): dataset tables, config defaults, the loss assembly over several stacks, the
texture order, and the precision every convolution of the network is lowered with.

Literal values are those of the official conf/alignment.py, lib/dataset/augmentation.py and the
STAR paper's training setup.
"""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from star_jax.core import schemes as datasets
from star_jax.core import losses
from star_jax import models
from star_jax.training import train_lib
from star_jax.data import transforms

WFLW_FLIP = [
    [0, 32], [1, 31], [2, 30], [3, 29], [4, 28], [5, 27], [6, 26], [7, 25], [8, 24], [9, 23],
    [10, 22], [11, 21], [12, 20], [13, 19], [14, 18], [15, 17],
    [33, 46], [34, 45], [35, 44], [36, 43], [37, 42], [38, 50], [39, 49], [40, 48], [41, 47],
    [60, 72], [61, 71], [62, 70], [63, 69], [64, 68], [65, 75], [66, 74], [67, 73],
    [55, 59], [56, 58], [76, 82], [77, 81], [78, 80], [87, 83], [86, 84],
    [88, 92], [89, 91], [95, 93], [96, 97]]
W300_FLIP = [
    [0, 16], [1, 15], [2, 14], [3, 13], [4, 12], [5, 11], [6, 10], [7, 9],
    [17, 26], [18, 25], [19, 24], [20, 23], [21, 22], [31, 35], [32, 34],
    [36, 45], [37, 44], [38, 43], [39, 42], [40, 47], [41, 46],
    [48, 54], [49, 53], [50, 52], [61, 63], [60, 64], [67, 65], [58, 56], [59, 55]]
COFW_FLIP = [[0, 1], [4, 6], [2, 3], [5, 7], [8, 9], [10, 11], [12, 14], [16, 17], [13, 15],
             [18, 19], [22, 23]]
WFLW_EDGES = [(False, list(range(0, 33))), (True, list(range(33, 42))),
              (True, list(range(42, 51))), (False, [51, 52, 53, 54]),
              (False, [55, 56, 57, 58, 59]), (True, list(range(60, 68))),
              (True, list(range(68, 76))), (True, list(range(76, 88))),
              (True, list(range(88, 96)))]
W300_EDGES = [(False, list(range(0, 17))), (False, [17, 18, 19, 20, 21]),
              (False, [22, 23, 24, 25, 26]), (False, [27, 28, 29, 30]),
              (False, [31, 32, 33, 34, 35]), (True, list(range(36, 42))),
              (True, list(range(42, 48))), (True, list(range(48, 60))),
              (True, list(range(60, 68)))]
COFW_EDGES = [(True, [0, 4, 2, 5]), (True, [1, 6, 3, 7]), (True, [8, 12, 10, 13]),
              (False, [9, 14, 11, 15]), (True, [18, 20, 19, 21]), (True, [22, 26, 23, 27]),
              (True, [22, 24, 23, 25])]


@pytest.mark.parametrize("name, points, flips, edges, ocular, pupil, default, threshold, offset", [
    ("wflw", 98, WFLW_FLIP, WFLW_EDGES, (60, 72), (96, 97), "ocular", 0.1, -1),
    ("300w", 68, W300_FLIP, W300_EDGES, (36, 45),
     (tuple(range(36, 42)), tuple(range(42, 48))), "ocular", 0.05, -1),
    ("cofw", 29, COFW_FLIP, COFW_EDGES, (8, 9), (16, 17), "pupil", 0.1, 0),
])
def test_dataset_tables_equal_the_official_configuration(name, points, flips, edges, ocular,
                                                         pupil, default, threshold, offset):
  spec = datasets.get_spec(name)
  assert spec.num_points == points
  assert [list(p) for p in spec.flip_pairs] == flips
  assert [(e.closed, list(e.points)) for e in spec.edges] == edges
  assert spec.ocular == ocular and spec.pupil == pupil
  assert spec.default_norm == default and spec.failure_threshold == threshold
  assert spec.flip_offset == offset


def test_schemes_survive_their_json_form():
  for spec in datasets.SPECS.values():
    assert datasets.scheme_from_dict(spec.to_dict()) == spec


def test_base_config_is_the_official_recipe():
  c = base.get_base_config("wflw")
  assert (c.optim.lr, c.optim.b1, c.optim.b2, c.optim.gamma) == (1e-3, 0.9, 0.999, 0.1)
  assert tuple(c.optim.milestones) == (200, 350, 450) and c.optim.weight_decay == 0.0
  assert (c.batch_size, c.num_epochs, c.data.image_size) == (128, 500, 256)
  assert c.ema.enabled and c.ema.half_life_examples == 10000.0
  assert dict(c.loss.terms) == {"star": 1.0, "pointmap": 10.0, "edgemap": 10.0,
                                "smoothl1": 0.0, "l1": 0.0, "l2": 0.0, "wing": 0.0}
  assert dict(c.loss.star) == {"w": 1.0, "dist": "smoothl1", "eps": 1e-5, "version": "v2"}
  assert c.data.gaussian_sigma == 1.5 and c.data.aug_prob == 1.0
  assert c.data.val_fraction == 0.05 and c.best_weights == "ema"
  resolved = models.create_model(c.model, datasets.get_spec("wflw"))
  assert (resolved.num_stacks, resolved.num_levels, resolved.channels, resolved.use_aam) == (
      4, 4, 256, True)


def _outputs(num_stacks, rng):
  b, h, n, e = 2, 8, 98, 9
  maps = lambda c: jnp.asarray(rng.uniform(0.0, 1.0, (b, h, h, c)) ** 4, jnp.float32)
  heat = [maps(n) for _ in range(num_stacks)]
  return models.ModelOutput(
      landmarks=tuple(jnp.asarray(rng.uniform(-0.9, 0.9, (b, n, 2)), jnp.float32)
                      for _ in range(num_stacks)),
      heatmaps=tuple(heat), pointmaps=tuple(maps(n) for _ in range(num_stacks)),
      edgemaps=tuple(maps(e) for _ in range(num_stacks)))


def test_compute_loss_weights_every_stack_and_term():
  rng = np.random.default_rng(0)
  out = _outputs(3, rng)
  batch = {"landmarks": rng.uniform(-0.9, 0.9, (2, 98, 2)).astype(np.float32),
           "pointmaps": rng.uniform(0, 1, (2, 8, 8, 98)).astype(np.float32),
           "edgemaps": rng.uniform(0, 1, (2, 8, 8, 9)).astype(np.float32)}
  config = base.get_base_config("wflw")
  total, parts = train_lib.compute_loss(config, out, batch)
  stack = [0.25, 0.5, 1.0]   # 2^i / 2^(S-1) for S = 3
  star = sum(w * losses.star_loss(out.heatmaps[i], batch["landmarks"], w=1.0, dist="smoothl1",
                                  eps=1e-5) for i, w in enumerate(stack))
  point = sum(w * 10 * losses.awing_loss(out.pointmaps[i], batch["pointmaps"])
              for i, w in enumerate(stack))
  edge = sum(w * 10 * losses.awing_loss(out.edgemaps[i], batch["edgemaps"])
             for i, w in enumerate(stack))
  chex.assert_trees_all_close(parts, {"star": star, "pointmap": point, "edgemap": edge},
                              rtol=1e-6)
  np.testing.assert_allclose(total, star + point + edge, rtol=1e-6)
  # The official `--loss_func smoothl1`: the coordinate criterion on the decoded landmarks.
  config.loss.terms.star = 0.0
  config.loss.terms.smoothl1 = 1.0
  _, parts = train_lib.compute_loss(config, out, batch)
  coord = sum(w * losses.smooth_l1_loss(out.landmarks[i], batch["landmarks"])
              for i, w in enumerate(stack))
  assert set(parts) == {"smoothl1", "pointmap", "edgemap"}
  np.testing.assert_allclose(parts["smoothl1"], coord, rtol=1e-6)


def test_star_options_reach_the_loss():
  rng = np.random.default_rng(1)
  out = _outputs(1, rng)
  batch = {"landmarks": rng.uniform(-0.9, 0.9, (2, 98, 2)).astype(np.float32)}
  config = base.get_base_config("wflw")
  config.loss.terms.pointmap = config.loss.terms.edgemap = 0.0
  values = {}
  for eps in (1e-5, 1e-4):
    config.loss.star.eps = eps
    values[eps] = float(train_lib.compute_loss(config, out, batch)[0])
    np.testing.assert_allclose(values[eps], losses.star_loss(
        out.heatmaps[0], batch["landmarks"], eps=eps), rtol=1e-6)
  assert values[1e-5] != values[1e-4]


def test_unknown_loss_term_or_option_is_a_usage_error():
  from star_jax.errors import UsageError
  config = base.get_base_config("wflw")
  with config.unlocked():
    config.loss.terms.nope = 1.0
  with pytest.raises(UsageError, match="config.loss.terms.nope: no such loss term"):
    train_lib.loss_terms(config)
  config = base.get_base_config("wflw")
  with config.unlocked():
    config.loss.star.beta = 1.0
  rng = np.random.default_rng(2)
  with pytest.raises(UsageError, match="config.loss.star: unknown option"):
    train_lib.compute_loss(config, _outputs(1, rng), {
        "landmarks": np.zeros((2, 98, 2), np.float32),
        "pointmaps": np.zeros((2, 8, 8, 98), np.float32),
        "edgemaps": np.zeros((2, 8, 8, 9), np.float32)})


def test_texture_ends_with_the_official_gray():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (16, 16, 3), np.uint8)
  params = transforms.AugmentParams(augment=True, gray=True)
  out = transforms.apply_texture(image, params)
  # Official weights applied to BGR data: on RGB, 0.114 R + 0.587 G + 0.299 B.
  expected = np.round(0.114 * image[..., 0] + 0.587 * image[..., 1] + 0.299 * image[..., 2])
  for channel in range(3):
    assert np.abs(out[..., channel].astype(int) - expected).max() <= 1


def _lowered_ops(precision):
  config = base.get_base_config("wflw")
  config.model.precision = precision
  model = models.create_model(config.model, datasets.get_spec("wflw"))
  images = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(images.shape)))
  text = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, images).as_text()
  found = list(re.finditer(r"stablehlo\.(convolution|dot_general)[^\n]*", text))
  return [m.group(1) for m in found], [m.group(0) for m in found]


def test_highest_precision_reaches_every_convolution_and_product():
  _, lines = _lowered_ops("highest")
  # 224 convolutions and products in the 4-stack WFLW network, the decoder's and edge-to-point
  # products included.
  assert len(lines) == 224
  assert all("HIGHEST" in line for line in lines), [x for x in lines if "HIGHEST" not in x][:3]
  ops, lines = _lowered_ops("")
  # With the backend default only the decoder's two and the edge-to-point product per stack,
  # which are always exact, carry HIGHEST.
  highest = [op for op, line in zip(ops, lines) if "HIGHEST" in line]
  assert highest == ["dot_general"] * (3 * 4)
