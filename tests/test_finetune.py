"""Training on your own faces: fine-tuning (official .pkl and star-jax checkpoints, onto the same
or another landmark scheme), a custom 29-point scheme, freezing, and the official options."""

from __future__ import annotations

import os

import chex
import jax
import numpy as np
import pytest

from configs import base
from star_jax.training import eval_lib, finetune, logging_utils, model_store
from star_jax.core import schemes as datasets
from star_jax import models
from star_jax.deploy import predict
from star_jax.training import train_lib
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
  merged, report = finetune.merge_variables(
      fresh, trained, reinitialise=models.StackedHourglass.is_scheme_dependent)
  assert merged["params"]["stem_conv"]["kernel"].sum() == 9
  assert merged["batch_stats"]["stem_bn"]["mean"].sum() == 2
  # Same shape, but another scheme: the head keeps its fresh values.
  assert merged["params"]["heatmap_head0"]["kernel"].sum() == 0
  assert merged["params"]["features0"]["kernel"].sum() == 0
  assert report["scheme"] == ["params/heatmap_head0"]
  assert report["shape"] == ["params/features0"]


@pytest.mark.slow
def test_finetune_official_checkpoint_step0_validation_equals_eval(data, tmp_path):
  """From the official .pkl, same scheme: before any update the validation NME is what eval.py
  reports for that checkpoint on the same split."""
  files, _ = data
  config = _config(files)
  config.init_from = OFFICIAL
  config.num_train_steps = config.eval_every_steps = config.checkpoint_every_steps = 1
  run = str(tmp_path / "from_official")
  train_lib.train_and_evaluate(config, run)
  step0 = next(r for r in logging_utils.read_metrics(run) if r["step"] == 0)
  evaluated = eval_lib.evaluate(config, OFFICIAL, None, split="val", progress=False,
                                verbose=False)
  assert step0["val_nme"] == pytest.approx(evaluated.metrics["nme"], rel=1e-5)
  assert step0["val_nme_raw"] == step0["val_nme"]  # EMA starts as a copy
  assert "val_nme_stack0" in step0 and "val_nme_stack3" in step0
  loaded = model_store.load_model(run)
  assert (loaded.model.num_stacks, loaded.model.channels) == (4, 32)


@pytest.mark.slow
def test_custom_scheme_from_scratch_and_by_finetuning_a_98_point_run(data, tmp_path):
  files, scheme = data
  scheme_dir = os.path.dirname(scheme)
  # A 98-point star-jax run to start from.
  config98 = _config(files)
  config98.model.num_stacks, config98.model.num_levels, config98.model.channels = 1, 2, 16
  run98 = str(tmp_path / "run98")
  train_lib.train_and_evaluate(config98, run98)
  # The 29-point scheme from scratch ...
  config = _config(files, dataset=scheme, image_dir=os.path.join(scheme_dir, "images"),
                   tsv_dir=scheme_dir)
  config.model.num_stacks, config.model.num_levels, config.model.channels = 1, 2, 16
  scratch = str(tmp_path / "scratch29")
  train_lib.train_and_evaluate(config, scratch)
  loaded = model_store.load_model(scratch)
  assert loaded.spec == datasets.load_scheme(scheme)
  assert models.describe(loaded.model)["fields"]["num_points"] == 29
  # ... and by fine-tuning the 98-point run, its stem frozen (architecture from the run).
  config = _config(files, dataset=scheme, image_dir=os.path.join(scheme_dir, "images"),
                   tsv_dir=scheme_dir)
  config.init_from = run98
  config.freeze = "stem"
  tuned = str(tmp_path / "tuned29")
  result = train_lib.train_and_evaluate(config, tuned)
  start = jax.tree.map(np.asarray, model_store.load_model(run98).variables["params"])
  final = jax.tree.map(np.asarray, result.state.params)
  chex.assert_trees_all_equal({k: v for k, v in final.items() if k.startswith("stem_")},
                              {k: v for k, v in start.items() if k.startswith("stem_")})
  assert not np.array_equal(final["features0"]["conv1"]["kernel"],
                            start["features0"]["conv1"]["kernel"])
  assert final["heatmap_head0"]["kernel"].shape[-1] == 29
  for run in (scratch, tuned):
    loaded = model_store.load_model(run)
    assert loaded.spec.name == "face29" and loaded.model.channels == 16
    out = eval_lib.evaluate(config, run, None, progress=False, verbose=False)
    assert out.landmarks.shape == (8, 29, 2) and np.isfinite(out.metrics["nme"])
  # The checkpoint carries its scheme: prediction and export need nothing else.
  image = np.zeros((128, 128, 3), np.uint8)
  faces = predict.Predictor(tuned, batch_size=2).predict(image, boxes=[(20, 20, 100, 100)])
  assert faces[0].shape == (29, 2)
  from star_jax.deploy.export import exporter
  from star_jax.deploy.runtime import RuntimePredictor
  onnx_path = exporter.export(tuned, "onnx", str(tmp_path / "face29.onnx")).path
  runtime = RuntimePredictor(onnx_path, batch_size=2)
  assert runtime.spec.name == "face29" and runtime.spec.flip_pairs
  exported = runtime.predict(image, boxes=[(20, 20, 100, 100)])
  np.testing.assert_allclose(exported[0], faces[0], atol=1e-2)


def test_scheme_file_errors_name_the_file(tmp_path):
  path = tmp_path / "bad.json"
  path.write_text('{"name": "x", "num_points": 4, "edges": [{"points": [0, 9]}]}')
  with pytest.raises(UsageError,
                     match=r"bad.json: edges\[0\] point must be an integer from 0 to 3, got 9"):
    datasets.get_spec(str(path))
  path.write_text('{"name": "x", "num_points": 4, "edges": [], "flip_pairs": [[0, 1], [1, 2]]}')
  with pytest.raises(UsageError, match="each point may appear in one pair only"):
    datasets.get_spec(str(path))
  path.write_text("not json")
  with pytest.raises(UsageError, match="not a JSON scheme file"):
    datasets.get_spec(str(path))


# The top-level modules of a 2-stack AAM hourglass whose channels are landmarks: the three
# heads of each stack and the merge convolutions that read them (no merge after the last).
SCHEME_DEPENDENT_2_STACKS = {
    "heatmap_head0", "heatmap_head1", "pointmap_head0", "pointmap_head1", "edgemap_head0",
    "edgemap_head1", "merge_heatmaps0", "merge_pointmaps0", "merge_edgemaps0"}


@pytest.fixture(scope="module")
def ema_and_raw(tmp_path_factory):
  """A 2-stack inference checkpoint whose EMA and raw weights differ everywhere."""
  spec = datasets.get_spec("wflw")
  model = models.StackedHourglass(num_stacks=2, num_levels=1, channels=8,
                                  num_points=spec.num_points,
                                  edge_points=tuple(e.points for e in spec.edges))
  ema = models.init_variables(model, 1, 16)
  raw = models.init_variables(model, 2, 16)
  path = model_store.save_for_inference(str(tmp_path_factory.mktemp("ckpt") / "two"), model,
                                          ema, spec=spec, image_size=16, raw_variables=raw)
  return path, spec, ema, raw


def _moved_edges(spec):
  """`spec` with its first edge given another point: every shape stays, the scheme differs."""
  data = spec.to_dict()
  data["name"] = "wflw_moved_edge"
  first = data["edges"][0]["points"]
  data["edges"][0]["points"] = [p for p in range(spec.num_points) if p not in first][:1] + first[1:]
  return datasets.scheme_from_dict(data)


def _finetune_start(path, spec, weights, seed=7):
  config = base.get_base_config("wflw")
  config.init_from, config.init_weights = path, weights
  config = finetune.resolve_model_config(config)
  model = models.create_model(config.model, spec)
  fresh = models.init_variables(model, seed, 16)
  return fresh, finetune.load_initial_variables(config, model, spec, fresh)


def _flat(tree):
  import flax.traverse_util
  return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree).items()}


def test_init_weights_raw_loads_the_raw_weights_on_the_same_scheme(ema_and_raw):
  path, spec, ema, raw = ema_and_raw
  for weights, expected, other in (("raw", raw, ema), ("ema", ema, raw)):
    _, merged = _finetune_start(path, spec, weights)
    got, want, not_wanted = _flat(merged), _flat(expected), _flat(other)
    assert set(got) == set(want)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"{weights} {key}")
    # Every parameter tensor (BatchNorm scale and bias start equal in both) tells them apart.
    assert any(not np.array_equal(got[k], not_wanted[k]) for k in got if k[0] == "params")


def test_another_scheme_reinitialises_every_scheme_dependent_module_and_loads_the_rest(
    ema_and_raw):
  path, spec, _, raw = ema_and_raw
  moved = _moved_edges(spec)
  assert moved.num_points == spec.num_points and len(moved.edges) == len(spec.edges)
  fresh, merged = _finetune_start(path, moved, "raw")
  got, initial, trained = _flat(merged), _flat(fresh), _flat(raw)
  assert set(got) == set(trained)  # same shapes everywhere: only the scheme differs
  modules = {key[1] for key in got}
  assert SCHEME_DEPENDENT_2_STACKS <= modules
  for key in got:
    expected = initial if key[1] in SCHEME_DEPENDENT_2_STACKS else trained
    np.testing.assert_array_equal(got[key], expected[key], err_msg=str(key))
  # The fresh and trained kernels of the scheme-dependent modules are different draws, so the
  # equality above is not a coincidence.
  for module in SCHEME_DEPENDENT_2_STACKS:
    key = ("params", module, "kernel")
    assert not np.array_equal(initial[key], trained[key]), module
