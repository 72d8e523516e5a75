"""The real-time configs: their networks, and a few training steps on the embedded dataset."""

import json

import numpy as np
import pytest

from configs import base
from configs import realtime_1x64
from configs import realtime_2x128
from star_jax.core import schemes as datasets
from star_jax.data import embedded
from star_jax.models import count_parameters, create_model, parameter_shapes

CONFIGS = {"realtime_1x64": realtime_1x64, "realtime_2x128": realtime_2x128}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_configs_keep_the_recipe_and_shrink_the_model(name):
  config = CONFIGS[name].get_config()
  recipe = base.get_base_config("wflw")
  # Same STAR recipe: loss, optimiser, schedule, augmentation.
  for field in ("loss", "optim", "ema"):
    assert config[field].to_dict() == recipe[field].to_dict(), field
  assert config.data.augment.to_dict() == recipe.data.augment.to_dict()
  assert (config.num_epochs, config.batch_size) == (recipe.num_epochs, recipe.batch_size)
  assert config.data.image_size == 128 and config.data.image_size % (
      4 * 2 ** config.model.num_levels) == 0
  small = count_parameters(parameter_shapes(create_model(config.model, datasets.WFLW),
                                            128)["params"])
  full = count_parameters(parameter_shapes(create_model(recipe.model, datasets.WFLW),
                                           256)["params"])
  assert full == 17_177_332 and small < full / 8
  demo = CONFIGS[name].get_config("demo")
  assert demo.data.source == "embedded" and demo.model.to_dict() == config.model.to_dict()
  with pytest.raises(ValueError, match="variant"):
    CONFIGS[name].get_config("nope")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_small_configs_train_on_the_embedded_dataset(name, tmp_path_factory):
  from star_jax.training import train_lib
  from star_jax.training import eval_lib
  from star_jax.training.model_store import load_model
  root = tmp_path_factory.getbasetemp() / "embedded_small"
  files = embedded.ensure_embedded_dataset(str(root), counts=(8, 4, 4))
  config = CONFIGS[name].get_config("demo")
  config.data.source = "tsv"
  config.data.image_dir = files.image_dir
  config.data.train_tsv, config.data.val_tsv = files.train_tsv, files.val_tsv
  config.data.test_tsv = files.test_tsv
  config.batch_size = 4
  config.eval_batch_size = 4
  config.num_train_steps = 2
  config.log_every_steps = 1
  config.eval_every_steps = 2
  config.checkpoint_every_steps = 2
  workdir = tmp_path_factory.mktemp(name)
  train_lib.train_and_evaluate(config, str(workdir))
  with open(workdir / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  losses = [r["train_loss"] for r in records if "train_loss" in r]
  assert losses and all(np.isfinite(losses))
  assert any("val_nme" in r and np.isfinite(r["val_nme"]) for r in records)
  loaded = load_model(str(workdir))
  assert loaded.image_size == 128 and loaded.model.num_stacks == config.model.num_stacks
  out = eval_lib.landmark_fn_for(loaded)(loaded.variables,
                                        np.zeros((1, 128, 128, 3), np.float32))
  assert out.shape == (1, 98, 2) and np.all(np.isfinite(np.asarray(out)))
