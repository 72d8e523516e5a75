"""Training on your own faces: fine-tuning (official .pkl and star-jax checkpoints, onto the same
or another landmark scheme), a custom 29-point scheme, freezing, and the official options."""

from __future__ import annotations

import os

import chex
import jax
import numpy as np
import pytest

from configs import base
from star_jax import checkpointing, datasets, eval_lib, finetune, logging_utils, models
from star_jax import predict, train_lib
from star_jax.errors import UsageError
from tests import tiny_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFICIAL = os.path.join(ROOT, "tests", "fixtures", "official_wflw_small", "checkpoint.pkl")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("own_faces")
  files = tiny_data.wflw(str(root / "wflw"), counts=(16, 8, 8))
  scheme = tiny_data.scheme29(str(root / "face29"), files)
  return files, scheme


def _config(files, dataset="wflw", image_dir=None, tsv_dir=None):
  c = base.get_base_config("wflw")
  c.dataset = dataset
  c.data.image_dir = image_dir or files.image_dir
  folder = tsv_dir or os.path.dirname(files.train_tsv)
  c.data.train_tsv, c.data.val_tsv, c.data.test_tsv = (
      os.path.join(folder, f"{s}.tsv") for s in ("train", "val", "test"))
  c.data.image_size = 64
  c.batch_size = c.eval_batch_size = 4
  c.num_train_steps = 2
  c.log_every_steps = 1
  c.eval_every_steps = c.checkpoint_every_steps = 2
  return c


def test_architecture_comes_from_the_checkpoint_unless_the_config_sets_it():
  config = base.get_base_config("wflw")
  config.init_from = OFFICIAL
  resolved = finetune.resolve_model_config(config)
  assert (resolved.model.num_stacks, resolved.model.num_levels, resolved.model.channels,
          resolved.model.use_aam) == (4, 4, 32, True)
  config.model.channels, config.model.num_stacks = 64, 2
  with pytest.raises(UsageError) as info:
    finetune.resolve_model_config(config)
  message = str(info.value)
  assert "model.num_stacks=2 (checkpoint: 4)" in message
  assert "model.channels=64 (checkpoint: 32)" in message and "\n" not in message


def test_merge_loads_matching_and_reinitialises_scheme_dependent_variables():
  fresh = {"params": {"stem_conv": {"kernel": np.zeros((3, 3))},
                      "heatmap_head0": {"kernel": np.zeros((2, 29))},
                      "features0": {"kernel": np.zeros((4,))}},
           "batch_stats": {"stem_bn": {"mean": np.zeros(2)}}}
  trained = {"params": {"stem_conv": {"kernel": np.ones((3, 3))},
                        "heatmap_head0": {"kernel": np.ones((2, 29))},
                        "features0": {"kernel": np.ones((5,))}},
             "batch_stats": {"stem_bn": {"mean": np.ones(2)}}}
  merged, report = finetune.merge_variables(fresh, trained, reinit_scheme=True)
  assert merged["params"]["stem_conv"]["kernel"].sum() == 9
  assert merged["batch_stats"]["stem_bn"]["mean"].sum() == 2
  # Same shape, but another scheme: the head keeps its fresh values.
  assert merged["params"]["heatmap_head0"]["kernel"].sum() == 0
  assert merged["params"]["features0"]["kernel"].sum() == 0
  assert report["scheme"] == ["params/heatmap_head0"]
  assert report["shape"] == ["params/features0"]


@pytest.mark.slow
def test_finetune_official_checkpoint_step0_matches_eval_then_onto_29_points(data, tmp_path):
  files, scheme = data
  # 1. From the official .pkl, same scheme: before any update the validation NME is what
  #    eval.py reports for that checkpoint on the same split.
  config = _config(files)
  config.init_from = OFFICIAL
  run1 = str(tmp_path / "from_official")
  train_lib.train_and_evaluate(config, run1)
  step0 = next(r for r in logging_utils.read_metrics(run1) if r["step"] == 0)
  config.model.num_stacks = 4   # what the run resolved (eval takes the config as given)
  evaluated = eval_lib.evaluate(config, OFFICIAL, None, split="val", progress=False,
                                verbose=False)
  assert step0["val_nme"] == pytest.approx(evaluated.metrics["nme"], rel=1e-5)
  assert step0["val_nme_raw"] == step0["val_nme"]  # EMA starts as a copy
  assert "val_nme_stack0" in step0 and "val_nme_stack3" in step0

  # 2. From that star-jax run onto the 29-point scheme, stem frozen.
  config29 = _config(files, dataset=scheme, image_dir=os.path.join(os.path.dirname(scheme),
                                                                   "images"),
                     tsv_dir=os.path.dirname(scheme))
  config29.init_from = run1
  config29.freeze = "stem"
  run2 = str(tmp_path / "onto_29")
  result = train_lib.train_and_evaluate(config29, run2)
  start = checkpointing.load_model(run1)
  final = jax.tree.map(np.asarray, result.state.params)
  initial = jax.tree.map(np.asarray, start.variables["params"])
  chex.assert_trees_all_equal({k: v for k, v in final.items() if k.startswith("stem_")},
                              {k: v for k, v in initial.items() if k.startswith("stem_")})
  assert not np.array_equal(final["features0"]["conv1"]["kernel"],
                            initial["features0"]["conv1"]["kernel"])
  assert final["heatmap_head0"]["kernel"].shape[-1] == 29
  loaded = checkpointing.load_model(run2)
  assert loaded.spec.name == "face29" and loaded.num_points == 29
  out = eval_lib.evaluate(config29, run2, str(tmp_path / "eval29"), progress=False,
                          verbose=False)
  assert out.landmarks.shape == (8, 29, 2) and np.isfinite(out.metrics["nme"])
  # The checkpoint carries its scheme: prediction needs nothing else.
  predictor = predict.Predictor(run2, batch_size=2)
  image = np.zeros((128, 128, 3), np.uint8)
  faces = predictor.predict(image, boxes=[(20, 20, 100, 100)])
  assert faces[0].shape == (29, 2)


@pytest.mark.slow
def test_custom_scheme_from_scratch(data, tmp_path):
  files, scheme = data
  config = _config(files, dataset=scheme, image_dir=os.path.join(os.path.dirname(scheme),
                                                                 "images"),
                   tsv_dir=os.path.dirname(scheme))
  config.model.num_stacks, config.model.num_levels, config.model.channels = 1, 2, 16
  run = str(tmp_path / "scratch29")
  train_lib.train_and_evaluate(config, run)
  loaded = checkpointing.load_model(run)
  assert loaded.spec == datasets.load_scheme(scheme)
  assert models.describe(loaded.model)["fields"]["num_points"] == 29
  out = eval_lib.evaluate(config, run, None, progress=False, verbose=False)
  assert out.metrics["num_images"] == 8


def test_scheme_file_errors_name_the_file(tmp_path):
  path = tmp_path / "bad.json"
  path.write_text('{"name": "x", "num_points": 4, "edges": [{"points": [0, 9]}]}')
  with pytest.raises(UsageError, match=r"bad.json: edges\[0\] point 9 is out of range"):
    datasets.get_spec(str(path))
  path.write_text('{"name": "x", "num_points": 4, "edges": [], "flip_pairs": [[0, 1], [1, 2]]}')
  with pytest.raises(UsageError, match="each point may appear in one pair only"):
    datasets.get_spec(str(path))
  path.write_text("not json")
  with pytest.raises(UsageError, match="not a JSON scheme file"):
    datasets.get_spec(str(path))
