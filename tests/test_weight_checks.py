"""Loaded weights are held to what their checkpoint says they are (`models.check_variables`).

A star-jax checkpoint whose variables are missing, surplus, of another shape or dtype (int32,
float16), or not finite, and a model description with absurd sizes, are each one
CheckpointError naming the variable or field, before the network runs; the command lines turn
it into one `error:` line with exit 1. Predictions written as JSON are always strict JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import flax.traverse_util
import numpy as np
import pytest

from star_jax.training import model_store
from star_jax.core import json_output
from star_jax import models
from star_jax.training.model_store import load_model
from star_jax.errors import CheckpointError
from tests.export_checkpoints import save_star_jax_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = os.path.join(ROOT, "tests", "fixtures", "official_wflw_data", "images")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
  """(path, LoadedModel) of a one-stack demo checkpoint with random weights."""
  path = save_star_jax_checkpoint(str(tmp_path_factory.mktemp("weights") / "good"), num_stacks=1)
  return path, load_model(path)


def _tampered(tmp_path, loaded, change) -> str:
  flat = flax.traverse_util.flatten_dict(loaded.variables)
  flat = {k: np.array(v) for k, v in flat.items()}
  change(flat)
  return model_store.save_for_inference(
      str(tmp_path / "tampered"), loaded.model, flax.traverse_util.unflatten_dict(flat),
      spec=loaded.spec, image_size=loaded.image_size)


KERNEL = ("params", "stem_conv", "kernel")
BIAS = ("params", "stem_conv", "bias")


def _set(key, fn):
  def change(flat):
    flat[key] = fn(flat[key])
  return change


def _nan(a):
  a = a.copy()
  a.flat[3] = np.nan
  return a


def _inf(a):
  a = a.copy()
  a.flat[0] = -np.inf
  return a


@pytest.mark.parametrize("change, fragment", [
    (lambda flat: flat.pop(KERNEL), "variable params/stem_conv/kernel is missing"),
    (lambda flat: flat.update({("params", "surplus", "kernel"): np.zeros(3, np.float32)}),
     "variable params/surplus/kernel is not part of the described model"),
    (_set(BIAS, lambda a: a[:-1]), "variable params/stem_conv/bias has shape"),
    (_set(KERNEL, lambda a: a.astype(np.int32)),
     "variable params/stem_conv/kernel is int32; the model needs float32"),
    (_set(KERNEL, lambda a: a.astype(np.float16)),
     "variable params/stem_conv/kernel is float16; the model needs float32"),
    (_set(KERNEL, _nan), "variable params/stem_conv/kernel holds 1 non-finite value(s)"),
    (_set(("batch_stats", "stem_bn", "var"), _inf),
     "variable batch_stats/stem_bn/var holds 1 non-finite value(s)"),
], ids=["missing", "extra", "shape", "int32", "float16", "nan", "inf"])
def test_weights_that_do_not_fit_the_description_are_refused(good, tmp_path, change, fragment):
  _, loaded = good
  path = _tampered(tmp_path, loaded, change)
  with pytest.raises(CheckpointError) as raised:
    load_model(path)
  message = str(raised.value)
  assert fragment in message and message.startswith(path) and "\n" not in message


def test_nonfinite_weights_load_when_asked(good, tmp_path):
  _, loaded = good
  path = _tampered(tmp_path, loaded, _set(KERNEL, _nan))
  again = load_model(path, check_finite=False)
  assert np.isnan(again.variables["params"]["stem_conv"]["kernel"]).sum() == 1


def _legacy_dir(tmp_path, good_path, fields) -> str:
  """A checkpoint of the earlier layout (model.json + variables/) whose description says
  `fields` instead of the truth."""
  directory = tmp_path / "legacy"
  shutil.copytree(os.path.join(good_path, model_store.VARIABLES_ITEM),
                  directory / model_store.VARIABLES_ITEM)
  description = models.describe(load_model(good_path).model)
  description["fields"].update(fields)
  (directory / "model.json").write_text(json.dumps(description))
  return str(directory)


@pytest.mark.parametrize("fields, fragment", [
    ({"channels": 10 ** 6}, "field 'channels' of model 'stacked_hourglass' must be an integer "
                            "from 1 to 4096, got 1000000"),
    ({"num_stacks": 1000}, "field 'num_stacks' of model 'stacked_hourglass' must be an integer "
                           "from 1 to 16, got 1000"),
    ({"num_stacks": 0}, "field 'num_stacks'"),
    ({"edge_points": [[0, 1], [97, 98]]}, "edge_points name landmark 98, outside the model's 98"),
    ({"channels": 64}, "has shape (32,); the model description needs (64,)"),
], ids=["channels_1e6", "stacks_1000", "stacks_0", "edge_outside", "channels_other"])
def test_descriptions_with_absurd_or_wrong_sizes_are_refused(good, tmp_path, fields, fragment):
  path = _legacy_dir(tmp_path, good[0], fields)
  with pytest.raises(CheckpointError) as raised:
    load_model(path)
  assert str(raised.value).startswith(path + os.sep + "model.json: ") or fragment.startswith("has")
  assert fragment in str(raised.value) and "\n" not in str(raised.value)


def test_the_true_description_loads(good, tmp_path):
  """The legacy copy with the description unchanged loads the same weights (so the refusals
  above come from the changed fields)."""
  path = _legacy_dir(tmp_path, good[0], {})
  loaded = load_model(path)
  np.testing.assert_array_equal(loaded.variables["params"]["stem_conv"]["kernel"],
                                good[1].variables["params"]["stem_conv"]["kernel"])


def _strict_json(text: str):
  def refuse(constant):
    raise ValueError(f"not JSON: {constant}")
  return json.loads(text, parse_constant=refuse)


def test_predictions_of_nonfinite_weights_are_valid_json(good, tmp_path, capsys):
  from star_jax.deploy import predict
  _, loaded = good
  path = _tampered(tmp_path, loaded, _set(("params", "heatmap_head0", "bias"),
                                          lambda a: np.full_like(a, np.nan)))
  predictor = predict.Predictor(load_model(path, check_finite=False), batch_size=1)
  image = os.path.join(IMAGES, sorted(os.listdir(IMAGES))[0])
  reports = predict.predict_files(predictor, [image], str(tmp_path / "out"),
                                  boxes=[predict.Box(10, 10, 90, 90)], progress=False,
                                  write_png=False)
  with open(reports[0].json_path) as f:
    record = _strict_json(f.read())
  landmarks = record["faces"][0]["landmarks"]
  assert len(landmarks) == 98 and landmarks[0] == [None, None]
  err = capsys.readouterr().err
  assert f"warning: {reports[0].json_path}: 196 non-finite value(s)" in err
  assert "written as null (first: faces[0].landmarks[0][0])" in err


def test_metrics_json_writer_turns_nonfinite_numbers_into_null():
  warnings = []
  text = json_output.dumps({"nme": np.float32(np.nan), "auc": [0.5, float("inf")], "n": 3},
                           where="metrics.json", warn=warnings.append)
  assert _strict_json(text) == {"nme": None, "auc": [0.5, None], "n": 3}
  assert warnings == ["warning: metrics.json: 2 non-finite value(s) (NaN or infinity) written "
                      "as null (first: nme)"]


@pytest.mark.slow
def test_predict_cli_refuses_bad_weights_in_one_line(good, tmp_path):
  _, loaded = good
  image = os.path.join(IMAGES, sorted(os.listdir(IMAGES))[0])
  nan_path = _tampered(tmp_path, loaded, _set(KERNEL, _nan))
  huge_path = _legacy_dir(tmp_path, good[0], {"num_stacks": 1000})
  for path, fragment in ((nan_path, "params/stem_conv/kernel holds 1 non-finite"),
                         (huge_path, "field 'num_stacks'")):
    run = subprocess.run([sys.executable, "-m", "star_jax.predict", "--checkpoint", path, image,
                          "--out", str(tmp_path / "out"), "--box", "10,10,90,90"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert run.returncode == 1, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in run.stderr
