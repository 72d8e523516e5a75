"""The in-browser demo: its crop geometry, its server, and the page itself in headless Chromium.

- geometry (web/geometry.js run by Node, when Node is installed): the page's warp equals
  OpenCV's `warpPerspective` crop of `star_jax.data.transforms.warp`, its box rules equal
  `detection.box_to_crop` ('official') and the training rule of `crop_params`, its map
  back equals `transforms.landmarks_to_original`;
- server (`star_jax.deploy.web`): the model routes, the cross-origin-isolation headers that give the
  page WASM threads, MIME types, and its one-line errors;
- the page (when Chromium and the page's runtime from `make web` are installed; skipped with
  the reason otherwise): a photo and a face box given to the page give the landmarks of
  `star_jax.deploy.predict.Predictor`
  (JAX, box rule 'official', same box) within 0.5 px, its crop is
  OpenCV's, and the webcam path runs on Chromium's fake camera. A screenshot is saved in the
  test's tmp directory;
- the annotated video (when Chromium is installed): the predictor's H.264 MP4 is one the
  browser says it plays (`canPlayType` of the file's own avc1 codec string) and a `<video>`
  element decodes its frames (size, advancing media time, the written colours on a canvas).
  A Chromium built without any H.264 decoder skips it, saying so.

The model is the demo architecture with one stack and random weights: one stack has no
CoordConv boundary switch, so float32 engines agree to rounding (see star_jax.deploy.export.parity).
"""

from __future__ import annotations

import base64
import functools
import http.client
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from typing import Any

import cv2
import numpy as np
import pytest

pytest.importorskip("onnx")

from star_jax.deploy import detection, video, web
from star_jax.foreign import original_formats
from star_jax.data import transforms
from star_jax.training.model_store import load_model
from star_jax.deploy.export import exporter
from star_jax.deploy.detection import Box
from star_jax.deploy.predict import Predictor
from star_jax.deploy.runtime import contract
from tests.chromium import FAKE_CAMERA_FLAGS, Chromium, find_chromium
from tests.export_checkpoints import save_star_jax_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEOMETRY_JS = os.path.join(ROOT, "web", "geometry.js")
PARITY_PX = 0.5
# Boxes on scikit-image's astronaut (512 x 512): the face, and one half outside the image (the
# black border of the crop).
ASTRONAUT_BOXES = ((175, 60, 290, 200), (-60, 300, 120, 470))


def _page_installed() -> bool:
  try:
    web.check_page()
  except web.UsageError:
    return False
  return True


needs_node = pytest.mark.skipif(shutil.which("node") is None,
                                reason="Node.js not installed (the page's geometry is checked "
                                       "with node)")
needs_browser = pytest.mark.skipif(
    find_chromium() is None,
    reason="no Chromium installed: apt-get install chromium chromium-driver (or set "
           "STAR_JAX_CHROMIUM to a Chromium binary)")
needs_page = pytest.mark.skipif(
    not _page_installed(),
    reason="the page's runtime (web/node_modules/onnxruntime-web) is not installed: make web")


@pytest.fixture(scope="module")
def astronaut(tmp_path_factory):
  """(RGB array, PNG path): a real face, stored losslessly so both sides decode the same."""
  from skimage import data
  image = data.astronaut()
  path = tmp_path_factory.mktemp("images") / "astronaut.png"
  cv2.imwrite(str(path), image[:, :, ::-1])
  return image, str(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(LoadedModel, path of its ONNX export)."""
  root = tmp_path_factory.mktemp("web_model")
  loaded = load_model(save_star_jax_checkpoint(str(root / "ckpt"), num_stacks=1, seed=3))
  return loaded, exporter.export(loaded, "onnx", str(root / "face.onnx")).path


# ---------------------------------------------------------------------------------------------
# Geometry (Node)


def _run_node(script: str, *args: str) -> dict:
  run = subprocess.run(["node", "--input-type=module", "-e", script, *args],
                       capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr
  return json.loads(run.stdout)


@needs_node
def test_geometry_warp_equals_opencv(astronaut, tmp_path):
  image, _ = astronaut
  h, w = image.shape[:2]
  rgba = np.concatenate([image, np.full((h, w, 1), 255, np.uint8)], axis=-1)
  (tmp_path / "image.rgba").write_bytes(rgba.tobytes())
  rng = np.random.default_rng(0)
  # Crops inside, across the border and mostly outside the image; downscaling and upscaling.
  crops = [(float(rng.uniform(0.2, 3.0)), [float(rng.uniform(-80, 590)),
                                           float(rng.uniform(-80, 590))], size)
           for size in (64, 128, 256) for _ in range(3)]
  script = f"""
    import fs from 'node:fs';
    import {{cropMatrix, warpCrop}} from {json.dumps('file://' + GEOMETRY_JS)};
    const pixels = new Uint8Array(fs.readFileSync(process.argv[1]));
    const crops = JSON.parse(process.argv[2]);
    const out = crops.map(([scale, center, size]) => Buffer.from(
        warpCrop(pixels, {w}, {h}, cropMatrix(scale, center, size), size)).toString('base64'));
    console.log(JSON.stringify(out));
  """
  results = _run_node(script, str(tmp_path / "image.rgba"), json.dumps(crops))
  for (scale, center, size), encoded in zip(crops, results):
    expected = transforms.warp(image, transforms.crop_matrix(scale, *center, size), size)
    got = np.frombuffer(base64.b64decode(encoded), np.uint8).reshape(expected.shape)
    diff = np.abs(got.astype(int) - expected.astype(int))
    # OpenCV 5 samples in float32 as the page does: equal up to rare last-bit roundings.
    # OpenCV 4's fixed-point sampling differs by a few levels (the module docstring of
    # geometry.js); either is far below a 0.5 px landmark change.
    limit = 1 if int(cv2.__version__.split(".")[0]) >= 5 else 8
    assert diff.max() <= limit, (scale, center, size)
    assert (diff > 0).mean() < (1e-3 if limit == 1 else 0.1)


@needs_node
def test_geometry_box_rules_and_map_back_equal_python():
  rng = np.random.default_rng(1)
  boxes = [sorted(rng.uniform(0, 600, 2)) + sorted(rng.uniform(0, 500, 2)) for _ in range(5)]
  boxes = [[b[0], b[2], b[1], b[3]] for b in boxes]                        # x1, y1, x2, y2
  points = [rng.uniform(50, 400, (98, 2)).tolist() for _ in range(3)]
  crop_points = rng.uniform(0, 255, (98, 2)).tolist()
  script = f"""
    import * as geo from {json.dumps('file://' + GEOMETRY_JS)};
    const boxes = JSON.parse(process.argv[1]);
    const points = JSON.parse(process.argv[2]);
    const cropPoints = JSON.parse(process.argv[3]);
    const official = boxes.map(([x1, y1, x2, y2]) => geo.boxToCrop({{x1, y1, x2, y2}}));
    const tracking = points.map((p) => geo.trackingCrop(p));
    const mapped = official.map((c) => {{
      const m = geo.cropMatrix(c.scale, c.center, 256);
      return [m, geo.cropToImage(cropPoints, m)];
    }});
    console.log(JSON.stringify({{official, tracking, mapped}}));
  """
  result = _run_node(script, json.dumps(boxes), json.dumps(points), json.dumps(crop_points))
  for box, got, (matrix, back) in zip(boxes, result["official"], result["mapped"]):
    scale, center = detection.box_to_crop(Box(*box), "official")
    assert got["scale"] == pytest.approx(scale, rel=1e-12)
    np.testing.assert_allclose(got["center"], center, rtol=1e-12)
    expected_matrix = transforms.crop_matrix(scale, *center, 256)
    np.testing.assert_array_equal(np.float32(matrix), expected_matrix[:2].reshape(-1))
    crop_px = np.asarray(crop_points, np.float32)
    expected = transforms.landmarks_to_original(
        transforms.normalize_landmarks(crop_px, 256), expected_matrix, 256)
    np.testing.assert_allclose(back, expected, atol=2e-3)
  for pts, got in zip(points, result["tracking"]):
    scale, cx, cy = original_formats.crop_params(np.asarray(pts), "max")
    assert got["scale"] == pytest.approx(scale, rel=1e-12)
    np.testing.assert_allclose(got["center"], [cx, cy], rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Server


def _get(url: str) -> tuple[int, Any, bytes]:
  """(status, headers (case-insensitive), body)."""
  try:
    with urllib.request.urlopen(url, timeout=30) as response:
      return response.status, response.headers, response.read()
  except urllib.error.HTTPError as e:
    return e.code, e.headers, b""


@needs_page
def test_server_routes_model_with_isolation_headers(exported, astronaut):
  _, model = exported
  with web.serve(model, routes={"/test/face.png": astronaut[1]}) as server:
    assert server.url.startswith("http://127.0.0.1:")
    status, headers, body = _get(server.url)
    assert status == 200 and b"app.js" in body
    assert headers["Cross-Origin-Opener-Policy"] == "same-origin"
    assert headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    status, headers, body = _get(server.url + "model.onnx")
    assert status == 200 and body == open(model, "rb").read()
    status, _, body = _get(server.url + "model.onnx.json")
    assert json.loads(body)["num_points"] == 98
    status, headers, _ = _get(server.url + os.path.join(web.RUNTIME_DIR,
                                                        "ort-wasm-simd-threaded.wasm"))
    assert status == 200 and headers["Content-Type"] == "application/wasm"
    status, headers, _ = _get(server.url + "app.js")
    assert headers["Content-Type"].startswith("text/javascript")
    assert _get(server.url + "test/face.png")[0] == 200
    assert _get(server.url + "../pyproject.toml")[0] == 404
    assert _get(server.url + "%2e%2e/pyproject.toml")[0] == 404
    assert _get(server.url + "node_modules/")[0] == 404


@needs_page
def test_bad_paths_are_400_and_idle_connections_time_out(exported, monkeypatch, capfd):
  _, model = exported
  monkeypatch.setattr(web._Handler, "timeout", 0.5)
  with web.serve(model) as server:
    for path in ("/model.onnx%00", "/%ff%fe", "/a%01b"):
      connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
      connection.request("GET", path)
      assert connection.getresponse().status == 400, path
      connection.close()
    # Half-sent requests: each connection is closed by the server after its idle timeout.
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(40)]
    for s in idle:
      s.sendall(b"GET /index.html HTTP/1.1\r\nHost: x\r\n")   # no blank line: never finished
    for s in idle:
      assert s.recv(1024) == b""   # closed by the server (recv waits for it, up to 30 s)
      s.close()
    assert _get(server.url)[0] == 200
  assert "Traceback" not in capfd.readouterr().err


def _cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "star_jax.web", *args], capture_output=True,
                        text=True, cwd=ROOT, timeout=120)


def test_cli_errors_are_one_line(exported, tmp_path):
  _, model = exported
  missing = _cli("--model", str(tmp_path / "nope.onnx"))
  assert missing.returncode == 1 and "nope.onnx: no such file" in missing.stderr
  assert "Traceback" not in missing.stderr
  lonely = tmp_path / "lonely.onnx"
  lonely.write_bytes(b"x")
  no_sidecar = _cli("--model", str(lonely))
  assert no_sidecar.returncode == 1 and "lonely.onnx.json: missing" in no_sidecar.stderr
  tflite = tmp_path / "m.tflite"
  tflite.write_bytes(b"x")
  record = json.load(open(contract.sidecar_path(model)))
  record["format"] = "tflite"
  (tmp_path / "m.tflite.json").write_text(json.dumps(record))
  wrong = _cli("--model", str(tflite))
  assert wrong.returncode == 2 and "runs ONNX exports" in wrong.stderr
  assert _cli("--model", model, "--port", "70000").returncode == 2
  garbage = tmp_path / "garbage.onnx"
  garbage.write_bytes(b"not a model")
  shutil.copy(contract.sidecar_path(model), contract.sidecar_path(str(garbage)))
  bad_model = _cli("--model", str(garbage))
  assert bad_model.returncode == 1 and "garbage.onnx: not an ONNX model" in bad_model.stderr
  assert bad_model.stderr.count("\n") == 1 and "Traceback" not in bad_model.stderr
  photo = tmp_path / "photo.png"
  photo.write_bytes(b"x")
  infinite = _cli("--model", model, "--image", str(photo), "--box", "0,0,inf,10")
  assert infinite.returncode == 2 and "--box 0,0,inf,10" in infinite.stderr
  assert infinite.stderr.count("\n") == 1 and "Traceback" not in infinite.stderr


def test_missing_page_runtime_is_a_usage_error(tmp_path):
  (tmp_path / "index.html").write_text("<html></html>")
  with pytest.raises(web.UsageError, match="make web"):
    web.check_page(str(tmp_path))


@needs_page
def test_busy_port_is_a_usage_error(exported):
  _, model = exported
  with web.serve(model) as server:
    with pytest.raises(web.UsageError, match=f"--port {server.port}"):
      web.PageServer(model, port=server.port)


# ---------------------------------------------------------------------------------------------
# The page in headless Chromium


@pytest.fixture(scope="module")
def page_server(exported, astronaut):
  _, model = exported
  with web.serve(model, routes={"/test/astronaut.png": astronaut[1]}) as server:
    yield server


@pytest.fixture(scope="module")
def browser():
  with Chromium(find_chromium(), FAKE_CAMERA_FLAGS) as chromium:
    yield chromium


@needs_browser
@needs_page
def test_page_landmarks_equal_jax_predictor(exported, astronaut, page_server, browser,
                                            tmp_path):
  loaded, model = exported
  image, _ = astronaut
  page = browser.open(page_server.url)
  page.wait_for("window.starJax && window.starJax.ready.then(() => true)")
  info = page.evaluate("window.starJax.info()")
  assert info["crossOriginIsolated"] and info["model"]["numPoints"] == 98
  predictor = Predictor(loaded, batch_size=1)
  import onnxruntime as ort
  session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
  size = loaded.image_size
  errors, found = [], []
  for box in ASTRONAUT_BOXES:
    result = page.evaluate(f"window.starJax.predictPhoto('/test/astronaut.png', {list(box)})")
    expected = predictor.predict(image, boxes=[box], box_rule="official")[0]
    got = np.asarray(result["points"])
    assert got.shape == expected.shape == (98, 2)
    error = np.abs(got - expected).max()
    errors.append(error)
    found.append(got)
    assert error < PARITY_PX, f"box {box}: page vs JAX predictor max {error:.4f} px"
    # The page's crop is OpenCV's, and its model run is ONNX Runtime's on that crop.
    crop = np.frombuffer(base64.b64decode(page.evaluate("window.starJax.cropBase64()")),
                         np.uint8).reshape(size, size, 3)
    scale, center = detection.box_to_crop(Box(*box), "official")
    reference = transforms.warp(image, transforms.crop_matrix(scale, *center, size), size)
    assert np.abs(crop.astype(int) - reference.astype(int)).max() <= 1
    native = session.run(["landmarks"], {"image": crop[None].astype(np.float32)})[0][0]
    np.testing.assert_allclose(result["cropPoints"], native, atol=1e-2)
  print(f"page vs JAX predictor, max |diff| per box: {', '.join(f'{e:.4f}' for e in errors)} px")
  # Another box moves the landmarks: the comparison above is not of two constants.
  assert np.abs(found[0].mean(0) - found[1].mean(0)).max() > 50
  shot = page.screenshot(str(tmp_path / "web_page.png"))
  print(f"screenshot: {shot}")
  assert os.path.getsize(shot) > 10_000


@needs_browser
@needs_page
def test_page_runs_an_int8_export_as_onnx_runtime_does(exported, astronaut, browser, tmp_path):
  """int8 (QLinearConv) kernels differ between WASM and x86 builds; their results must not."""
  loaded, _ = exported
  model = exporter.export(loaded, "onnx", str(tmp_path / "face_int8.onnx"), quantize="int8").path
  import onnxruntime as ort
  session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
  size = loaded.image_size
  with web.serve(model, routes={"/test/astronaut.png": astronaut[1]}) as server:
    page = browser.open(server.url)
    page.wait_for("window.starJax && window.starJax.ready.then(() => true)")
    result = page.evaluate(
        f"window.starJax.predictPhoto('/test/astronaut.png', {list(ASTRONAUT_BOXES[0])})")
    crop = np.frombuffer(base64.b64decode(page.evaluate("window.starJax.cropBase64()")),
                         np.uint8).reshape(1, size, size, 3)
  native = session.run(["landmarks"], {"image": crop.astype(np.float32)})[0][0]
  error = np.abs(np.asarray(result["cropPoints"]) - native).max()
  print(f"int8 export, page vs native ONNX Runtime: max {error:.4f} px")
  assert error < 0.1


@needs_browser
@needs_page
def test_page_tracks_on_the_webcam(page_server, browser):
  page = browser.open(page_server.url + "?camera=1")
  page.wait_for("window.starJax && window.starJax.ready.then(() => true)")
  stats = page.wait_for("window.starJax.stats().frames >= 5 && window.starJax.stats()",
                        timeout=60)
  assert stats["fps"] > 0 and stats["frameSize"][0] > 0
  points = np.asarray(page.evaluate("window.starJax.result().points"))
  assert points.shape == (98, 2) and np.isfinite(points).all()
  page.evaluate("window.starJax.stopCamera()")


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
  def log_message(self, *args) -> None:
    del args


@needs_browser
def test_browser_plays_the_annotated_video(browser, tmp_path):
  av = pytest.importorskip("av", reason="PyAV (the H.264 encoder, pinned in pyproject.toml)")
  width, height, count = 160, 120, 24
  writer = video.OutputWriter(str(tmp_path), "clip", video.VideoInfo(width, height, 12.0, None))
  for i in range(count):
    frame = np.zeros((height, width, 3), np.uint8)
    frame[:, : width // 2] = (255, 0, 0)              # red left, blue right, a moving bar
    frame[:, width // 2:] = (0, 0, 255)
    frame[:, 4 * i: 4 * i + 8] = 255
    writer.write({"frame": i}, lambda frame=frame: frame)
  writer.close()
  with av.open(writer.video_path) as container:
    extradata = container.streams.video[0].codec_context.extradata
  # The avcC record: version, then profile, constraint flags and level (RFC 6381's avc1.PPCCLL).
  codecs = "avc1." + extradata[1:4].hex().upper()
  (tmp_path / "index.html").write_text("<!doctype html><title>video</title><body></body>")
  server = http.server.ThreadingHTTPServer(
      ("127.0.0.1", 0), functools.partial(_QuietFiles, directory=str(tmp_path)))
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    page = browser.open(f"http://127.0.0.1:{server.server_port}/index.html")
    page.wait_for("document.readyState === 'complete' && document.body !== null")
    support = page.evaluate(f"""(() => {{ const v = document.createElement('video');
        return {{file: v.canPlayType('video/mp4; codecs="{codecs}"'),
                 baseline: v.canPlayType('video/mp4; codecs="avc1.42E01E"')}}; }})()""")
    if not support["baseline"] and not support["file"]:
      pytest.skip("this Chromium build has no H.264 decoder (proprietary codecs left out)")
    assert support["file"] in ("probably", "maybe"), (codecs, support)
    result = page.evaluate("""new Promise((done) => {
        const v = document.createElement('video');
        v.muted = true;
        v.src = 'clip.mp4';
        document.body.appendChild(v);
        v.onerror = () => done({error: v.error ? v.error.code + ' ' + v.error.message : '?'});
        const times = [];
        const onFrame = (now, meta) => {
          times.push(meta.mediaTime);
          if (times.length < 3) { v.requestVideoFrameCallback(onFrame); return; }
          v.pause();
          const canvas = document.createElement('canvas');
          canvas.width = v.videoWidth; canvas.height = v.videoHeight;
          const context = canvas.getContext('2d');
          context.drawImage(v, 0, 0);
          const pixel = (x, y) => Array.from(context.getImageData(x, y, 1, 1).data.slice(0, 3));
          done({width: v.videoWidth, height: v.videoHeight, times: times,
                presented: meta.presentedFrames, left: pixel(70, 60),
                right: pixel(150, 60)});
        };
        v.requestVideoFrameCallback(onFrame);
        v.play().catch((e) => done({error: String(e)}));
      })""", timeout=60)
  finally:
    server.shutdown()
    server.server_close()
  assert "error" not in result, result
  assert (result["width"], result["height"]) == (width, height)
  assert result["presented"] >= 3 and result["times"] == sorted(result["times"])
  assert result["times"][-1] > result["times"][0]
  # x = 70 is red until the bar reaches it (frame 16 and later), x = 150 stays blue.
  assert result["right"][2] > 200 and max(result["right"][:2]) < 60, result
  assert (result["left"][0] > 200 and result["left"][2] < 60) or min(result["left"]) > 200, result
