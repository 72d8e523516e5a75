"""A model says what it knows: checkpoints and export sidecars record the dataset a model was
trained on, and a model trained only on the embedded synthetic faces says so in one warning line
when it runs on photos, videos or a camera (the JAX predictor, the runtime, the web page)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from configs import demo, wflw as wflw_config
from star_jax.training import model_store
from star_jax.core import schemes as datasets
from star_jax import models
from star_jax.deploy import web
from star_jax.deploy.runtime import contract
from tests.export_checkpoints import save_star_jax_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFICIAL = os.path.join(ROOT, "tests", "fixtures", "official_wflw_small", "checkpoint.pkl")
WARNING_START = "warning: "
SYNTHETIC_WORDS = "trained only on the embedded synthetic faces"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  """An inference checkpoint of the demo run's architecture (config: the embedded data)."""
  return save_star_jax_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "demo"))


@pytest.fixture(scope="module")
def synthetic_onnx(synthetic, tmp_path_factory):
  pytest.importorskip("onnx")
  from star_jax.deploy.export import exporter
  out = str(tmp_path_factory.mktemp("onnx") / "demo.onnx")
  exporter.export(synthetic, "onnx", out)
  return out


def _model_item(path: str) -> dict:
  with open(os.path.join(path, model_store.MODEL_ITEM, "metadata")) as f:
    return json.load(f)


def _warnings(text: str) -> list[str]:
  return [line for line in text.splitlines() if SYNTHETIC_WORDS in line]


def test_runs_record_what_they_train_on(synthetic):
  assert _model_item(synthetic)["model"]["trained_on"] == "embedded"
  assert model_store.load_model(synthetic).trained_on == "embedded"
  assert models.training_data(demo.get_config()) == "embedded"
  assert models.training_data(wflw_config.get_config()) == "wflw"
  config = wflw_config.get_config()
  config.dataset = "300w"
  assert models.training_data(config) == "300w"
  assert model_store.load_model(OFFICIAL).trained_on is None     # a plain .pkl: unknown


def test_checkpoints_without_the_field_still_load(synthetic, tmp_path):
  """Written before `trained_on` existed: the run's config tells, and without one it is
  unknown (no warning)."""
  import shutil
  old = str(tmp_path / "old")
  shutil.copytree(synthetic, old)
  record = _model_item(old)
  del record["model"]["trained_on"]
  with open(os.path.join(old, model_store.MODEL_ITEM, "metadata"), "w") as f:
    json.dump(record, f)
  assert model_store.load_model(old).trained_on == "embedded"    # from its config
  record["config"] = None
  with open(os.path.join(old, model_store.MODEL_ITEM, "metadata"), "w") as f:
    json.dump(record, f)
  loaded = model_store.load_model(old)
  assert loaded.trained_on is None and loaded.num_points == 98


def test_synthetic_model_warns_once_in_the_predictor(synthetic, capsys):
  from star_jax.deploy.inference import Predictor
  predictor = Predictor(synthetic, batch_size=1)
  image = np.zeros((96, 96, 3), np.uint8)
  predictor.predict(image, [(20, 20, 70, 70)])
  predictor.predict(image, [(20, 20, 70, 70)])
  lines = _warnings(capsys.readouterr().err)
  assert len(lines) == 1 and lines[0].startswith(WARNING_START) and synthetic in lines[0]


def test_synthetic_model_warns_in_the_runtime_and_predict(synthetic_onnx, capsys, tmp_path):
  with open(contract.sidecar_path(synthetic_onnx)) as f:
    assert json.load(f)["trained_on"] == "embedded"
  from star_jax.commands import predict as predict_command
  from star_jax.deploy.runtime import RuntimePredictor
  predictor = RuntimePredictor(synthetic_onnx, batch_size=1)
  predictor.predict(np.zeros((96, 96, 3), np.uint8), [(20, 20, 70, 70)])
  assert len(_warnings(capsys.readouterr().err)) == 1

  import cv2
  image = tmp_path / "grey.png"
  cv2.imwrite(str(image), np.full((96, 96, 3), 128, np.uint8))
  assert predict_command.main(["--model", synthetic_onnx, str(image), "--out",
                               str(tmp_path / "out"), "--box", "20,20,70,70"]) == 0
  assert len(_warnings(capsys.readouterr().err)) == 1


def test_sidecars_without_the_field_and_real_data_models_do_not_warn(synthetic_onnx, tmp_path):
  with open(contract.sidecar_path(synthetic_onnx)) as f:
    record = json.load(f)
  del record["trained_on"]
  old = tmp_path / "old.onnx"
  old.write_bytes(open(synthetic_onnx, "rb").read())
  with open(contract.sidecar_path(str(old)), "w") as f:
    json.dump(record, f)
  assert contract.read_sidecar(str(old)).trained_on is None
  assert datasets.synthetic_warning(None, "m.onnx") is None
  assert datasets.synthetic_warning("wflw", "m.onnx") is None
  assert datasets.synthetic_warning("embedded", "m.onnx").startswith(WARNING_START)


def fake_page(root):
  """A page folder with the files `check_page` looks for (the page is not run here)."""
  (root / "index.html").write_text("<!doctype html>")
  runtime = root / web.RUNTIME_DIR
  runtime.mkdir(parents=True)
  for name in web.RUNTIME_FILES:
    (runtime / name).write_bytes(b"")


def test_synthetic_model_warns_on_the_web_page(synthetic_onnx, tmp_path, capsys):
  fake_page(tmp_path)
  server = web.PageServer(synthetic_onnx, root=str(tmp_path))
  try:
    lines = _warnings(capsys.readouterr().err)
    assert len(lines) == 1 and synthetic_onnx in lines[0]
  finally:
    server.close()


def test_scheme_and_training_data_are_separate_facts(synthetic_onnx):
  """The demo model predicts the WFLW scheme but learnt synthetic faces: both are recorded."""
  info = contract.read_sidecar(synthetic_onnx)
  assert info.dataset == datasets.get_spec("wflw").name and info.trained_on == "embedded"
