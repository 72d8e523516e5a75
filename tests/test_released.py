"""The released models by name: the download from a stand-in for Google Drive on 127.0.0.1 (its
virus-scan confirmation page included), the cache and its record, the checks, the failures, and
the name at every entry that takes a checkpoint.

The stand-in serves the official-format fixture (tests/fixtures/official_wflw_small, a 32-channel
WFLW network with random weights). It is reached in two ways:
- as Google Drive itself: gdown asks for https://drive.google.com/uc?id=..., through an HTTPS
  proxy (HTTPS_PROXY) that terminates TLS with a test certificate for the Google hosts
  (tests/fixtures/fake_drive, trusted through REQUESTS_CA_BUNDLE); nothing in star-jax is
  changed for the test;
- as a plain mirror (`STAR_JAX_RELEASES_URL`), for the cheaper failure tests.
The released architecture has 256 channels; the tests that install the fixture as `wflw` accept
its 32 (the check itself is tested against the real table).
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import os
import socket
import ssl
import threading
import urllib.parse

import cv2
import numpy as np
import pytest
from skimage import data as skdata

from star_jax.training import model_store
from star_jax.commands import cli
from star_jax.deploy import released
from star_jax.commands import released as released_command
from star_jax.errors import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
CHECKPOINT = os.path.join(FIXTURES, "official_wflw_small", "checkpoint.pkl")
CERT = os.path.join(FIXTURES, "fake_drive", "cert.pem")
KEY = os.path.join(FIXTURES, "fake_drive", "key.pem")
WFLW_FILE = "WFLW_STARLoss_NME_4_02_FR_2_32_AUC_0_605.pkl"
WFLW_DRIVE_ID = "1aOx0wYEZUfBndYy_8IYszLPG_D2fhxrT"
SCAN_UUID = "5e1c0ffe-0000-4000-8000-000000000001"
ASTRONAUT_FACE = "178,85,270,172"


def _fixture_bytes() -> bytes:
  with open(CHECKPOINT, "rb") as f:
    return f.read()


# ---------------------------------------------------------------------------------------------
# The stand-in host.

class _Handler(http.server.BaseHTTPRequestHandler):
  """Google Drive's download protocol as gdown meets it, and a plain mirror."""

  def log_message(self, format, *args):
    del format, args

  def do_CONNECT(self):
    # An HTTPS proxy whose every tunnel ends here, in TLS with the Google hosts' test
    # certificate: one request per tunnel (HTTP/1.0), answered by this same handler class.
    self.server.requests.append(("CONNECT", self.path))
    self.send_response(200, "Connection established")
    self.end_headers()
    self.close_connection = True
    try:
      tunnel = self.server.tls.wrap_socket(self.connection, server_side=True)
    except (ssl.SSLError, OSError):
      return
    try:
      _Handler(tunnel, self.client_address, self.server)
    finally:
      tunnel.close()

  def do_GET(self):
    host = (self.headers.get("Host") or "").split(":")[0]
    url = urllib.parse.urlsplit(self.path)
    query = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
    self.server.requests.append((host, self.path))
    drive = self.server.drive
    if host == "drive.google.com" and url.path == "/uc" and self.server.quota_exceeded:
      page = ('<html><body>\n<p class="uc-error-caption">Sorry, you can\'t view or download this '
              'file at this time.</p>\n<p class="uc-error-subcaption">Too many users have viewed '
              "or downloaded this file recently. Please try accessing the file again later.</p>\n"
              "</body></html>\n").encode()
      self._send(200, page, {"Content-Type": "text/html; charset=utf-8"})
    elif host == "drive.google.com" and url.path == "/uc" and query.get("id") in drive:
      # A file too large to scan: the warning page, whose form carries the download's
      # parameters (gdown reads the form's action and hidden inputs).
      name, _ = drive[query["id"]]
      form = ('<form id="download-form" action="https://drive.usercontent.google.com/download" '
              'method="get"><input type="submit" id="uc-download-link" value="Download anyway"/>'
              f'<input type="hidden" name="id" value="{query["id"]}">'
              '<input type="hidden" name="export" value="download">'
              '<input type="hidden" name="confirm" value="t">'
              f'<input type="hidden" name="uuid" value="{SCAN_UUID}"></form>')
      page = ("<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title>"
              "</head><body>\n"
              '<p class="uc-warning-caption">Google Drive can\'t scan this file for viruses.</p>\n'
              f'<p class="uc-warning-subcaption">{name} is too large for Google to scan for '
              "viruses. Would you still like to download this file?</p>\n"
              f"{form}\n</body></html>\n").encode()
      self._send(200, page, {"Content-Type": "text/html; charset=utf-8"})
    elif (host == "drive.usercontent.google.com" and url.path == "/download"
          and query.get("id") in drive and query.get("confirm") == "t"
          and query.get("uuid") == SCAN_UUID):
      name, body = drive[query["id"]]
      self._send(200, body, {"Content-Type": "application/octet-stream",
                             "Content-Disposition": f'attachment; filename="{name}"'})
    elif host == "127.0.0.1" and url.path.lstrip("/") in self.server.files:
      self._send(200, self.server.files[url.path.lstrip("/")],
                 {"Content-Type": "application/octet-stream"})
    else:
      self._send(404, b"not found", {"Content-Type": "text/plain"})

  def _send(self, code, body, headers):
    self.send_response(code)
    for key, value in headers.items():
      self.send_header(key, value)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)


class _Host(http.server.ThreadingHTTPServer):
  daemon_threads = True

  def __init__(self):
    super().__init__(("127.0.0.1", 0), _Handler)
    self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    self.tls.load_cert_chain(CERT, KEY)
    self.requests: list[tuple[str, str]] = []
    self.drive: dict[str, tuple[str, bytes]] = {}   # Drive id -> (file name, bytes)
    self.files: dict[str, bytes] = {}               # mirror: file name -> bytes
    self.quota_exceeded = False                     # Drive refuses every download

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def host():
  server = _Host()
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield server
  server.shutdown()
  server.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
  """An empty star-jax cache, no mirror, no proxy, and `wflw` accepting the fixture's width."""
  root = tmp_path / "cache"
  monkeypatch.setenv("STAR_JAX_CACHE", str(root))
  for name in (released.MIRROR_ENV, "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
               "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy", "CURL_CA_BUNDLE"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setitem(released.RELEASES, "wflw",
                      dataclasses.replace(released.RELEASES["wflw"], channels=32))
  return root / "released"


def _as_drive(monkeypatch, host):
  monkeypatch.setenv("HTTPS_PROXY", host.url)
  monkeypatch.setenv("REQUESTS_CA_BUNDLE", CERT)


def _mirror(monkeypatch, host, files):
  host.files.update(files)
  monkeypatch.setenv(released.MIRROR_ENV, host.url + "/")


def _closed_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _one_line_error(excinfo) -> str:
  message = str(excinfo.value)
  assert "\n" not in message
  return message


def _leftovers(folder) -> list[str]:
  return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


# ---------------------------------------------------------------------------------------------
# The table: literal values of the official README (github ZhenglinZhou/STAR, commit 9b12574).

def test_the_table_names_the_official_links():
  expected = {
      "wflw": (98, "1aOx0wYEZUfBndYy_8IYszLPG_D2fhxrT",
               "https://pan.baidu.com/s/10vvI-ovs3x9NrdmpnXK6sg?pwd=u0yu"),
      "300w": (68, "1NFcZ9jzql_jnn3ulaSzUlyhS05HWB9n_",
               "https://pan.baidu.com/s/1bjUhLq1zS1XSl1nX78fU7A?pwd=yb2s"),
      "cofw": (29, "1Fiu3hjjkQRdKsWE9IgyNPdiJSz9_MzA5",
               "https://pan.baidu.com/s/1XO6hDZ8siJLTgFcpyu1Tzw?pwd=m57n"),
  }
  assert [n for n in released.names() if released.get(n).family == "star"] == list(expected)
  for name, (points, drive_id, baidu) in expected.items():
    release = released.get(name)
    assert (release.num_points, release.drive_id, release.baidu_url) == (points, drive_id, baidu)
    # conf/alignment.py: nstack 4; StackedHGNetV1 defaults: nlevels 4, in_channel 256; use_AAM.
    assert (release.num_stacks, release.num_levels, release.channels, release.use_aam) == (
        4, 4, 256, True)
  assert released.get("wflw").file_name == WFLW_FILE   # the name the official demo.py loads
  assert released.lookup("WFLW") is released.get("wflw") and released.lookup("wflw.pkl") is None


# ---------------------------------------------------------------------------------------------
# The download.

def test_drive_download_passes_the_confirmation_page(host, cache, monkeypatch, capfd):
  data = _fixture_bytes()
  host.drive[WFLW_DRIVE_ID] = (WFLW_FILE, data)
  _as_drive(monkeypatch, host)
  path = released.ensure("wflw")
  assert path == str(cache / WFLW_FILE)
  with open(path, "rb") as f:
    assert f.read() == data
  pages = [r for r in host.requests if r[0] != "CONNECT"]
  assert pages[0] == ("drive.google.com", f"/uc?id={WFLW_DRIVE_ID}")
  host_name, page = pages[-1]
  query = urllib.parse.parse_qs(urllib.parse.urlsplit(page).query)
  assert host_name == "drive.usercontent.google.com" and page.startswith("/download?")
  assert query["confirm"] == ["t"] and query["uuid"] == [SCAN_UUID]
  with open(path + ".json") as f:
    record = json.load(f)
  assert record["sha256"] == hashlib.sha256(data).hexdigest()
  assert record["source"] == f"https://drive.google.com/uc?id={WFLW_DRIVE_ID}"
  err = capfd.readouterr().err
  assert err.count("without a licence file") == 1
  assert "100%" in err                                   # gdown's progress bar ran to the end
  assert _leftovers(cache) == sorted([WFLW_FILE, WFLW_FILE + ".json"])

  # Later uses read the cache: no request, no licence line, the sha256 checked.
  # Only requests for the release count: another library of the process may use the proxy too.
  drive = lambda: [r for r in host.requests if "google" in r[0] or "google" in r[1]]
  count = len(drive())
  loaded = model_store.load_model("wflw")
  assert len(drive()) == count
  assert "licence" not in capfd.readouterr().err
  assert loaded.source == path and loaded.num_points == 98 and loaded.spec.name == "wflw"
  assert loaded.trained_on == "wflw"


def test_no_network_is_one_line_saying_what_to_do(cache, monkeypatch, capsys, tmp_path):
  monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{_closed_port()}")
  with pytest.raises(CheckpointError) as excinfo:
    released.ensure("wflw")
  message = _one_line_error(excinfo)
  for part in (f"https://drive.google.com/uc?id={WFLW_DRIVE_ID}", WFLW_FILE,
               str(cache / WFLW_FILE), "python -m star_jax.released register wflw",
               "https://pan.baidu.com/s/10vvI-ovs3x9NrdmpnXK6sg?pwd=u0yu"):
    assert part in message, part
  assert _leftovers(cache) == []

  # The same through a command: `error: <that line>`, exit 1.
  image = tmp_path / "astro.png"
  cv2.imwrite(str(image), skdata.astronaut()[..., ::-1])
  from star_jax.commands import predict as predict_command
  with pytest.raises(SystemExit) as exit_info:
    predict_command.main(["--checkpoint", "wflw", str(image), "--out", str(tmp_path / "out"),
                  "--box", ASTRONAUT_FACE])
  assert exit_info.value.code == 1
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1, lines                 # nothing before it: no download started
  assert lines[0] == f"error: {message}"


def test_refused_drive_download(host, cache, monkeypatch):
  host.quota_exceeded = True
  host.drive[WFLW_DRIVE_ID] = (WFLW_FILE, _fixture_bytes())
  _as_drive(monkeypatch, host)
  with pytest.raises(CheckpointError) as excinfo:
    released.ensure("wflw")
  message = _one_line_error(excinfo)
  assert message.startswith(f"cannot download https://drive.google.com/uc?id={WFLW_DRIVE_ID} ")
  assert "Too many users have viewed or downloaded this file recently" in message
  assert str(cache / WFLW_FILE) in message and "register wflw" in message
  assert _leftovers(cache) == []


def test_refused_mirror_download(host, cache, monkeypatch):
  _mirror(monkeypatch, host, {})                     # the host answers 404
  with pytest.raises(CheckpointError) as excinfo:
    released.ensure("wflw")
  message = _one_line_error(excinfo)
  assert f"{host.url}/{WFLW_FILE}" in message and "404" in message
  assert str(cache / WFLW_FILE) in message
  assert _leftovers(cache) == []


def test_crossed_link_gives_the_wrong_landmark_count(host, cache, monkeypatch):
  # The 98-point WFLW file behind the 300W name (the official links were crossed once).
  _mirror(monkeypatch, host, {released.get("300w").file_name: _fixture_bytes()})
  with pytest.raises(CheckpointError) as excinfo:
    released.ensure("300w")
  message = _one_line_error(excinfo)
  assert "98-point model" in message and "68-point" in message and "crossed" in message
  assert str(cache / released.get("300w").file_name) in message
  assert _leftovers(cache) == []


def test_truncated_file_is_refused(host, cache, monkeypatch):
  data = _fixture_bytes()
  _mirror(monkeypatch, host, {WFLW_FILE: data[:len(data) // 2]})
  with pytest.raises(CheckpointError) as excinfo:
    released.ensure("wflw")
  message = _one_line_error(excinfo)
  assert "truncated" in message and str(cache / WFLW_FILE) in message
  assert _leftovers(cache) == []


def test_other_architecture_is_refused(host, cache, monkeypatch):
  monkeypatch.setitem(released.RELEASES, "wflw",
                      dataclasses.replace(released.RELEASES["wflw"], channels=256))
  _mirror(monkeypatch, host, {WFLW_FILE: _fixture_bytes()})
  with pytest.raises(CheckpointError) as excinfo:
    released.ensure("wflw")
  assert "not the released wflw architecture: channels 32 (released: 256)" in _one_line_error(
      excinfo)
  assert _leftovers(cache) == []


def test_changed_file_is_refused_on_a_later_load(host, cache, monkeypatch):
  _mirror(monkeypatch, host, {WFLW_FILE: _fixture_bytes()})
  path = released.ensure("wflw")
  with open(path, "r+b") as f:                       # one byte of the weights changed
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))
  with pytest.raises(CheckpointError) as excinfo:
    model_store.load_model("wflw")
  message = _one_line_error(excinfo)
  assert path in message and "sha256" in message and "changed" in message


# ---------------------------------------------------------------------------------------------
# A file downloaded by hand.

def test_register_a_hand_downloaded_file(cache, monkeypatch, capsys):
  monkeypatch.setenv(released.MIRROR_ENV, f"http://127.0.0.1:{_closed_port()}")
  assert released_command.main(["register", "wflw", CHECKPOINT]) == 0
  assert str(cache / WFLW_FILE) in capsys.readouterr().out
  with open(cache / (WFLW_FILE + ".json")) as f:
    record = json.load(f)
  assert record["sha256"] == hashlib.sha256(_fixture_bytes()).hexdigest()
  assert record["source"] == f"registered by hand from {CHECKPOINT}"
  assert model_store.load_model("wflw").num_points == 98    # no network needed now

  # A file of another scheme is refused, in one line, and nothing is installed.
  with pytest.raises(SystemExit) as exit_info:
    released_command.main(["register", "cofw", CHECKPOINT])
  assert exit_info.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"error: {CHECKPOINT}: holds a 98-point model")
  assert not (cache / released.get("cofw").file_name).exists()
  with pytest.raises(SystemExit) as exit_info:
    released_command.main(["register", "menpo", CHECKPOINT])
  assert exit_info.value.code == 2


def test_a_file_put_in_place_by_hand_is_checked_and_recorded(cache, monkeypatch):
  monkeypatch.setenv(released.MIRROR_ENV, f"http://127.0.0.1:{_closed_port()}")
  cache.mkdir(parents=True)
  with open(cache / WFLW_FILE, "wb") as f:
    f.write(_fixture_bytes())
  assert released.ensure("wflw") == str(cache / WFLW_FILE)
  with open(cache / (WFLW_FILE + ".json")) as f:
    assert json.load(f)["source"] == "placed by hand"
  # A wrong file in the place of another name is refused.
  with open(cache / released.get("cofw").file_name, "wb") as f:
    f.write(_fixture_bytes())
  with pytest.raises(CheckpointError, match="holds a 98-point model, but 'cofw'"):
    released.ensure("cofw")


def test_an_existing_path_wins_over_a_name(cache, tmp_path, monkeypatch):
  """`wflw` names the release only when no such file or folder exists."""
  monkeypatch.chdir(tmp_path)
  os.mkdir("wflw")
  with pytest.raises(CheckpointError, match="not a star-jax checkpoint"):
    model_store.load_model("wflw")
  assert not cache.exists()


# ---------------------------------------------------------------------------------------------
# The name at every entry that takes a checkpoint.

@pytest.fixture
def wflw_mirror(host, cache, monkeypatch):
  _mirror(monkeypatch, host, {WFLW_FILE: _fixture_bytes()})
  return cache


def test_name_in_predict_and_predictor(wflw_mirror, tmp_path, capsys):
  from star_jax.commands import predict as predict_command
  from star_jax.deploy.inference import Predictor
  image = tmp_path / "astro.png"
  cv2.imwrite(str(image), skdata.astronaut()[..., ::-1])
  out = tmp_path / "out"
  assert predict_command.main(["--checkpoint", "wflw", str(image), "--out", str(out), "--box",
                       ASTRONAUT_FACE, "--batch_size", "1"]) == 0
  with open(out / "astro.json") as f:
    landmarks = np.asarray(json.load(f)["faces"][0]["landmarks"])
  assert landmarks.shape == (98, 2)
  assert "synthetic" not in capsys.readouterr().err       # a released model: no warning
  predictor = Predictor("wflw", batch_size=1)
  np.testing.assert_allclose(predictor.predict(skdata.astronaut(), [ASTRONAUT_FACE.split(",")])[0],
                             landmarks, atol=2e-3)


def test_name_in_export_and_finetune(wflw_mirror, tmp_path):
  from configs import wflw as wflw_config
  from star_jax.training import finetune
  from star_jax.commands import export as export_cli
  out = tmp_path / "wflw.onnx"
  assert export_cli.main(["--checkpoint", "wflw", "--format", "onnx", "--out", str(out)]) == 0
  with open(str(out) + ".json") as f:
    sidecar = json.load(f)
  assert sidecar["trained_on"] == "wflw" and sidecar["num_points"] == 98
  assert sidecar["source"]["checkpoint"] == WFLW_FILE
  assert sidecar["source"]["sha256"] == hashlib.sha256(_fixture_bytes()).hexdigest()

  config = wflw_config.get_config()
  config.init_from = "wflw"
  loaded = finetune.init_checkpoint(config)
  assert loaded.source == str(wflw_mirror / WFLW_FILE) and loaded.model.channels == 32


def test_name_in_evaluation(wflw_mirror):
  from configs import wflw as wflw_config
  from star_jax.training import eval_lib
  data_dir = os.path.join(FIXTURES, "official_wflw_data")
  config = wflw_config.get_config()
  config.data.test_tsv = os.path.join(data_dir, "test.tsv")
  config.data.image_dir = data_dir
  config.eval_batch_size = 4
  result = eval_lib.evaluate(config, "wflw", None, progress=False, verbose=False)
  expected = np.load(os.path.join(data_dir, "evaluate_expected_small.npz"))["nme"]
  assert result.metrics["checkpoint"] == str(wflw_mirror / WFLW_FILE)
  np.testing.assert_allclose(result.nme, expected, atol=5e-3)


def test_cli_error_contract_of_the_command(cache, capsys):
  assert cli.one_line(released.status("wflw")).startswith("wflw: not downloaded")
  assert released_command.main(["list"]) == 0
  # One line per released model: the three STAR models and the four HRNet face models.
  assert len(capsys.readouterr().out.strip().splitlines()) == 7


def test_name_in_the_web_page(wflw_mirror, tmp_path, capfd):
  from star_jax.deploy import web
  from tests.test_training_data import fake_page
  fake_page(tmp_path)
  server = web.PageServer("wflw", root=str(tmp_path))
  server.close()
  onnx_path = str(wflw_mirror / (os.path.splitext(WFLW_FILE)[0] + ".onnx"))
  assert server.model == onnx_path and server.info.trained_on == "wflw"
  assert server.info.num_points == 98
  assert "exporting the released wflw model" in capfd.readouterr().err
  again = web.PageServer("wflw", root=str(tmp_path))         # exported once
  again.close()
  assert again.model == onnx_path and "exporting" not in capfd.readouterr().err
