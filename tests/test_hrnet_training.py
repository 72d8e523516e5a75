"""HRNetV2-W18 trained with the STAR losses through the training loop, then loaded and evaluated.

A few steps of configs/demo_hrnet.py at 32x32 input (the smallest HRNet takes), with one module per
stage and one block per branch (the official structure, a sixth of its layers: the same code at a
fraction of the compile time; the official network trains in the fine-tuning test) on the synthetic
batches of tests/train_harness.py; the stored model is read back with `model_store.load_model`
and evaluated on the WFLW fixture images with `eval_lib.evaluate`. Fine-tuning:
configs/300w_hrnet.py started (`config.init_from`) from the HRNet fixture in the released file
layout (tests/fixtures/official_hrnet_300w), by path and by released name.
"""

import importlib
import math
import os

import flax.traverse_util
import numpy as np
import pytest

from configs import demo_hrnet
from configs import wflw_hrnet
from star_jax import models
from star_jax.core import schemes as datasets
from star_jax.training import finetune
from star_jax.training import model_store
from star_jax.training import eval_lib
from star_jax.training import logging_utils
from star_jax.training import train_lib
from tests import train_harness

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
DATA_DIR = os.path.join(FIXTURES, "official_wflw_data")
HRNET_300W = os.path.join(FIXTURES, "official_hrnet_300w", "HR18-300W-fixture.pth")
STEPS = 3
SMALL_STAGE_MODULES = (1, 1, 1)


def _tiny_config():
  c = demo_hrnet.get_config()
  c.data.image_size = train_harness.IMAGE_SIZE
  c.model.stage_modules = SMALL_STAGE_MODULES
  c.model.blocks = 1
  c.batch_size = train_harness.GLOBAL_BATCH
  c.eval_batch_size = 4
  c.num_train_steps = STEPS
  c.log_every_steps = 1
  c.eval_every_steps = STEPS
  c.checkpoint_every_steps = STEPS
  return c


def test_configs_name_hrnet_and_the_star_losses():
  c = wflw_hrnet.get_config()
  assert c.model.name == "hrnet_w18" and c.model.width == 18
  assert c.data.image_size == 256                 # the official HRNet face input
  terms = {name for name, _, _, _ in train_lib.loss_terms(c, use_aam=False)}
  assert terms == {"star", "heatmap"}
  demo = demo_hrnet.get_config()
  assert demo.data.source == "embedded" and demo.data.image_size % 32 == 0


@pytest.mark.slow
def test_hrnet_trains_loads_and_evaluates(tmp_path):
  config = _tiny_config()
  workdir = str(tmp_path / "run")
  result = train_lib.train_and_evaluate(config, workdir, data=train_harness.FakeData(config))
  assert result.step == STEPS and not result.stopped
  records = [r for r in logging_utils.read_metrics(workdir) if "train_loss" in r]
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  for r in records:
    # Both terms contribute, and no AAM term is assembled without point / edge maps.
    assert math.isfinite(r["train_loss"]) and r["train_loss_star"] > 0
    assert r["train_loss_heatmap"] > 0 and "train_loss_pointmap" not in r
    assert r["train_loss"] == pytest.approx(r["train_loss_star"] + r["train_loss_heatmap"],
                                            rel=1e-5)

  loaded = model_store.load_model(os.path.join(workdir, "checkpoints"))
  assert type(loaded.model).registry_name == "hrnet_w18"
  assert loaded.model.num_points == 98 and loaded.model.decode == "soft_argmax"
  assert loaded.model.stage_modules == SMALL_STAGE_MODULES and loaded.model.blocks == 1
  assert loaded.image_size == train_harness.IMAGE_SIZE and loaded.extra["step"] == STEPS

  eval_config = wflw_hrnet.get_config()
  eval_config.data.test_tsv = os.path.join(DATA_DIR, "test.tsv")
  eval_config.data.image_dir = DATA_DIR
  eval_config.eval_batch_size = 4
  eval_config.data.image_size = train_harness.IMAGE_SIZE   # the size it was trained at
  evaluation = eval_lib.evaluate(eval_config, loaded, None, progress=False, verbose=False)
  assert evaluation.landmarks.shape == (3, 98, 2)
  assert np.isfinite(evaluation.landmarks).all() and np.isfinite(evaluation.nme).all()
  assert math.isfinite(evaluation.metrics["nme"])


def _prediction(heatmaps):
  from star_jax.core import losses
  return losses.StackPrediction(landmarks=None, heatmaps=heatmaps, pointmaps=None,
                                edgemaps=None)


def test_heatmap_term_mse_and_awing():
  from star_jax.core import losses
  from star_jax.errors import UsageError
  import jax.numpy as jnp
  pred = jnp.zeros((1, 2, 2, 1), jnp.float32)
  target = np.zeros((1, 2, 2, 1), np.float32)
  target[0, 0, 0, 0] = 1.0
  term = losses.get_term("heatmap").fn
  batch = {"pointmaps": target}
  # One pixel off by 1 of 4: mean squared error 1/4.
  assert float(term(_prediction(pred), batch, {"dist": "mse"})) == pytest.approx(0.25)
  # AWing: the target-1 pixel is off by 1 >= theta (linear part), the three others exact (0);
  # every pixel is foreground after the 3x3 dilation, weight 11. Linear part a*1 - c with
  # omega 14, theta 0.5, epsilon 1, alpha 2.1 at y = 1 (power 1.1): a = 14/(1 + 0.5**1.1) * 1.1
  # * 0.5**0.1, c = 0.5 a - 14 log(1 + 0.5**1.1).
  a = 14 / (1 + 0.5 ** 1.1) * 1.1 * 0.5 ** 0.1
  c = 0.5 * a - 14 * math.log1p(0.5 ** 1.1)
  assert float(term(_prediction(pred), batch, {})) == pytest.approx(11 * (a - c) / 4, rel=1e-5)
  with pytest.raises(UsageError, match="config.loss.heatmap.dist"):
    term(_prediction(pred), batch, {"dist": "huber"})


def test_star_activation_relu_reads_only_the_positive_part():
  from star_jax.core import losses
  from star_jax.errors import UsageError
  import jax.numpy as jnp
  rng = np.random.default_rng(0)
  positive = rng.uniform(0, 1, (2, 8, 8, 3)).astype(np.float32)
  signed = positive - np.where(rng.uniform(size=positive.shape) < 0.5, 2.0, 0.0).astype(
      np.float32) * (positive < 0.5)
  clipped = np.maximum(signed, 0)
  batch = {"landmarks": rng.uniform(-0.5, 0.5, (2, 3, 2)).astype(np.float32)}
  term = losses.get_term("star").fn
  with_relu = term(_prediction(jnp.asarray(signed)), batch, {"activation": "relu"})
  on_clipped = term(_prediction(jnp.asarray(clipped)), batch, {})
  assert float(with_relu) == pytest.approx(float(on_clipped), rel=1e-6)
  with pytest.raises(UsageError, match="config.loss.star.activation"):
    term(_prediction(jnp.asarray(signed)), batch, {"activation": "sigmoid"})


def _finetune_config(init_from):
  """configs/300w_hrnet.py (68 points, like the fixture) at 32 px, one step, from `init_from`."""
  config = importlib.import_module("configs.300w_hrnet").get_config()
  config.init_from = init_from
  config.data.image_size = train_harness.IMAGE_SIZE
  config.batch_size = train_harness.GLOBAL_BATCH
  config.eval_batch_size = 4
  config.num_train_steps = config.log_every_steps = 1
  config.eval_every_steps = config.checkpoint_every_steps = 1
  return config


def _flat(tree):
  return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree).items()}


def test_finetune_from_the_released_hrnet_layout_starts_from_the_converted_file():
  """init_from the 68-point fixture (a DataParallel `module.` state dict, the layout of the
  released HR18-300W.pth) by path: the run's network is HRNetV2-W18 and every one of its
  variables at step 0 is the converted file's."""
  config = finetune.resolve_model_config(_finetune_config(HRNET_300W))
  assert config.model.name == "hrnet_w18" and config.model.width == 18
  spec = datasets.get_spec(config.dataset)
  model = models.create_model(config.model, spec)
  fresh = models.init_variables(model, 3, train_harness.IMAGE_SIZE)
  start = _flat(finetune.load_initial_variables(config, model, spec, fresh))
  converted = _flat(model_store.load_model(HRNET_300W).variables)
  initial = _flat(fresh)
  assert set(start) == set(converted)
  for key in start:
    np.testing.assert_array_equal(start[key], converted[key], err_msg=str(key))
  # The fresh draw differs from the file, so the equality above is the loading.
  for key in (("params", "conv1", "kernel"), ("params", "head_3", "kernel"),
              ("batch_stats", "head_1", "mean")):
    assert not np.array_equal(initial[key], converted[key]), key


@pytest.mark.slow
def test_finetune_hrnet_by_released_name_trains_from_the_file(tmp_path, monkeypatch):
  """The fixture registered as `hrnet-300w`, then one training step from that name with
  everything but the head frozen: the frozen parameters are still the file's, the head moved,
  the losses are finite and the stored model reads back as the 68-point HRNet."""
  from star_jax.commands import released as released_command
  monkeypatch.setenv("STAR_JAX_CACHE", str(tmp_path / "cache"))
  assert released_command.main(["register", "hrnet-300w", HRNET_300W]) == 0
  config = _finetune_config("hrnet-300w")
  config.freeze = "stem,stage2,stage3,stage4"
  workdir = str(tmp_path / "run")
  result = train_lib.train_and_evaluate(config, workdir, data=train_harness.FakeData(config))
  assert result.step == 1 and not result.stopped
  record = next(r for r in logging_utils.read_metrics(workdir) if "train_loss" in r)
  assert math.isfinite(record["train_loss"]) and record["train_loss_heatmap"] > 0
  converted = _flat(model_store.load_model(HRNET_300W).variables["params"])
  trained = _flat(result.state.params)
  assert set(trained) == set(converted)
  for key, value in trained.items():
    if key[0].startswith("head"):
      continue
    np.testing.assert_array_equal(value, converted[key], err_msg=str(key))
  assert not np.array_equal(trained[("head_3", "kernel")], converted[("head_3", "kernel")])
  loaded = model_store.load_model(os.path.join(workdir, "checkpoints"))
  assert type(loaded.model).registry_name == "hrnet_w18" and loaded.model.num_points == 68
