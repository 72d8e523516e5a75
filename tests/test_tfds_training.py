"""Training and evaluating from TFDS, end to end, for WFLW and for 300W under a dataset root
whose own name contains 'ibug' (the test subsets must come from the paths below it)."""

from __future__ import annotations

import json
import os

import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from configs import base  # noqa: E402
from star_jax.training import eval_lib, logging_utils, train_lib  # noqa: E402
from star_jax.data import sources  # noqa: E402
from star_jax.commands import tfds_builders as tfds_builders_command  # noqa: E402
from tests import tiny_data  # noqa: E402

pytestmark = pytest.mark.slow


def _tiny(config, data_dir):
  config.data.source = "tfds"
  config.data.tfds_data_dir = data_dir
  config.data.image_size = 64
  config.model.num_stacks, config.model.num_levels, config.model.channels = 1, 2, 16
  config.batch_size = config.eval_batch_size = 4
  config.num_train_steps = 3
  config.log_every_steps = 1
  config.eval_every_steps = config.checkpoint_every_steps = 3
  return config


@pytest.fixture(scope="module")
def wflw_tfds(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds_wflw")
  files = tiny_data.wflw(str(root / "manual"), counts=(24, 8, 8))
  data_dir = str(root / "data")
  assert tfds_builders_command.main(["wflw", "--manual_dir", os.path.dirname(files.train_tsv),
                             "--data_dir", data_dir, "--config", "png"]) == 0
  return data_dir


def test_wflw_from_tfds_trains_and_evaluates_every_split(wflw_tfds, tmp_path):
  config = _tiny(base.get_base_config("wflw"), wflw_tfds)
  source = sources.source_for(config)
  # The manual dir had val.tsv: the builder wrote a `val` split.
  assert [source.num_examples(s) for s in ("train", "val", "test")] == [24, 8, 8]
  workdir = str(tmp_path / "run")
  result = train_lib.train_and_evaluate(config, workdir)
  assert result.step == 3 and not result.stopped
  val = [r for r in logging_utils.read_metrics(workdir) if "val_nme" in r]
  assert [r["step"] for r in val] == [0, 3] and val[-1]["val_images"] == 8
  for split, count in (("val", 8), ("test", 8)):
    out = eval_lib.evaluate(config, workdir, str(tmp_path / split), split=split,
                            progress=False, verbose=False)
    assert out.metrics["num_images"] == count
    assert all(p.startswith(f"{split}/") for p in out.image_paths)
  # The validation NME eval.py reports for the best model is the one training logged for it.
  best = json.load(open(tmp_path / "val" / "metrics.json"))
  logged = {r["step"]: r["val_nme"] for r in val}
  assert best["nme"] == pytest.approx(min(logged.values()), rel=1e-4)


def test_300w_from_tfds_carves_validation_and_reports_subsets(tmp_path):
  manual = str(tmp_path / "ibug_300W_large_face_landmark_dataset")
  emb = tiny_data.wflw(str(tmp_path / "emb"), counts=(24, 8, 9))
  tiny_data.w300(manual, emb)
  data_dir = str(tmp_path / "data")
  assert tfds_builders_command.main(["300w", "--manual_dir", manual, "--data_dir", data_dir]) == 0
  config = _tiny(base.get_base_config("300w"), data_dir)
  config.data.val_fraction = 0.25
  source = sources.source_for(config)
  # No val.tsv: 25 % of the 24 training rows are carved, by the rule of TSV sources.
  assert [source.num_examples(s) for s in ("train", "val", "test")] == [18, 6, 9]
  carved = sorted(int(r["index"]) for r in source.records("val").as_numpy_iterator())
  assert carved == sources.carved_val_rows(24, 0.25).tolist()
  workdir = str(tmp_path / "run")
  train_lib.train_and_evaluate(config, workdir)
  out = eval_lib.evaluate(config, workdir, str(tmp_path / "eval"), progress=False,
                          verbose=False)
  subsets = out.metrics["subsets"]
  # Test images cycle through lfpw/testset, ibug, helen/testset: 3 each.
  assert {k: v["count"] for k, v in subsets.items()} == {
      "full": 9, "common": 6, "challenge": 3}
