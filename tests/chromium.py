"""Headless Chromium driven over the DevTools protocol on a pipe, for tests and benchmarks.

Chromium's `--remote-debugging-pipe` reads protocol messages (JSON, each ended by a NUL byte)
from file descriptor 3 and writes to descriptor 4, so the standard library is enough: no
WebSocket client, no browser build downloaded by an npm package. The browser is the system's
(Debian's `chromium`); `find_chromium()` returns None when there is none, and callers skip.

Every browser gets a fresh profile directory and the flags a machine without outside network
needs (no background networking, component updates, sync or QUIC).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Sequence

CHROMIUM_ENV = "STAR_JAX_CHROMIUM"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
BASE_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", "--mute-audio", "--window-size=1280,900")
# A fake webcam that needs no permission prompt; add --use-file-for-fake-video-capture=F.y4m
# for a clip of your own (Chromium's own test pattern otherwise).
FAKE_CAMERA_FLAGS = ("--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream")


class BrowserError(RuntimeError):
  """The browser died, timed out, or a page script threw."""


def find_chromium() -> str | None:
  """`$STAR_JAX_CHROMIUM`, else the first Chromium on PATH, else None."""
  configured = os.environ.get(CHROMIUM_ENV)
  if configured:
    return configured if os.access(configured, os.X_OK) else None
  for name in CHROMIUM_NAMES:
    found = shutil.which(name)
    if found:
      return found
  return None


def _pipe_above_4() -> tuple[int, int]:
  """os.pipe() with both ends numbered 10 or more, so that putting the browser's ends on 3 and 4
  cannot overwrite one of them."""
  ends = []
  for fd in os.pipe():
    ends.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10))
    os.close(fd)
  return ends[0], ends[1]


class Chromium:
  """One headless browser; `open(url)` gives a `Page`. Use as a context manager."""

  def __init__(self, executable: str, flags: Sequence[str] = (), *, timeout: float = 60.0):
    self.timeout = timeout
    self.profile = tempfile.mkdtemp(prefix="star-jax-chromium-")
    to_browser_read, self._to_browser = _pipe_above_4()
    self._from_browser, from_browser_write = _pipe_above_4()
    command = [executable, *BASE_FLAGS, *flags, f"--user-data-dir={self.profile}",
               "--remote-debugging-pipe", "about:blank"]
    # A small Python trampoline puts the two pipe ends on descriptors 3 and 4, where Chromium
    # expects them, and becomes the browser (no preexec_fn: the caller may run threads).
    trampoline = ("import os, sys; r, w = int(sys.argv[1]), int(sys.argv[2]); os.dup2(r, 3); "
                  "os.dup2(w, 4); os.close(r); os.close(w); os.execv(sys.argv[3], sys.argv[3:])")
    self.log = tempfile.TemporaryFile()
    self.process = subprocess.Popen(
        [sys.executable, "-c", trampoline, str(to_browser_read), str(from_browser_write),
         *command], stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
        pass_fds=(to_browser_read, from_browser_write))
    os.close(to_browser_read)
    os.close(from_browser_write)
    self._next_id = 0
    self._lock = threading.Lock()
    self._replies: dict[int, queue.Queue] = {}
    self.events: list[dict] = []
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()
    self.version = self.call("Browser.getVersion")["product"]

  def _read(self) -> None:
    buffer = b""
    while True:
      try:
        chunk = os.read(self._from_browser, 1 << 16)
      except OSError:
        chunk = b""
      if not chunk:
        with self._lock:
          for waiting in self._replies.values():
            waiting.put({"error": {"message": "the browser closed the connection"}})
        return
      buffer += chunk
      while b"\0" in buffer:
        raw, buffer = buffer.split(b"\0", 1)
        message = json.loads(raw)
        if "id" in message:
          with self._lock:
            waiting = self._replies.pop(message["id"], None)
          if waiting is not None:
            waiting.put(message)
        else:
          self.events.append(message)

  def call(self, method: str, params: dict | None = None, *, session: str | None = None,
           timeout: float | None = None) -> dict:
    """Sends one protocol command and returns its result; BrowserError on an error reply."""
    with self._lock:
      self._next_id += 1
      ident = self._next_id
      waiting: queue.Queue = queue.Queue()
      self._replies[ident] = waiting
    message = {"id": ident, "method": method, "params": params or {}}
    if session:
      message["sessionId"] = session
    try:
      os.write(self._to_browser, json.dumps(message).encode() + b"\0")
    except OSError as e:
      raise BrowserError(f"{method}: the browser is gone ({e}); {self.output()}") from None
    try:
      reply = waiting.get(timeout=timeout or self.timeout)
    except queue.Empty:
      raise BrowserError(f"{method}: no reply in {timeout or self.timeout} s") from None
    if "error" in reply:
      raise BrowserError(f"{method}: {reply['error'].get('message')} {self.output()}")
    return reply.get("result", {})

  def open(self, url: str) -> "Page":
    target = self.call("Target.createTarget", {"url": url})["targetId"]
    session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})
    page = Page(self, target, session["sessionId"])
    page.call("Runtime.enable")
    return page

  def output(self) -> str:
    """The browser's own log (stderr), last lines."""
    self.log.seek(0)
    lines = self.log.read().decode(errors="replace").strip().splitlines()
    return " | ".join(lines[-5:])

  def close(self) -> None:
    if self.process.poll() is None:
      try:
        self.call("Browser.close", timeout=10)
      except BrowserError:
        pass
      try:
        self.process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()
    for fd in (self._to_browser, self._from_browser):
      try:
        os.close(fd)
      except OSError:
        pass
    self.log.close()
    shutil.rmtree(self.profile, ignore_errors=True)

  def __enter__(self) -> "Chromium":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class Page:
  """A tab: evaluate JavaScript (awaiting promises), take screenshots."""

  def __init__(self, browser: Chromium, target: str, session: str):
    self.browser = browser
    self.target = target
    self.session = session

  def call(self, method: str, params: dict | None = None, **kwargs) -> dict:
    return self.browser.call(method, params, session=self.session, **kwargs)

  def evaluate(self, expression: str, *, timeout: float | None = None) -> Any:
    """The JSON value of `expression` (a promise is awaited); BrowserError if it throws."""
    result = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                            "returnByValue": True}, timeout=timeout)
    if "exceptionDetails" in result:
      details = result["exceptionDetails"]
      text = details.get("exception", {}).get("description") or details.get("text")
      raise BrowserError(f"page script failed: {text}; console: {self.console()}")
    return result["result"].get("value")

  def wait_for(self, expression: str, *, timeout: float = 60.0, interval: float = 0.1) -> Any:
    """Polls `expression` until it is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
      value = self.evaluate(expression, timeout=timeout)
      if value:
        return value
      if time.monotonic() > deadline:
        raise BrowserError(f"timed out waiting for {expression}; console: {self.console()}")
      time.sleep(interval)

  def screenshot(self, path: str) -> str:
    data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
    with open(path, "wb") as f:
      f.write(base64.b64decode(data))
    return path

  def console(self) -> str:
    """Console messages and uncaught exceptions of this page so far, joined."""
    lines = []
    for event in self.browser.events:
      if event.get("sessionId") != self.session:
        continue
      if event["method"] == "Runtime.consoleAPICalled":
        args = event["params"].get("args", [])
        lines.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
      elif event["method"] == "Runtime.exceptionThrown":
        details = event["params"]["exceptionDetails"]
        lines.append(details.get("exception", {}).get("description") or details.get("text"))
    return " | ".join(lines[-10:]) or "(empty)"
