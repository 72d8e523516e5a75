"""Parity of every export format with the JAX model, the sidecar, and the export CLI.

Each format is exported from the official fixture checkpoint (a converted official `.pkl`, 4
stacks, 32 channels, 256 px) and from a star-jax inference checkpoint (the demo architecture:
2 stacks, 64 px, random weights with non-trivial BatchNorm statistics), run in its own engine
(ONNX Runtime, LiteRT, TensorFlow, `jax.export`) and compared with the JAX model in float64:
within 0.05 px mean and 0.5 px max. Why float64 and not float32: see `star_jax.deploy.export.parity`
(the CoordConv boundary switch makes two correct float32 implementations disagree by up to
~4 px on random weights; jitted JAX float32 itself is that far from float64 on the fixture).
A one-stack model (no boundary switch) is also compared with jitted JAX float32 directly.
"""

from __future__ import annotations

from tests.limits import LAST_GUARD_S

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("ai_edge_litert")

from star_jax.training.model_store import load_model
from star_jax.deploy.export import exporter, parity
from star_jax.deploy.runtime import contract
from tests.export_checkpoints import save_star_jax_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFICIAL = os.path.join(ROOT, "tests", "fixtures", "official_wflw_small", "checkpoint.pkl")
MEAN_PX, MAX_PX = 0.05, 0.5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """name -> (checkpoint path, LoadedModel, crops, float64 reference, float32 reference)."""
  out = {}
  star = save_star_jax_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "star"))
  for name, path, count in (("official", OFFICIAL, 2), ("star_jax", star, 3)):
    loaded = load_model(path)
    crops = parity.random_crops(count, loaded.image_size, seed=1)
    ref64 = parity.jax_landmarks(loaded.model, loaded.variables, crops, loaded.image_size,
                                 float64=True)
    ref32 = parity.jax_landmarks(loaded.model, loaded.variables, crops, loaded.image_size)
    out[name] = (path, loaded, crops, ref64, ref32)
    floor = parity.difference(ref32, ref64)
    print(f"{name}: float32 noise floor (jitted JAX float32 vs float64): "
          f"{floor['mean_px']:.4f} px mean, {floor['max_px']:.4f} px max")
  return out


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("exports")


@pytest.mark.parametrize("fmt", contract.FORMATS)
@pytest.mark.parametrize("name", ["official", "star_jax"])
def test_export_matches_jax(models, export_dir, name, fmt):
  path, loaded, crops, ref64, _ = models[name]
  suffix = "" if fmt == "savedmodel" else f".{fmt}"
  out = str(export_dir / f"{name}_{fmt}{suffix}")
  batch = 2 if fmt == "tflite" else None  # a fixed batch that does not divide 3 (padding)
  result = exporter.export(loaded, fmt, out, batch=batch)
  got = parity.exported_landmarks(result.path, crops)
  assert got.shape == ref64.shape and got.dtype == np.float32
  d = parity.difference(got, ref64)
  print(f"{name} {fmt}: {d['mean_px']:.4f} px mean, {d['max_px']:.4f} px max vs float64")
  assert d["mean_px"] < MEAN_PX and d["max_px"] < MAX_PX, d


def test_sidecar_describes_the_model(models, export_dir):
  path, loaded, _, _, _ = models["official"]
  result = exporter.export(loaded, "onnx", str(export_dir / "sidecar.onnx"), heatmaps=True)
  with open(str(export_dir / "sidecar.onnx") + ".json") as f:
    record = json.load(f)
  with open(OFFICIAL, "rb") as f:
    assert record["source"]["sha256"] == hashlib.sha256(f.read()).hexdigest()
  assert record["source"]["weights"] == "net"
  assert record["num_points"] == 98 and record["dataset"] == "wflw"
  assert record["input"]["shape"] == [None, 256, 256, 3]
  assert [o["name"] for o in record["outputs"]] == ["landmarks", "heatmaps"]
  assert len(record["edges"]) == 9 and record["crop"]["face_box_unit"] == 200
  # The fixture's architecture, as the model class describes it.
  assert {k: record["model"][k] for k in ("architecture", "num_stacks", "num_levels",
                                         "channels", "use_aam")} == {
      "architecture": "stacked_hourglass", "num_stacks": 4, "num_levels": 4, "channels": 32,
      "use_aam": True}
  info = contract.read_sidecar(result.path)
  assert (info.format, info.input_size, info.batch) == ("onnx", 256, None)


def test_onnx_graph_outputs_and_batch(models, export_dir):
  """Symbolic batch: one crop alone gives what it gives within a batch; heatmaps output is the
  JAX model's final fused heatmaps."""
  import onnxruntime as ort
  _, loaded, crops, _, _ = models["star_jax"]
  result = exporter.export(loaded, "onnx", str(export_dir / "heat.onnx"), heatmaps=True)
  session = ort.InferenceSession(result.path, providers=["CPUExecutionProvider"])
  landmarks, heatmaps = session.run(None, {"image": crops})
  single = session.run(["landmarks"], {"image": crops[1:2]})[0]
  np.testing.assert_allclose(single[0], landmarks[1], atol=1e-3)
  from star_jax.training.eval_lib import normalize_crops
  reference = loaded.model.apply(loaded.variables, normalize_crops(crops), train=False)
  side = loaded.image_size // 4
  assert heatmaps.shape == (3, side, side, 98)
  np.testing.assert_allclose(heatmaps, np.asarray(reference.heatmaps[-1]), atol=2e-3)


def test_spinning_threads_are_an_engine_option_with_the_same_landmarks(models, export_dir):
  from star_jax.deploy.runtime import RuntimePredictor, backends
  _, loaded, crops, _, _ = models["star_jax"]
  path = exporter.export(loaded, "onnx", str(export_dir / "spin.onnx")).path
  sleeping = backends.load_model(path, threads=2)
  spinning = RuntimePredictor(path, threads=2, spin=True).model
  for engine, setting in ((sleeping, "0"), (spinning, "1")):
    options = engine.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == setting
    assert options.intra_op_num_threads == 2
  np.testing.assert_array_equal(spinning(crops), sleeping(crops))


def test_one_stack_model_matches_jitted_float32(tmp_path):
  """Without a boundary switch, the ONNX graph equals jitted JAX float32 to rounding."""
  loaded = load_model(save_star_jax_checkpoint(str(tmp_path / "one"), num_stacks=1))
  crops = parity.random_crops(2, loaded.image_size, seed=3)
  result = exporter.export(loaded, "onnx", str(tmp_path / "one.onnx"))
  ref32 = parity.jax_landmarks(loaded.model, loaded.variables, crops, loaded.image_size)
  d = parity.difference(parity.exported_landmarks(result.path, crops), ref32)
  assert d["max_px"] < 1e-3, d


@pytest.mark.parametrize("fmt, quantize, kind", [("onnx", "int8", "int8-static"),
                                                   ("onnx", "int8-dynamic", "int8-dynamic-range"),
                                                   ("tflite", "int8", "int8-dynamic-range")])
def test_int8_exports_are_smaller_and_run(models, export_dir, fmt, quantize, kind):
  _, loaded, crops, ref64, _ = models["official"]
  plain = export_dir / f"official_{fmt}.{fmt}"
  if not plain.exists():
    exporter.export(loaded, fmt, str(plain))
  calibration = parity.random_crops(4, loaded.image_size, seed=7)
  result = exporter.export(loaded, fmt, str(export_dir / f"{quantize}.{fmt}"),
                           quantize=quantize, calibration=calibration)
  assert result.record["quantization"] == kind
  if fmt == "onnx":
    import onnx
    from onnx import numpy_helper
    tensors = [numpy_helper.to_array(t) for t in onnx.load(result.path).graph.initializer]
    eight_bit = sum(t.size for t in tensors if t.dtype in (np.int8, np.uint8))
    assert eight_bit > 100 * loaded.model.channels ** 2  # ~140 C x C convolutions
  else:
    # The fixed part (CoordConv maps, decoder grid) weighs more than 32-channel weights.
    assert os.path.getsize(result.path) < 0.8 * os.path.getsize(plain)
  got = parity.exported_landmarks(result.path, crops)
  # Random weights amplify quantisation error; accuracy is measured on a trained model
  # (benchmarks/export.py: NME change on the embedded test set). Here: finite, inside the crop.
  assert got.shape == ref64.shape and np.all(np.isfinite(got))
  assert np.all((got > -1) & (got < loaded.image_size))


def test_default_calibration_crops_are_embedded_faces():
  from star_jax.deploy.export import quantize
  crops = quantize.embedded_calibration_crops(64, count=3)
  assert crops.shape == (3, 64, 64, 3) and crops.dtype == np.float32
  assert 0 <= crops.min() and crops.max() <= 255 and crops.std() > 10


def test_float16_weights_halve_the_onnx_file(models, export_dir):
  _, loaded, crops, ref64, _ = models["star_jax"]
  plain = exporter.export(loaded, "onnx", str(export_dir / "f32.onnx"))
  half = exporter.export(loaded, "onnx", str(export_dir / "f16.onnx"), dtype="float16")
  assert os.path.getsize(half.path) < 0.6 * os.path.getsize(plain.path)
  assert np.all(np.isfinite(parity.exported_landmarks(half.path, crops)))


def test_bfloat16_stablehlo_computes_in_bfloat16(models, export_dir):
  _, loaded, crops, ref64, _ = models["star_jax"]
  result = exporter.export(loaded, "stablehlo", str(export_dir / "bf16.stablehlo"),
                           dtype="bfloat16")
  assert result.record["precision"] == "bfloat16"
  got = parity.exported_landmarks(result.path, crops)
  d = parity.difference(got, ref64)
  # bfloat16 keeps 8 bits of mantissa: visibly different from float32, still the same faces.
  assert 1e-3 < d["mean_px"] < 2.0, d


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "star_jax.export", *args], capture_output=True,
                        text=True, cwd=ROOT, timeout=LAST_GUARD_S)


@pytest.mark.parametrize("args, flag", [
    (["--format", "stablehlo", "--quantize", "int8"], "--quantize"),
    (["--format", "savedmodel", "--batch", "4"], "--batch"),
    (["--format", "onnx", "--dtype", "bfloat16"], "--dtype"),
])
def test_cli_rejects_unsupported_combinations(tmp_path, args, flag):
  run = _cli("--checkpoint", OFFICIAL, "--out", str(tmp_path / "m"), *args)
  assert run.returncode == 2, run.stderr
  lines = run.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0]


def test_cli_missing_checkpoint_is_one_line(tmp_path):
  run = _cli("--checkpoint", str(tmp_path / "nope.pkl"), "--format", "onnx", "--out",
             str(tmp_path / "m.onnx"))
  assert run.returncode == 1
  assert run.stderr.strip().startswith("error: ") and "nope.pkl" in run.stderr
  assert "Traceback" not in run.stderr


def test_cli_exports_and_checks(tmp_path):
  out = tmp_path / "official.onnx"
  run = _cli("--checkpoint", OFFICIAL, "--format", "onnx", "--out", str(out), "--check")
  assert run.returncode == 0, run.stderr
  assert out.exists() and (tmp_path / "official.onnx.json").exists()
  assert "vs the JAX model in float64" in run.stdout


def test_export_never_replaces_a_folder_that_is_not_its_own(tmp_path):
  """A SavedModel replaces an earlier SavedModel only; a file export never takes a folder. The
  refusal comes before the checkpoint is read, and the folder keeps its files."""
  notes = tmp_path / "work" / "notes.txt"
  notes.parent.mkdir()
  notes.write_text("keep me")
  with pytest.raises(exporter.UsageError, match="not a SavedModel"):
    exporter.export(str(tmp_path / "missing.pkl"), "savedmodel", str(notes.parent))
  with pytest.raises(exporter.UsageError, match="a folder; a onnx export is a file"):
    exporter.export(str(tmp_path / "missing.pkl"), "onnx", str(notes.parent))
  with pytest.raises(exporter.UsageError, match="a file; a SavedModel is a folder"):
    exporter.export(str(tmp_path / "missing.pkl"), "savedmodel", str(notes))
  assert notes.read_text() == "keep me"
  run = _cli("--checkpoint", OFFICIAL, "--format", "savedmodel", "--out", str(notes.parent))
  assert run.returncode == 2 and "Traceback" not in run.stderr
  assert run.stderr.count("\n") == 1 and "not a SavedModel" in run.stderr
  assert notes.read_text() == "keep me"


@pytest.mark.slow
def test_hrnet_exports_in_every_format(tmp_path):
  """HRNet through StableHLO, SavedModel, TFLite and ONNX, each equal to the JAX network (one
  module per stage and one block per branch: the official structure at a fraction of the export
  time; the official network's ONNX graph is tests/test_onnx_traced.py's)."""
  from star_jax.training import model_store
  from star_jax.core import schemes as datasets
  from star_jax import models
  from star_jax.models import hrnet
  spec = datasets.get_spec("wflw")
  model = hrnet.HRNetW18(num_points=spec.num_points, stage_modules=(1, 1, 1), blocks=1)
  path = model_store.save_for_inference(str(tmp_path / "hrnet"), model,
                                          models.init_variables(model, 0, 64), spec=spec,
                                          image_size=64)
  loaded = load_model(path)
  crops = parity.random_crops(2, 64, seed=1)
  ref64 = parity.jax_landmarks(loaded.model, loaded.variables, crops, 64, float64=True)
  for fmt in ("stablehlo", "savedmodel", "tflite"):
    out = str(tmp_path / ("hr_savedmodel" if fmt == "savedmodel" else f"hr.{fmt}"))
    result = exporter.export(loaded, fmt, out, batch=2 if fmt == "tflite" else None)
    d = parity.difference(parity.exported_landmarks(result.path, crops), ref64)
    assert d["mean_px"] < MEAN_PX and d["max_px"] < MAX_PX, (fmt, d)
    assert result.record["model"]["architecture"] == "hrnet_w18"
    assert result.record["model"]["width"] == 18
    assert result.record["model"]["stage_modules"] == [1, 1, 1]
  # ONNX: HRNet's graph (hand-written, or traced from the JAX program where the class has
  # none) at a fixed batch of 2.
  result = exporter.export(loaded, "onnx", str(tmp_path / "hr.onnx"), batch=2)
  d = parity.difference(parity.exported_landmarks(result.path, crops), ref64)
  assert d["mean_px"] < MEAN_PX and d["max_px"] < MAX_PX, ("onnx", d)
