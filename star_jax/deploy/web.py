"""`python -m star_jax.web --model PATH.onnx|NAME [--port N]`: the in-browser demo, served locally.

The page (`web/` in the source tree: HTML, JavaScript, and onnxruntime-web installed there by
`make web`) is static; this module only serves it, with the standard library's `http.server`
on 127.0.0.1, and maps the exported model and its sidecar to `/model.onnx` and
`/model.onnx.json`, which the page loads by default. Every response carries the
cross-origin-isolation headers (COOP `same-origin`, COEP `require-corp`): without them a browser
withholds SharedArrayBuffer and onnxruntime-web runs on one thread. The photo and the webcam
stay in the browser; nothing but these files crosses the socket. A model trained only on the
embedded synthetic faces says so in one warning line when it is served.

    python -m star_jax.web --model wflw               # the released WFLW model, exported once
    python -m star_jax.export --checkpoint runs/demo --format onnx --out demo.onnx
    python -m star_jax.web --model demo.onnx          # prints http://127.0.0.1:8000/
    python -m star_jax.web --model demo.onnx --image face.jpg --box 120,80,260,240

`serve(model, port=0)` starts the same server in a thread (tests, benchmarks). Exit status: 0
after Ctrl-C, 1 for an unreadable model or sidecar, 2 for a wrong flag, a busy port, or a page
whose runtime is not installed.
"""

from __future__ import annotations

import logging
import functools
import http.server
import json
import os
import posixpath
import shutil
import sys
import tempfile
import threading
import urllib.parse
from typing import Mapping

from star_jax.core import schemes as datasets
from star_jax.errors import CheckpointError, UsageError
from star_jax.deploy.runtime import contract

_log = logging.getLogger(__name__)

# The page lives in the source tree's web/, two folders above star_jax/deploy/.
WEB_ROOT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "web")
# What `make web` (npm ci in web/) installs and the page imports.
RUNTIME_DIR = os.path.join("node_modules", "onnxruntime-web", "dist")
RUNTIME_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
MODEL_URL = "/model.onnx"
DEFAULT_PORT = 8000
ISOLATION_HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def check_page(root: str = WEB_ROOT) -> None:
  """Raises UsageError unless the page and the runtime it imports are in `root`."""
  if not os.path.isfile(os.path.join(root, "index.html")):
    raise UsageError(f"{root}: the page (web/index.html) is not there; run python -m "
                     "star_jax.web from a source checkout of star-jax")
  missing = [name for name in RUNTIME_FILES
             if not os.path.isfile(os.path.join(root, RUNTIME_DIR, name))]
  if missing:
    raise UsageError(f"{os.path.join(root, RUNTIME_DIR, missing[0])} is missing: install the "
                     "page's runtime with `make web` (npm ci in web/)")


def released_onnx(name: str) -> str:
  """An ONNX export of the released model `name` (`star_jax.deploy.released`), made once in the
  cache
  beside its checkpoint and made again when the checkpoint's sha256 changes."""
  from star_jax.training import model_store
  from star_jax.deploy import released
  from star_jax.deploy.export import exporter
  release = released.get(name)
  checkpoint = released.ensure(name)
  out = os.path.splitext(checkpoint)[0] + ".onnx"
  sidecar = contract.sidecar_path(out)
  expected = released.sha256_of(checkpoint)
  if os.path.isfile(out) and os.path.isfile(sidecar):
    try:
      with open(sidecar, encoding="utf-8") as f:
        if json.load(f)["source"]["sha256"] == expected:
          return out
    except (OSError, ValueError, KeyError, TypeError):
      pass  # unreadable or foreign: made again below
  _log.warning(f"exporting the released {release.name} model to {out} (once)")
  staging = tempfile.mkdtemp(dir=os.path.dirname(out), prefix=".export.")
  try:
    staged = os.path.join(staging, os.path.basename(out))
    exporter.export(model_store.load_model(release.name), "onnx", staged)
    os.replace(staged, out)   # the model first: a sidecar that matches always has its model
    os.replace(contract.sidecar_path(staged), sidecar)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return out


def resolve_model(model: str, root: str = WEB_ROOT) -> str:
  """`model` itself, or for the name of a released model ('wflw', '300w', 'cofw') that is not
  a file here, its ONNX export in the cache (downloaded and exported on first use, once the
  page in `root` is known to be there)."""
  from star_jax.deploy import released
  if not os.path.exists(model) and released.lookup(model) is not None:
    check_page(root)
    return released_onnx(model)
  return model


def check_model(model: str) -> contract.ModelInfo:
  """The sidecar of an ONNX export the page can run; CheckpointError/UsageError otherwise."""
  if not os.path.isfile(model):
    raise CheckpointError(f"--model {model}: no such file")
  info = contract.read_sidecar(model)
  if info.format != "onnx":
    raise UsageError(f"--model {model}: a {info.format} export; the page runs ONNX exports "
                     "(python -m star_jax.export --format onnx)")
  if contract.LANDMARKS_NAME not in info.outputs:
    raise CheckpointError(f"{contract.sidecar_path(model)}: the model has no "
                          f"'{contract.LANDMARKS_NAME}' output")
  _check_onnx_file(model)
  return info


def _check_onnx_file(model: str) -> None:
  """CheckpointError unless `model` parses as an ONNX graph (when the onnx package is there;
  without it, at least a non-empty file), so that the page is not served a model it cannot
  load."""
  if os.path.getsize(model) == 0:
    raise CheckpointError(f"--model {model}: an empty file")
  try:
    import onnx
  except ImportError:
    return
  try:
    proto = onnx.load(model, load_external_data=False)
  except Exception as e:  # noqa: BLE001 (any parse failure of a stranger's file is data)
    raise CheckpointError(f"--model {model}: not an ONNX model ({type(e).__name__})") from None
  if not proto.graph.node:
    raise CheckpointError(f"--model {model}: not an ONNX model (no graph)")


IDLE_TIMEOUT_S = 20.0
MAX_CONNECTIONS = 32


class _Handler(http.server.SimpleHTTPRequestHandler):
  """Static files of the page, a few routed files (the model), isolation headers."""

  extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                    ".mjs": "text/javascript", ".js": "text/javascript",
                    ".wasm": "application/wasm", ".json": "application/json",
                    ".onnx": "application/octet-stream", ".css": "text/css",
                    ".y4m": "application/octet-stream"}

  def __init__(self, *args, routes: Mapping[str, str], quiet: bool, **kwargs):
    self.routes = routes
    self.quiet = quiet
    super().__init__(*args, **kwargs)

  # Seconds a connection may stay idle (a half-sent request included) before it is closed, so
  # that idle connections cannot hold the server's threads.
  timeout = IDLE_TIMEOUT_S

  def send_head(self):
    try:
      path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path, errors="strict")
    except (UnicodeDecodeError, ValueError):
      path = "\x00"  # not a path any file of the page has
    if any(ord(c) < 32 for c in path):
      self.send_error(400, "Bad request path")
      return None
    return super().send_head()

  def translate_path(self, path: str) -> str:
    route = posixpath.normpath(urllib.parse.unquote(urllib.parse.urlsplit(path).path))
    if route in self.routes:
      return self.routes[route]
    return super().translate_path(path)

  def list_directory(self, path):
    self.send_error(404, "No listing")  # the page's files are known by name; nothing to browse
    return None

  def end_headers(self) -> None:
    for name, value in ISOLATION_HEADERS.items():
      self.send_header(name, value)
    # A re-exported model under the same name must not come from a stale cache.
    self.send_header("Cache-Control", "no-cache")
    super().end_headers()

  def log_message(self, format: str, *args) -> None:
    if not self.quiet:
      super().log_message(format, *args)


class _Server(http.server.ThreadingHTTPServer):
  daemon_threads = True

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

  def process_request(self, request, client_address):
    # At most MAX_CONNECTIONS handler threads: a further connection waits for a slot (each
    # slot is freed within IDLE_TIMEOUT_S by an idle client).
    self._slots.acquire()
    try:
      super().process_request(request, client_address)
    except BaseException:
      self._slots.release()
      raise

  def process_request_thread(self, request, client_address):
    try:
      super().process_request_thread(request, client_address)
    finally:
      self._slots.release()

  def handle_error(self, request, client_address) -> None:
    # A browser that drops a connection (a reload, a closed tab) is not an error worth a
    # traceback.
    if isinstance(sys.exc_info()[1], ConnectionError):
      return
    super().handle_error(request, client_address)


class PageServer:
  """The page and `model` on http://127.0.0.1:PORT/, served from a background thread.

  `routes` maps more URL paths to files (tests serve their images this way).
  """

  def __init__(self, model: str, *, port: int = 0, root: str = WEB_ROOT,
               routes: Mapping[str, str] | None = None, quiet: bool = True):
    resolved = resolve_model(model, root)
    self.model = resolved
    self.info = check_model(resolved)
    check_page(root)
    warning = datasets.synthetic_warning(self.info.trained_on, resolved)
    if warning:
      _log.warning(warning)
    all_routes = {MODEL_URL: os.path.abspath(model),
                  MODEL_URL + ".json": os.path.abspath(contract.sidecar_path(model))}
    all_routes.update({posixpath.normpath(k): os.path.abspath(v)
                       for k, v in (routes or {}).items()})
    handler = functools.partial(_Handler, directory=root, routes=all_routes, quiet=quiet)
    try:
      self.httpd = _Server(("127.0.0.1", int(port)), handler)
    except OSError as e:
      raise UsageError(f"--port {port}: cannot listen on 127.0.0.1:{port} "
                       f"({e.strerror or e})") from None
    self.port = self.httpd.server_address[1]
    self.url = f"http://127.0.0.1:{self.port}/"
    self._thread: threading.Thread | None = None

  def start(self) -> "PageServer":
    if self._thread is not None:
      return self
    self._thread = threading.Thread(target=self.httpd.serve_forever, name="star-jax-web",
                                    daemon=True)
    self._thread.start()
    return self

  def close(self) -> None:
    if self._thread is not None:
      self.httpd.shutdown()
      self._thread.join()
      self._thread = None
    self.httpd.server_close()

  def __enter__(self) -> "PageServer":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.close()


def serve(model: str, *, port: int = 0, routes: Mapping[str, str] | None = None,
          quiet: bool = True) -> PageServer:
  """Starts the page server in a thread; `.url` is its address, `.close()` stops it."""
  return PageServer(model, port=port, routes=routes, quiet=quiet).start()
