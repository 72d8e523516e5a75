"""Training checkpoints (keep-N, atomic steps, corrupt fallback) and inference checkpoints."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from star_jax import checkpointing
from star_jax import datasets
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
  out = checkpointing.save_for_inference(str(tmp_path / "inf"), model, variables, config,
                                         raw_variables=raw, extra={"step": 7})
  loaded_model, loaded_vars, loaded_config = checkpointing.load_for_inference(out)
  assert loaded_model == model
  chex.assert_trees_all_equal(loaded_vars, variables)
  assert loaded_config.model.channels == 8
  assert loaded_config.optim.milestones == config.optim.milestones
  _, raw_loaded, _ = checkpointing.load_for_inference(out, ema=False)
  chex.assert_trees_all_equal(raw_loaded, raw)
  # Overwriting replaces the directory; a workdir with best/ resolves to it.
  best = checkpointing.save_for_inference(str(tmp_path / "best"), model, raw, config,
                                          extra={"step": 9, "val_nme": 0.5})
  assert best.endswith("best")
  _, vars_from_workdir, _ = checkpointing.load_for_inference(str(tmp_path))
  chex.assert_trees_all_equal(vars_from_workdir, raw)
  assert checkpointing.read_best_meta(str(tmp_path))["step"] == 9
  # The loaded model runs.
  out_lm = jax.jit(loaded_model.apply)(loaded_vars, jnp.zeros((1, 32, 32, 3))).landmarks[-1]
  chex.assert_shape(out_lm, (1, 98, 2))


def test_load_errors_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="does-not-exist"):
    checkpointing.load_for_inference(str(tmp_path / "does-not-exist"))
  with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
    checkpointing.load_for_inference(str(tmp_path))


OFFICIAL_PKL = os.path.join(os.path.dirname(__file__), "fixtures", "official_wflw_small",
                            "checkpoint.pkl")


@pytest.mark.skipif(not os.path.exists(OFFICIAL_PKL), reason="official fixture not copied")
def test_official_pkl_and_its_conversion_load_the_same_weights(tmp_path):
  from star_jax import official
  for ema, key in ((True, "net_ema"),):  # ema=False ("net") is the same code path
    model, variables, config = checkpointing.load_for_inference(OFFICIAL_PKL, ema=ema)
    ref_model, ref_variables = official.load_official_checkpoint(OFFICIAL_PKL, ema=ema)
    assert model == ref_model, key
    chex.assert_trees_all_equal(variables, ref_variables)
    assert config.dataset == "wflw" and config.model.channels == model.channels
  # A converted directory (what `python -m star_jax.convert --out` writes) reads back equal.
  out = checkpointing.save_for_inference(str(tmp_path / "converted"), model, variables, config)
  model2, variables2, config2 = checkpointing.load_for_inference(out)
  assert model2 == model
  chex.assert_trees_all_equal(variables2, jax.tree.map(np.asarray, variables))
