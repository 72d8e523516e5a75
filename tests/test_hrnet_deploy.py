"""HRNetV2-W18 deployed: the JAX-free runtime and `predict --model` on an HRNet export, the web
page's server on one, and the int8 exports against float.

The network is the HRNet fixture in the released file layout (tests/fixtures/official_hrnet_300w:
HRNetV2-W18, 68 points, random weights), read by `model_store.load_model` (the released-file
reader). The runtime tests run it at 64 px (its convolutions take any multiple of 32) to keep the
exports small; the int8 test at the official 256 px. The photograph is scikit-image's astronaut.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import urllib.request

import cv2
import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("ai_edge_litert")

from star_jax.commands import predict as predict_command
from star_jax.deploy import predict, web
from star_jax.deploy.export import exporter
from star_jax.deploy.runtime import RuntimePredictor, contract
from star_jax.training.model_store import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "official_hrnet_300w", "HR18-300W-fixture.pth")
SMALL = 64
# The astronaut's face (x1, y1, x2, y2; tests/test_predict.py) and a box half outside the image.
BOXES = ((178, 85, 270, 172), (-60, 300, 120, 470))


@pytest.fixture(scope="module")
def hrnet():
  """The fixture as the released-file reader loads it (official decode, 256 px)."""
  loaded = load_model(FIXTURE)
  assert type(loaded.model).registry_name == "hrnet_w18" and loaded.model.num_points == 68
  return loaded


@pytest.fixture(scope="module")
def astronaut(tmp_path_factory):
  """(RGB array, PNG path)."""
  from skimage import data
  image = data.astronaut()
  path = tmp_path_factory.mktemp("images") / "astronaut.png"
  cv2.imwrite(str(path), image[:, :, ::-1])
  return image, str(path)


@pytest.fixture(scope="module")
def exports(hrnet, tmp_path_factory):
  """decode -> (LoadedModel at 64 px, its ONNX export)."""
  root = tmp_path_factory.mktemp("hrnet_exports")
  out = {}
  for decode in ("official", "soft_argmax"):
    loaded = dataclasses.replace(hrnet, model=hrnet.model.clone(decode=decode),
                                 image_size=SMALL)
    out[decode] = loaded, exporter.export(loaded, "onnx", str(root / f"{decode}.onnx")).path
  return out


@pytest.mark.slow
@pytest.mark.parametrize("decode", ["official", "soft_argmax"])
def test_runtime_predicts_what_the_jax_predictor_does(exports, astronaut, decode):
  loaded, path = exports[decode]
  image, _ = astronaut
  jax_predictor = predict.Predictor(loaded, batch_size=2)
  runtime = RuntimePredictor(path, batch_size=2)
  assert runtime.num_points == 68 and runtime.spec == jax_predictor.spec
  expected = jax_predictor.predict_faces([image], boxes=[list(BOXES)])[0]
  got = runtime.predict_faces([image], boxes=[list(BOXES)])[0]
  assert len(got) == len(expected) == 2
  for a, b in zip(got, expected):
    assert a.box == b.box and a.landmarks.shape == (68, 2)
    # The random weights give near-flat maps, on which the soft-argmax (a mean over the whole
    # map) carries the float32 rounding of two engines' convolutions: up to 0.005 px was
    # measured on an AVX-512 CPU (JAX float32 itself is 2.5e-4 crop px from float64 there).
    # A different rule (crop, decode offset, resampling) moves the points by tenths of a pixel.
    np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1e-2)
  # Another box moves the landmarks: the comparison is not of two constants.
  assert np.abs(got[0].landmarks.mean(0) - got[1].landmarks.mean(0)).max() > 50


@pytest.mark.slow
def test_predict_cli_runs_an_hrnet_export_on_a_photo(exports, astronaut, tmp_path):
  _, path = exports["soft_argmax"]
  out = tmp_path / "out"
  assert predict_command.main(["--model", path, astronaut[1], "--out", str(out)]) == 0
  record = json.loads((out / "astronaut.json").read_text())
  assert len(record["faces"]) >= 1                       # the detector found the face
  for face in record["faces"]:
    assert np.asarray(face["landmarks"]).shape == (68, 2)
  assert (out / "astronaut.png").is_file()


@pytest.mark.slow
def test_web_server_serves_an_hrnet_export(exports, tmp_path):
  """What the page reads: the model's bytes and its sidecar (ONNX, [B, S, S, 3] input, a
  'landmarks' output, 68 points), the checks of web/app.js's checkSidecar. The page's runtime
  (onnxruntime-web, `make web`) is not needed to serve them: a copy of the page with
  placeholder runtime files stands in, so this runs where the browser tests skip."""
  _, path = exports["official"]
  root = tmp_path / "page"
  shutil.copytree(web.WEB_ROOT, root, ignore=shutil.ignore_patterns("node_modules"))
  os.makedirs(root / web.RUNTIME_DIR)
  for name in web.RUNTIME_FILES:
    (root / web.RUNTIME_DIR / name).write_bytes(b"")
  info = web.check_model(path)
  assert info.format == "onnx" and contract.LANDMARKS_NAME in info.outputs
  server = web.PageServer(path, root=str(root)).start()
  try:
    with urllib.request.urlopen(server.url + "model.onnx", timeout=30) as response:
      assert response.read() == open(path, "rb").read()
    with urllib.request.urlopen(server.url + "model.onnx.json", timeout=30) as response:
      sidecar = json.loads(response.read())
  finally:
    server.close()
  assert sidecar["format"] == "onnx" and sidecar["num_points"] == 68
  batch, height, width, channels = sidecar["input"]["shape"]
  assert (height, width, channels) == (SMALL, SMALL, 3) and batch in (None, 1)
  assert sidecar["outputs"][0]["name"] == "landmarks"
  assert sidecar["model"]["architecture"] == "hrnet_w18"


def test_quantiser_keeps_a_traced_graphs_tail_in_float():
  """Conv -> Relu -> Conv -> {ArgMax, Add -> Mul}, and a side branch Conv -> Conv: the nodes from
  which no convolution is reached are the last convolutions and what follows them."""
  import onnx
  from onnx import helper
  from star_jax.deploy.export import quantize
  nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="conv_0"),
           helper.make_node("Relu", ["a"], ["b"], name="relu_1"),
           helper.make_node("Conv", ["b", "w"], ["c"], name="conv_2"),
           helper.make_node("ArgMax", ["c"], ["d"], name="argmax_3"),
           helper.make_node("Add", ["c", "c"], ["e"], name="add_4"),
           helper.make_node("Mul", ["e", "e"], ["y"], name="mul_5"),
           helper.make_node("Add", ["b", "b"], ["f"], name="add_6"),
           helper.make_node("Conv", ["f", "w"], ["z"], name="conv_7")]
  value = helper.make_tensor_value_info
  graph = helper.make_graph(nodes, "g", [value("x", onnx.TensorProto.FLOAT, [1, 1, 4, 4])],
                            [value(n, onnx.TensorProto.FLOAT, None) for n in ("y", "d", "z")],
                            [helper.make_tensor("w", onnx.TensorProto.FLOAT, [1, 1, 1, 1], [1.0])])
  proto = helper.make_model(graph)
  assert quantize._tail_nodes(proto) == {"conv_2", "argmax_3", "add_4", "mul_5", "conv_7"}
  assert set(quantize._float_only_nodes(proto, traced=True)) == quantize._tail_nodes(proto)
  assert quantize._float_only_nodes(proto) == []       # a named graph goes by its names
  # The traced graph leaves its nodes unnamed: they are named before the quantiser sees them.
  for node in proto.graph.node:
    node.name = ""
  named = quantize._name_nodes(proto)
  assert len({node.name for node in named.graph.node}) == len(nodes)
  assert {named.graph.node[i].name for i in (2, 3, 4, 5, 7)} == quantize._tail_nodes(named)


# int8 against float32 (the JAX network), per landmark over INT8_CROPS crops, in pixels of the
# INT8_SIZE crop: (median, 90th percentile) bounds per export, measured then set with margin.
# The weights are random, so a few maps have little positive mass and their soft-argmax moves
# far under any rounding: the bounds are on the median and the 90th percentile, not the maximum.
INT8_SIZE = 64
INT8_CROPS = 6
INT8_BOUNDS_PX = {("onnx", "int8"): (2.0, 7.5), ("onnx", "int8-dynamic"): (1.0, 3.5),
                  ("tflite", "int8"): (1.0, 3.5)}


@pytest.mark.slow
@pytest.mark.parametrize("fmt, quantize", list(INT8_BOUNDS_PX))
def test_int8_exports_stay_near_float(hrnet, tmp_path, fmt, quantize):
  """The soft-argmax decode (continuous in the maps; the official argmax of random maps jumps
  between near-equal peaks under any rounding)."""
  from star_jax.deploy.export import parity
  loaded = dataclasses.replace(hrnet, model=hrnet.model.clone(decode="soft_argmax"),
                               image_size=INT8_SIZE)
  crops = parity.random_crops(INT8_CROPS, INT8_SIZE, seed=1)
  reference = parity.jax_landmarks(loaded.model, loaded.variables, crops, INT8_SIZE)
  result = exporter.export(loaded, fmt, str(tmp_path / f"int8.{fmt}"), quantize=quantize,
                           calibration=parity.random_crops(8, INT8_SIZE, seed=7))
  got = parity.exported_landmarks(result.path, crops)
  assert got.shape == reference.shape == (INT8_CROPS, 68, 2)
  error = np.linalg.norm(got - reference, axis=-1)
  median, p90 = np.median(error), np.percentile(error, 90)
  print(f"{fmt} {quantize}: per-landmark error vs float32 median {median:.3f} px, 90th "
        f"percentile {p90:.3f} px, max {error.max():.3f} px ({INT8_SIZE} px crop)")
  bound_median, bound_p90 = INT8_BOUNDS_PX[(fmt, quantize)]
  assert median < bound_median and p90 < bound_p90
  if fmt == "onnx":
    import onnx
    graph = onnx.load(result.path).graph
    ops = {node.op_type for node in graph.node}
    assert ops & {"QuantizeLinear", "DynamicQuantizeLinear", "ConvInteger"}   # int8 inside
    # The decode and the output convolution stay float32 (see quantize._tail_nodes).
    last_conv = [node for node in graph.node if node.op_type == "Conv"][-1]
    weight = next(t for t in graph.initializer if t.name == last_conv.input[1])
    assert weight.data_type == onnx.TensorProto.FLOAT
