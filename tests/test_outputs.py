"""Nothing a user owns is replaced: predict, eval, convert and export refuse, before any work, an
output that would overwrite an input or a file star-jax did not write; reruns over their own
outputs work (star_jax.core.outputs)."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest
from skimage import data as skdata

from star_jax.training import model_store
from star_jax.commands import convert
from star_jax.training import eval_lib
from star_jax.core import outputs
from star_jax.commands import predict
from star_jax.errors import UsageError
from star_jax.deploy.export import exporter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
CHECKPOINT = os.path.join(FIXTURES, "official_wflw_small", "checkpoint.pkl")
DATA_DIR = os.path.join(FIXTURES, "official_wflw_data")
ASTRONAUT_BOX = "178,85,270,172"


def _one_error_line(capsys) -> str:
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
  return lines[0]


@pytest.fixture
def no_model(monkeypatch):
  """Fails the test if a checkpoint is read (the refusal must come before any work)."""
  def refuse(*args, **kwargs):
    raise AssertionError("the checkpoint was read before the outputs were checked")
  monkeypatch.setattr(model_store, "load_model", refuse)


# --------------------------------------------------------------------------------------------
# The helper.

def test_an_output_that_is_an_input_or_not_ours_is_refused(tmp_path):
  photo = tmp_path / "face.png"
  photo.write_bytes(b"user photo")
  with pytest.raises(UsageError, match=f"would overwrite the input {photo}"):
    outputs.check_folder_outputs("--out", str(tmp_path), ["face.png"], inputs=[str(photo)])
  with pytest.raises(UsageError, match=f"{photo} exists and was not written by star-jax"):
    outputs.check_folder_outputs("--out", str(tmp_path), ["face.png"])
  # A hard link or a symlink of the input is the input.
  link = tmp_path / "sub"
  link.mkdir()
  os.link(photo, link / "face.png")
  with pytest.raises(UsageError, match="would overwrite the input"):
    outputs.check_folder_outputs("--out", str(link), ["face.png"], inputs=[str(photo)])
  # A folder replaced as a whole must not hold an input.
  with pytest.raises(UsageError, match="would overwrite the input"):
    outputs.check_outputs("--out", [str(tmp_path)], inputs=[str(photo)], is_own=lambda p: True)
  assert photo.read_bytes() == b"user photo"


def test_files_recorded_before_writing_may_be_written_again(tmp_path):
  out = tmp_path / "out"
  outputs.check_folder_outputs("--out", str(out), ["a.json"])   # nothing there yet
  assert not out.exists()                                         # a check writes nothing
  outputs.record_folder_outputs(str(out), ["a.json"])
  (out / "a.json").write_text("{}")  # as if killed right after writing it
  outputs.check_folder_outputs("--out", str(out), ["a.json", "b.json"])
  (out / "b.json").write_text("mine")  # a file the user put there
  with pytest.raises(UsageError, match="b.json exists and was not written by star-jax"):
    outputs.check_folder_outputs("--out", str(out), ["a.json", "b.json"])
  assert outputs.written_here(str(out)) == {"a.json"}


def test_a_manifest_that_is_not_ours_is_refused(tmp_path):
  (tmp_path / outputs.MANIFEST).write_text('{"files": ["photo.jpg"]}')
  with pytest.raises(UsageError, match="not a star-jax output manifest"):
    outputs.check_folder_outputs("--out", str(tmp_path), ["photo.jpg"])


# --------------------------------------------------------------------------------------------
# predict

def test_predict_refuses_to_replace_the_input_photos(tmp_path, capsys, no_model):
  folder = tmp_path / "same"
  folder.mkdir()
  photo = folder / "face.png"
  cv2.imwrite(str(photo), np.full((32, 32, 3), 90, np.uint8))
  before = photo.read_bytes()
  with pytest.raises(SystemExit) as info:
    predict.main(["--checkpoint", CHECKPOINT, str(folder), "--out", str(folder)])
  assert info.value.code == 2
  line = _one_error_line(capsys)
  assert "--out" in line and f"{folder}/face.png" in line and "would overwrite the input" in line
  assert photo.read_bytes() == before and sorted(os.listdir(folder)) == ["face.png"]


def test_predict_refuses_a_file_it_did_not_write(tmp_path, capsys, no_model):
  image = tmp_path / "face.jpg"
  cv2.imwrite(str(image), np.full((32, 32, 3), 90, np.uint8))
  out = tmp_path / "out"
  out.mkdir()
  (out / "face.json").write_text("the user's notes")
  with pytest.raises(SystemExit) as info:
    predict.main(["--checkpoint", CHECKPOINT, str(image), "--out", str(out)])
  assert info.value.code == 2
  line = _one_error_line(capsys)
  assert f"{out}/face.json exists and was not written by star-jax" in line
  assert (out / "face.json").read_text() == "the user's notes"


def test_predict_reruns_into_the_input_folder(tmp_path, capsys):
  """`--out` the input folder: the first run adds its files next to the photo, a rerun
  replaces them and does not take them for inputs; the photo is untouched."""
  folder = tmp_path / "same"
  folder.mkdir()
  photo = folder / "astro.jpg"
  cv2.imwrite(str(photo), skdata.astronaut()[..., ::-1])
  before = photo.read_bytes()
  args = ["--checkpoint", CHECKPOINT, str(folder), "--out", str(folder), "--box", ASTRONAUT_BOX,
          "--batch_size", "4"]
  assert predict.main(args) == 0
  first = json.loads((folder / "astro.json").read_text())
  assert predict.main(args) == 0
  assert "1 image(s) with faces" in capsys.readouterr().out
  assert sorted(os.listdir(folder)) == sorted([outputs.MANIFEST, "astro.jpg", "astro.json",
                                               "astro.png"])
  assert json.loads((folder / "astro.json").read_text()) == first
  assert photo.read_bytes() == before


# --------------------------------------------------------------------------------------------
# eval

def test_eval_refuses_outputs_that_are_not_its_own(tmp_path, no_model):
  from configs import base
  config = base.get_base_config("wflw")
  out = tmp_path / "out"
  out.mkdir()
  (out / "ced.png").write_bytes(b"a user's plot")
  with pytest.raises(UsageError, match=f"--output_dir {out}: {out}/ced.png exists and was not "):
    eval_lib.evaluate(config, CHECKPOINT, str(out))
  assert (out / "ced.png").read_bytes() == b"a user's plot"
  # The TSV it reads is an input.
  tsv = out / "metrics.json"
  tsv.write_text("")
  config.data.test_tsv = str(tsv)
  os.remove(out / "ced.png")
  with pytest.raises(UsageError, match=f"would overwrite the input {tsv}"):
    eval_lib.evaluate(config, CHECKPOINT, str(out))
  # Its own outputs of an earlier run are replaced.
  os.remove(tsv)
  outputs.record_folder_outputs(str(out), eval_lib.OUTPUT_NAMES)
  for name in eval_lib.OUTPUT_NAMES:
    (out / name).write_bytes(b"earlier run")
  eval_lib.check_output_dir(str(out), [CHECKPOINT])


# --------------------------------------------------------------------------------------------
# convert

def test_convert_refuses_a_folder_it_did_not_write_and_its_input(tmp_path, capsys, no_model):
  folder = tmp_path / "work"
  folder.mkdir()
  (folder / "notes.txt").write_text("keep me")
  with pytest.raises(SystemExit) as info:
    convert.main([CHECKPOINT, "--out", str(folder)])
  assert info.value.code == 2
  assert f"{folder} exists and was not written by star-jax" in _one_error_line(capsys)
  assert (folder / "notes.txt").read_text() == "keep me"
  with pytest.raises(SystemExit) as info:
    convert.main([CHECKPOINT, "--out", os.path.dirname(CHECKPOINT)])
  assert info.value.code == 2
  assert f"would overwrite the input {CHECKPOINT}" in _one_error_line(capsys)


def test_convert_missing_input_is_a_data_error(tmp_path, capsys):
  with pytest.raises(SystemExit) as info:
    convert.main([str(tmp_path / "absent.pkl"), "--out", str(tmp_path / "x")])
  assert info.value.code == 1
  assert "absent.pkl: no such file" in _one_error_line(capsys)


def test_convert_reruns_over_its_own_output(tmp_path, capsys):
  out = tmp_path / "converted"
  out.mkdir()   # an empty folder holds nothing to lose
  assert convert.main([CHECKPOINT, "--out", str(out)]) == 0
  assert convert.main([CHECKPOINT, "--out", str(out), "--ema"]) == 0
  assert model_store.load_model(str(out)).extra["weights"] == "net_ema"


# --------------------------------------------------------------------------------------------
# export

def test_export_refuses_files_it_did_not_write_and_its_input(tmp_path):
  model = tmp_path / "m.onnx"
  model.write_bytes(b"the user's model")
  with pytest.raises(UsageError, match=f"{model} exists and was not written by star-jax"):
    exporter.export(str(tmp_path / "missing.pkl"), "onnx", str(model))
  sidecar = tmp_path / "n.onnx.json"
  sidecar.write_text("{}")
  with pytest.raises(UsageError, match=f"{sidecar} exists and was not written by star-jax"):
    exporter.export(str(tmp_path / "missing.pkl"), "onnx", str(tmp_path / "n.onnx"))
  with pytest.raises(UsageError, match=f"would overwrite the input {CHECKPOINT}"):
    exporter.check_output("onnx", CHECKPOINT, [CHECKPOINT])
  assert model.read_bytes() == b"the user's model"
  # An earlier export (its sidecar names it) may be replaced.
  (tmp_path / "m.onnx.json").write_text(json.dumps({"sidecar_version": 1, "file": "m.onnx"}))
  exporter.check_output("onnx", str(model), [CHECKPOINT])
