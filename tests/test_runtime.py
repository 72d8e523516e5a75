"""The JAX-free runtime: no JAX/TensorFlow import, and the JAX predictor's results on images.

The model has one stack (no CoordConv boundary switch, see `star_jax.deploy.export.parity`), so
ONNX Runtime and LiteRT must reproduce jitted JAX float32 to rounding; the images are the
fixture photos-like drawings of tests/fixtures/official_wflw_data, with given boxes and with
the detector.
"""

from __future__ import annotations

from tests.limits import LAST_GUARD_S

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("ai_edge_litert")

from star_jax.deploy import predict
from star_jax.commands import predict as predict_command
from star_jax.training.model_store import load_model
from star_jax.deploy.export import exporter
from star_jax.deploy.image_io import load_image
from star_jax.deploy.runtime import RuntimePredictor, contract
from tests.export_checkpoints import save_star_jax_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = os.path.join(ROOT, "tests", "fixtures", "official_wflw_data", "images")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(LoadedModel, {format: exported path}) of a one-stack star-jax checkpoint."""
  root = tmp_path_factory.mktemp("runtime")
  loaded = load_model(save_star_jax_checkpoint(str(root / "ckpt"), num_stacks=1, seed=5))
  paths = {"onnx": exporter.export(loaded, "onnx", str(root / "m.onnx")).path,
           "tflite": exporter.export(loaded, "tflite", str(root / "m.tflite"), batch=2).path}
  return loaded, paths


@pytest.fixture(scope="module")
def images():
  return [load_image(os.path.join(IMAGES, n)) for n in sorted(os.listdir(IMAGES))]


def _boxes(image):
  h, w = image.shape[:2]
  return [(0.2 * w, 0.25 * h, 0.8 * w, 0.85 * h), (0.3 * w, 0.3 * h, 0.6 * w, 0.6 * h)]


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_runtime_predictor_equals_jax_predictor(exported, images, fmt):
  loaded, paths = exported
  jax_predictor = predict.Predictor(loaded, batch_size=3)
  runtime = RuntimePredictor(paths[fmt], batch_size=3)
  assert runtime.num_points == jax_predictor.num_points and runtime.spec == jax_predictor.spec
  boxes = [_boxes(image) for image in images]
  for kwargs in ({"boxes": boxes}, {"boxes": boxes, "box_rule": "detector"}, {}):
    expected = jax_predictor.predict_faces(images, **kwargs)
    got = runtime.predict_faces(images, **kwargs)
    assert [len(f) for f in got] == [len(f) for f in expected]
    assert sum(len(f) for f in got) > 0
    for faces_got, faces_expected in zip(got, expected):
      for a, b in zip(faces_got, faces_expected):
        assert a.box == b.box and a.box_source == b.box_source
        assert a.scale == pytest.approx(b.scale) and np.allclose(a.center, b.center)
        np.testing.assert_allclose(a.landmarks, b.landmarks, atol=2e-3)
        assert a.to_json(68, runtime.spec)["box"] == b.to_json(68, jax_predictor.spec)["box"]


def test_runtime_imports_neither_jax_nor_tensorflow(exported, images):
  """A fresh interpreter: import the runtime, predict, then inspect sys.modules."""
  _, paths = exported
  image = os.path.join(IMAGES, sorted(os.listdir(IMAGES))[0])
  script = textwrap.dedent(f"""
      import json, sys
      import star_jax.data.transforms, star_jax.deploy.detection, star_jax.deploy.tracking
      from star_jax.deploy.runtime import RuntimePredictor
      # A path and a grey PIL image: the input handling of star_jax.deploy.predict, without JAX.
      from PIL import Image
      grey = Image.open({image!r}).convert("L")
      faces = [RuntimePredictor(path).predict(picture, boxes=[(20, 20, 200, 200)])
               for path in {list(paths.values())!r} for picture in ({image!r}, grey)]
      banned = [m for m in sys.modules if m.split('.')[0] in
                ('jax', 'jaxlib', 'flax', 'tensorflow', 'tf_keras', 'keras', 'torch')]
      print(json.dumps({{"banned": banned, "points": [len(f[0]) for f in faces]}}))
      """)
  run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                       timeout=LAST_GUARD_S)
  assert run.returncode == 0, run.stderr
  result = json.loads(run.stdout.strip().splitlines()[-1])
  assert result == {"banned": [], "points": [98, 98, 98, 98]}


def test_predict_cli_runs_an_exported_model(exported, tmp_path):
  _, paths = exported
  out = tmp_path / "out"
  image = os.path.join(IMAGES, sorted(os.listdir(IMAGES))[0])
  code = predict_command.main(["--model", paths["onnx"], image, "--box", "10,10,200,220",
                       "--out", str(out)])
  assert code == 0
  record = json.loads((out / (os.path.splitext(os.path.basename(image))[0] + ".json")
                       ).read_text())
  assert len(record["faces"]) == 1 and len(record["faces"][0]["landmarks"]) == 98


def test_runtime_errors_name_the_file(tmp_path):
  from star_jax.errors import CheckpointError
  from star_jax.deploy.runtime import load_model as load_exported
  lonely = tmp_path / "lonely.onnx"
  lonely.write_bytes(b"not a model")
  with pytest.raises(CheckpointError, match="lonely.onnx.json"):
    load_exported(str(lonely))
  (tmp_path / "lonely.onnx.json").write_text(json.dumps({
      "sidecar_version": contract.SIDECAR_VERSION, "format": "onnx", "num_points": 98,
      "dataset": "wflw", "input": {"shape": [None, 256, 256, 3]},
      "outputs": [{"name": "landmarks"}]}))
  with pytest.raises(CheckpointError, match="lonely.onnx"):
    load_exported(str(lonely))


def test_runtime_tracks_video_frames_like_the_jax_predictor(exported, images):
  """The exported model inside the predictor's tracker: the same faces, frame by frame."""
  loaded, paths = exported
  frames = [images[0]] * 3 + [np.ascontiguousarray(images[0][:, ::-1])] * 2
  jax_faces = list(predict.Predictor(loaded, batch_size=2, detector="lbp").track(frames))
  runtime_faces = list(RuntimePredictor(paths["onnx"], batch_size=2, detector="lbp").track(frames))
  assert [len(f) for f in runtime_faces] == [len(f) for f in jax_faces]
  for got, want in zip(runtime_faces, jax_faces):
    for a, b in zip(got, want):
      np.testing.assert_allclose(a.landmarks, b.landmarks, atol=5e-3)
