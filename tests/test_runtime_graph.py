"""An exported model's sidecar is held to its own graph when the model is opened.

The sidecar's input size, batch and number of points must be the graph's (ONNX Runtime's input
and output shapes, the LiteRT signature's tensor details). A sidecar that disagrees, or claims
an absurd value, is one line naming the sidecar, the field and both values (CheckpointError,
exit 1), through `python -m star_jax.predict --model` and the Python runtime alike, before any
crop is allocated. The models are small exports (the demo architecture with one stack, 64 px,
98 points): ONNX with a symbolic batch and with batch 2, TFLite with batch 2.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("ai_edge_litert")

from star_jax.core import schemes as datasets
from star_jax.commands import predict
from star_jax.training.model_store import load_model
from star_jax.errors import CheckpointError
from star_jax.deploy.export import exporter
from star_jax.deploy.runtime import RuntimePredictor, contract
from star_jax.deploy.runtime import load_model as load_exported
from tests.export_checkpoints import save_star_jax_checkpoint
from tests.limits import LAST_GUARD_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = os.path.join(ROOT, "tests", "fixtures", "official_wflw_data", "images")
SIZE, POINTS = 64, 98  # what the exported graphs take and return


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  root = tmp_path_factory.mktemp("graph_exports")
  loaded = load_model(save_star_jax_checkpoint(str(root / "ckpt"), num_stacks=1, seed=3))
  assert (loaded.image_size, loaded.num_points) == (SIZE, POINTS)
  return {"onnx": exporter.export(loaded, "onnx", str(root / "any.onnx")).path,
          "onnx2": exporter.export(loaded, "onnx", str(root / "two.onnx"), batch=2).path,
          "tflite2": exporter.export(loaded, "tflite", str(root / "two.tflite"), batch=2).path}


def _image() -> str:
  return os.path.join(IMAGES, sorted(os.listdir(IMAGES))[0])


def _copy(exports, which: str, directory, edit=None) -> str:
  """A copy of an export (model and sidecar) in `directory`, its sidecar changed by `edit`."""
  src = exports[which]
  dst = os.path.join(str(directory), os.path.basename(src))
  shutil.copy(src, dst)
  with open(contract.sidecar_path(src)) as f:
    record = json.load(f)
  record["file"] = os.path.basename(dst)
  if edit is not None:
    edit(record)
  with open(contract.sidecar_path(dst), "w") as f:
    json.dump(record, f)
  return dst


def _size(value):
  def edit(record):
    record["input"]["shape"][1:3] = [value, value]
  return edit


def _batch(value):
  def edit(record):
    record["input"]["shape"][0] = value
    for output in record["outputs"]:
      output["shape"][0] = value
  return edit


def _points_300w(record):
  """A sidecar consistent in itself but for 68 points (the 300W scheme)."""
  record["num_points"] = 68
  record["dataset"] = "300w"
  record["scheme"] = datasets.get_spec("300w").to_dict()
  for output in record["outputs"]:
    output["shape"][1 if output["name"] == "landmarks" else 3] = 68


def _points_only(record):
  record["num_points"] = 68


# (export, sidecar edit, field named, the sidecar's value, the graph's value as written)
CASES = {
    "size 0": ("onnx", _size(0), "input size", "0", str(SIZE)),
    "size -5": ("onnx", _size(-5), "input size", "-5", str(SIZE)),
    "size 99999": ("onnx", _size(99999), "input size", "99999", str(SIZE)),
    "size 128": ("onnx", _size(128), "input size", "128", str(SIZE)),
    "size 128 tflite": ("tflite2", _size(128), "input size", "128", str(SIZE)),
    "batch 0": ("onnx", _batch(0), "batch", "0", "a symbolic one"),
    "batch -1": ("onnx2", _batch(-1), "batch", "-1", "2"),
    "batch 99999": ("onnx2", _batch(99999), "batch", "99999", "2"),
    "batch 4 on a symbolic batch": ("onnx", _batch(4), "batch", "4", "a symbolic one"),
    "any batch on batch 2": ("onnx2", _batch(None), "batch", "None", "2"),
    "batch 1 tflite": ("tflite2", _batch(1), "batch", "1", "2"),
    "68 points": ("onnx", _points_only, "num_points", "68", str(POINTS)),
    "68-point scheme": ("onnx2", _points_300w, "num_points", "68", str(POINTS)),
    "68 points tflite": ("tflite2", _points_300w, "num_points", "68", str(POINTS)),
}


def _assert_names_it(message: str, model: str, field: str, value: str, graph: str):
  assert "\n" not in message.strip(), message
  assert contract.sidecar_path(model) in message and model in message, message
  assert f"{field}" in message and f" is {value} " in message and message.rstrip().endswith(
      f"has {graph}"), message


@pytest.mark.parametrize("case", list(CASES))
def test_a_sidecar_that_disagrees_with_its_graph_is_one_line(exports, tmp_path, capsys, case):
  which, edit, field, value, graph = CASES[case]
  model = _copy(exports, which, tmp_path, edit)
  # The Python runtime: the engine and the predictor refuse it when they open it.
  with pytest.raises(CheckpointError) as raised:
    load_exported(model)
  _assert_names_it(str(raised.value), model, field, value, graph)
  with pytest.raises(CheckpointError) as raised:
    RuntimePredictor(model)
  _assert_names_it(str(raised.value), model, field, value, graph)
  # The command line: one line, exit 1 (also with --points asking for the sidecar's 68).
  for extra in ([], ["--points", "68"]) if "68" in case else ([],):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
      predict.main(["--model", model, _image(), "--box", "10,10,200,220",
                    "--out", str(tmp_path / "out"), *extra])
    assert exited.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    _assert_names_it(err, model, field, value, graph)
  assert not os.path.exists(tmp_path / "out" / (os.path.splitext(os.path.basename(_image()))[0]
                                                + ".json"))


@pytest.mark.parametrize("which", ["onnx", "tflite2"])
def test_the_command_line_refuses_it_without_a_traceback(exports, tmp_path, which):
  model = _copy(exports, which, tmp_path, _size(128))
  run = subprocess.run([sys.executable, "-m", "star_jax.predict", "--model", model, _image(),
                        "--box", "10,10,200,220", "--out", str(tmp_path / "out")],
                       cwd=ROOT, capture_output=True, text=True, timeout=LAST_GUARD_S,
                       check=False)
  assert run.returncode == 1, run.stderr
  assert "Traceback" not in run.stderr
  lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1, run.stderr
  _assert_names_it(lines[0], model, "input size", "128", str(SIZE))


@pytest.mark.parametrize("which", ["onnx", "onnx2", "tflite2"])
def test_an_unchanged_export_still_runs_and_maps_to_68_points(exports, tmp_path, which):
  model = _copy(exports, which, tmp_path)
  assert load_exported(model).num_points == POINTS
  out = tmp_path / "out"
  assert predict.main(["--model", model, _image(), "--box", "10,10,200,220", "--out", str(out),
                       "--points", "68"]) == 0
  record = json.loads((out / (os.path.splitext(os.path.basename(_image()))[0] + ".json")
                       ).read_text())
  assert len(record["faces"]) == 1 and len(record["faces"][0]["landmarks"]) == 68


def test_graph_shapes_that_are_not_an_export_are_refused(exports):
  info = contract.read_sidecar(exports["onnx"])
  with pytest.raises(CheckpointError, match=r"input 'image' has shape \[1, 3, 64, 64\]"):
    contract.check_against_graph(exports["onnx"], info, [1, 3, 64, 64], [1, 98, 2])
  with pytest.raises(CheckpointError, match=r"output 'landmarks' has shape \[1, 196\]"):
    contract.check_against_graph(exports["onnx"], info, ["batch", 64, 64, 3], [1, 196])
  # The graph's own symbolic batch and the sidecar's None agree.
  contract.check_against_graph(exports["onnx"], info, ["batch", 64, 64, 3], ["batch", 98, 2])
