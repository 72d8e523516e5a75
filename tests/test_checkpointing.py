"""Training checkpoints (keep-N, atomic steps, corrupt fallback) and inference checkpoints."""

import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from star_jax.training import checkpointing, model_store
from star_jax.core import schemes as datasets
from star_jax import models as models_lib
from star_jax.errors import CheckpointError
from star_jax.models import create_model


def _tree(seed):
  rng = np.random.default_rng(seed)
  return {"params": {"w": rng.normal(size=(4, 3)).astype(np.float32),
                     "b": rng.normal(size=(3,)).astype(np.float32)},
          "opt": {"count": np.asarray(seed, np.int32), "empty": {}},
          "step": np.asarray(seed, np.int32)}


def test_save_restore_keep_n(tmp_path):
  ckpts = checkpointing.TrainCheckpoints(str(tmp_path), keep=2)
  for step in (1, 2, 3):
    ckpts.save(step, _tree(step), {"note": f"s{step}"})
  ckpts.wait()
  assert ckpts.all_steps() == [2, 3]
  state, meta = ckpts.restore_latest(_tree(0))
  chex.assert_trees_all_equal(state, _tree(3))
  assert meta["step"] == 3 and meta["note"] == "s3"
  # Without a target the state comes back as nested dicts of arrays.
  state, _ = ckpts.restore_step(2)
  np.testing.assert_array_equal(state["params"]["w"], _tree(2)["params"]["w"])
  ckpts.close()


# Orbax's reader leaves an asyncio callback behind when a read fails; harmless.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_latest_falls_back_with_warning(tmp_path, caplog):
  ckpts = checkpointing.TrainCheckpoints(str(tmp_path), keep=3)
  ckpts.save(1, _tree(1), {})
  ckpts.save(2, _tree(2), {})
  ckpts.close()
  # Corrupt every array data file of the latest step (bytes flipped, sizes unchanged).
  state_dir = tmp_path / "checkpoints" / "2" / "state"
  data_files = [p for p in state_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
  assert data_files
  for path in data_files:
    raw = bytearray(path.read_bytes())
    for i in range(len(raw) // 2, len(raw)):
      raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
  ckpts = checkpointing.TrainCheckpoints(str(tmp_path), keep=3)
  with caplog.at_level("WARNING"):
    state, meta = ckpts.restore_latest(_tree(0))
  assert meta["step"] == 1
  chex.assert_trees_all_equal(state, _tree(1))
  assert any("cannot be restored" in r.getMessage() for r in caplog.records)
  # The bad step is moved aside so that step 2 can be written again.
  assert ckpts.all_steps() == [1]
  assert len(os.listdir(tmp_path / "corrupt_checkpoints")) == 1
  ckpts.save(2, _tree(5), {})
  ckpts.wait()
  chex.assert_trees_all_equal(ckpts.restore_latest(_tree(0))[0], _tree(5))
  ckpts.close()


# Orbax's reader leaves an asyncio callback behind when a read fails; harmless.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_truncated_latest_and_unfinished_tmp_dir(tmp_path):
  ckpts = checkpointing.TrainCheckpoints(str(tmp_path), keep=3)
  ckpts.save(1, _tree(1), {})
  ckpts.save(2, _tree(2), {})
  ckpts.close()
  for path in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):
    if path.is_file() and path.parent.name == "d":
      path.write_bytes(b"")
  # What a save killed before its rename leaves behind: ignored (and cleaned up).
  tmp = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1234567"
  (tmp / "state").mkdir(parents=True)
  ckpts = checkpointing.TrainCheckpoints(str(tmp_path), keep=3)
  state, meta = ckpts.restore_latest(_tree(0))
  assert meta["step"] == 1
  chex.assert_trees_all_equal(state, _tree(1))
  assert 3 not in ckpts.all_steps()
  ckpts.close()


def test_empty_workdir_restores_nothing(tmp_path):
  ckpts = checkpointing.TrainCheckpoints(str(tmp_path), keep=3)
  assert ckpts.restore_latest(_tree(0)) is None
  ckpts.close()


def _tiny_model_and_variables():
  config = base.get_base_config("wflw")
  config.model.num_stacks = 1
  config.model.num_levels = 1
  config.model.channels = 8
  config.data.image_size = 32
  model = create_model(config.model, datasets.get_spec("wflw"))
  # Random values of the right structure (no initialiser compilation needed).
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)
  variables["batch_stats"] = jax.tree.map(np.abs, variables["batch_stats"])
  return config, model, variables


def test_inference_checkpoint_roundtrip(tmp_path):
  config, model, variables = _tiny_model_and_variables()
  raw = jax.tree.map(lambda x: x + 1, variables)
  wflw = datasets.get_spec("wflw")
  out = model_store.save_for_inference(str(tmp_path / "inf"), model, variables, spec=wflw,
                                         image_size=32, config=config, raw_variables=raw,
                                         extra={"step": 7})
  loaded = model_store.load_model(out)
  assert loaded.model == model and loaded.spec == wflw and loaded.image_size == 32
  chex.assert_trees_all_equal(loaded.variables, variables)
  assert loaded.config.model.channels == 8 and loaded.extra == {"step": 7}
  assert tuple(loaded.config.optim.milestones) == tuple(config.optim.milestones)
  chex.assert_trees_all_equal(model_store.load_model(out, weights="raw").variables, raw)
  # Overwriting replaces the directory.
  model_store.save_for_inference(out, model, raw, spec=wflw, image_size=32)
  chex.assert_trees_all_equal(model_store.load_model(out).variables, raw)
  # The loaded model runs.
  out_lm = jax.jit(loaded.model.apply)(loaded.variables, jnp.zeros((1, 32, 32, 3))).landmarks[-1]
  chex.assert_shape(out_lm, (1, 98, 2))


def test_best_checkpoints_keep_the_lowest_nme_and_a_workdir_resolves_to_it(tmp_path):
  config, model, variables = _tiny_model_and_variables()
  wflw = datasets.get_spec("wflw")
  best = model_store.BestCheckpoints(str(tmp_path))
  for step, nme in ((1, 0.5), (2, 0.3)):
    weights = jax.tree.map(lambda x, s=step: x + s, variables)
    best.save(step, nme, model, weights, spec=wflw, image_size=32, config=config)
  best.close()
  assert sorted(os.listdir(tmp_path / "best")) == ["2"]
  meta = model_store.read_best_meta(str(tmp_path))
  assert meta["step"] == 2 and meta["val_nme"] == 0.3
  loaded = model_store.load_model(str(tmp_path))
  chex.assert_trees_all_equal(loaded.variables, jax.tree.map(lambda x: x + 2, variables))


def test_legacy_inference_directory_still_loads(tmp_path):
  """Directories written before the `model` item (model.json + variables/ + config.json)."""
  import json
  import orbax.checkpoint as ocp
  config, model, variables = _tiny_model_and_variables()
  legacy = tmp_path / "legacy"
  legacy.mkdir()
  fields = dict(models_lib.describe(model)["fields"], bn_axis_name=None)  # as those files had
  (legacy / "model.json").write_text(json.dumps(
      {"class": "star_jax.models.hourglass.StackedHourglass", "fields": fields}))
  (legacy / "config.json").write_text(checkpointing.config_to_json(config))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(str(legacy / "variables"), variables)
  checkpointer.wait_until_finished()
  checkpointer.close()
  loaded = model_store.load_model(str(legacy))
  assert loaded.model == model and loaded.image_size == 32 and loaded.spec.name == "wflw"
  chex.assert_trees_all_equal(loaded.variables, variables)


@pytest.mark.parametrize("description, message", [
    ({"class": "os.system", "fields": {"command": "touch /tmp/star_jax_pwned"}},
     "not a star-jax model"),
    ({"class": "builtins.eval", "fields": {}}, "not a star-jax model"),
    ({"name": "subprocess", "fields": {}}, "not registered"),
    ({"name": "stacked_hourglass", "fields": {"__class__": 1}}, "unknown field"),
    ({"name": "stacked_hourglass", "fields": {"channels": "256; rm -rf /"}},
     "must be an integer from 1 to 4096"),
    ({"name": "stacked_hourglass", "fields": {"dtype": "object"}}, "one of float32"),
    ({"name": "stacked_hourglass", "fields": {"edge_points": [[0, "x"]]}}, "lists of integers"),
    ([1, 2, 3], "not a JSON object"),
])
def test_tampered_model_description_is_data_not_code(tmp_path, description, message):
  import json
  marker = "/tmp/star_jax_pwned"
  if os.path.exists(marker):
    os.remove(marker)
  config, model, variables = _tiny_model_and_variables()
  out = model_store.save_for_inference(str(tmp_path / "inf"), model, variables,
                                         spec=datasets.get_spec("wflw"), image_size=32)
  # Rewrite the stored model record with the tampered description.
  record_file = next(p for p in (tmp_path / "inf" / "model").iterdir() if p.is_file())
  record = json.loads(record_file.read_text())
  record["model"] = description
  record_file.write_text(json.dumps(record))
  with pytest.raises(CheckpointError, match=message) as info:
    model_store.load_model(out)
  assert "\n" not in str(info.value)
  assert not os.path.exists(marker)


def test_load_errors_name_the_path(tmp_path):
  with pytest.raises(CheckpointError, match="does-not-exist"):
    model_store.load_model(str(tmp_path / "does-not-exist"))
  with pytest.raises(CheckpointError, match="not a star-jax checkpoint"):
    model_store.load_model(str(tmp_path))
  text = tmp_path / "notes.txt"
  text.write_text("hello")
  with pytest.raises(CheckpointError, match="not an official STAR checkpoint"):
    model_store.load_model(str(text))


OFFICIAL_PKL = os.path.join(os.path.dirname(__file__), "fixtures", "official_wflw_small",
                            "checkpoint.pkl")


def test_official_pkl_and_its_conversion_load_the_same_weights(tmp_path):
  from star_jax.foreign import official
  loaded = model_store.load_model(OFFICIAL_PKL, weights="ema")
  ref_model, ref_variables = official.load_official_checkpoint(OFFICIAL_PKL, ema=True)
  assert loaded.model == ref_model and loaded.weights == "net_ema"
  chex.assert_trees_all_equal(loaded.variables, ref_variables)
  assert loaded.spec.name == "wflw" and loaded.config is None
  # A converted directory (what `python -m star_jax.convert --out` writes) reads back equal.
  out = model_store.save_for_inference(str(tmp_path / "converted"), loaded.model,
                                         loaded.variables, spec=loaded.spec, image_size=256)
  again = model_store.load_model(out)
  assert again.model == loaded.model
  chex.assert_trees_all_equal(again.variables, jax.tree.map(np.asarray, loaded.variables))


def test_a_best_step_written_by_a_killed_run_is_kept_or_replaced_never_an_error(tmp_path):
  # A run killed after best/2 and before checkpoints/2 repeats step 2 on resume: the same
  # model (same NME) is kept as it is; one that differs, or a damaged one, is written anew.
  config, model, variables = _tiny_model_and_variables()
  wflw = datasets.get_spec("wflw")
  first = model_store.BestCheckpoints(str(tmp_path))
  first.save(2, 0.3, model, variables, spec=wflw, image_size=32, config=config)
  first.close()   # the killed run
  written = os.path.getmtime(tmp_path / "best" / "2" / model_store.MODEL_ITEM)

  again = model_store.BestCheckpoints(str(tmp_path))
  again.save(2, 0.3, model, variables, spec=wflw, image_size=32, config=config)
  assert os.path.getmtime(tmp_path / "best" / "2" / model_store.MODEL_ITEM) == written
  other = jax.tree.map(lambda x: x + 1, variables)
  again.save(2, 0.25, model, other, spec=wflw, image_size=32, config=config)
  again.close()
  assert model_store.read_best_meta(str(tmp_path))["val_nme"] == 0.25
  chex.assert_trees_all_equal(model_store.load_model(str(tmp_path)).variables, other)

  # A damaged step (its model description gone) is replaced too.
  shutil.rmtree(tmp_path / "best" / "2" / model_store.MODEL_ITEM)
  third = model_store.BestCheckpoints(str(tmp_path))
  third.save(2, 0.25, model, variables, spec=wflw, image_size=32, config=config)
  third.close()
  chex.assert_trees_all_equal(model_store.load_model(str(tmp_path)).variables, variables)
