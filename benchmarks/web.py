"""The in-browser demo in headless Chromium: webcam-path frames per second and page weight.

    python -m benchmarks.web [--models rt64,full] [--seconds 15] [--record]

Each model (random weights: speed does not depend on them) is exported to ONNX (float32, and
`--quantize int8` for the `_int8` variants), served by `star_jax.deploy.web`, and opened in headless
Chromium with a fake webcam playing a 640x480 clip of a moving face (scikit-image's astronaut,
written as a .y4m file that Chromium loops at 30 frames/s). The page starts the webcam from a
box around the face and then tracks from each frame's landmarks, as a person sees it. After a
warm-up, the frames the page processed in `--seconds` give the fps (grab + crop + model + map
back + drawing; at most the clip's 30 frames/s, since the page waits for new frames); the
page's own medians give the model and frame times. Page weight: the bytes of every file the page
loaded (document, scripts, onnxruntime-web's WASM, model and sidecar), from the browser's
resource timing, uncompressed.

Models: `rt64` = 1 stack x 64 channels, 4 levels, 256 px (the small size of issue 13 at the
released input size), `rt64_128` = 1 stack x 64 channels, 3 levels, 128 px (the real-time
config's input), `full` = 4 stacks x 256 channels (the WFLW network); `_int8` = ONNX static int8.
Page settings (`--variants`): the page's default, or N onnxruntime-web WASM threads on the page's
thread or in onnxruntime-web's proxy worker (the page is cross-origin isolated, so threads work).
Nothing is written to benchmarks/RESULTS.md unless `--record` is given.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

if __package__ in (None, ""):  # `python benchmarks/web.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from benchmarks import common

# name -> (stacks, channels, levels, input size, quantize)
MODELS = {
    "rt64": (1, 64, 4, 256, None),
    "rt64_int8": (1, 64, 4, 256, "int8"),
    "rt64_128": (1, 64, 3, 128, None),
    "full": (4, 256, 4, 256, None),
    "full_int8": (4, 256, 4, 256, "int8"),
}
CLIP_SIZE = (640, 480)
CLIP_FRAMES = 60
CLIP_FPS = 30
# The face of scikit-image's astronaut (512 x 512), and the image's place in the clip.
ASTRONAUT_FACE = (175, 60, 290, 200)
CLIP_SCALE = 480 / 512
CLIP_OFFSET_X = 80
CLIP_SWAY_PX = 24
SIZE_TARGET_MB = 25.0


def _export(name: str, directory: str) -> str:
  from star_jax.deploy.export import exporter
  stacks, channels, levels, size, quantize = MODELS[name]
  loaded = common.random_wflw_model(name, stacks=stacks, channels=channels, levels=levels,
                                    image_size=size)
  path = os.path.join(directory, f"{name}.onnx")
  # int8 calibrates on crops of the embedded dataset at the model's input size.
  return exporter.export(loaded, "onnx", path, quantize=quantize).path


def write_clip(path: str) -> tuple[float, float, float, float]:
  """A looping .y4m clip of the astronaut swaying sideways; returns the face box of frame 0."""
  import cv2
  from skimage import data
  width, height = CLIP_SIZE
  face = cv2.resize(data.astronaut(), (480, 480), interpolation=cv2.INTER_AREA)
  with open(path, "wb") as f:
    f.write(f"YUV4MPEG2 W{width} H{height} F{CLIP_FPS}:1 Ip A1:1 C420jpeg\n".encode())
    for i in range(CLIP_FRAMES):
      # A full sine period over the clip, so that the loop has no jump.
      dx = int(round(CLIP_SWAY_PX * np.sin(2 * np.pi * i / CLIP_FRAMES)))
      frame = np.zeros((height, width, 3), np.uint8)
      frame[:, CLIP_OFFSET_X + dx:CLIP_OFFSET_X + dx + 480] = face
      f.write(b"FRAME\n" + cv2.cvtColor(frame, cv2.COLOR_RGB2YUV_I420).tobytes())
  x1, y1, x2, y2 = (v * CLIP_SCALE for v in ASTRONAUT_FACE)
  return x1 + CLIP_OFFSET_X, y1, x2 + CLIP_OFFSET_X, y2


PAGE_BYTES = """(() => {
  const entries = [...performance.getEntriesByType('navigation'),
                   ...performance.getEntriesByType('resource')];
  const sizes = {};
  for (const e of entries) sizes[new URL(e.name).pathname] = e.decodedBodySize;
  return sizes;
})()"""


def measure(browser, server, box, *, threads: int | None, seconds: float, warmup_frames: int,
            proxy: bool = False) -> dict:
  """fps and medians of the webcam path, and the page's bytes, for the served model."""
  query = f"?camera=1&box={','.join(f'{v:.1f}' for v in box)}"
  if threads:
    query += f"&threads={threads}"
  if proxy:
    query += "&proxy=1"
  page = browser.open(server.url + query)
  try:
    page.wait_for("window.starJax && window.starJax.ready.then(() => true)", timeout=300)
    info = page.evaluate("window.starJax.info()")
    page.wait_for(f"window.starJax.stats().frames >= {warmup_frames}", timeout=600)
    start_frames, start = page.evaluate("window.starJax.stats().frames"), time.monotonic()
    time.sleep(seconds)
    # At least three frames after the window, so slow models are measured over whole frames.
    stats = page.wait_for(f"window.starJax.stats().frames >= {start_frames + 3} && "
                          "window.starJax.stats()", timeout=600)
    elapsed = time.monotonic() - start
    page.evaluate("window.starJax.stopCamera()")
  finally:
    page.call("Page.close")
  return {"fps": (stats["frames"] - start_frames) / elapsed, "infer_ms": stats["inferMs"],
          "frame_ms": stats["frameMs"], "threads": info["threads"], "proxy": info["proxy"],
          "isolated": info["crossOriginIsolated"], "tracking": stats["tracking"]}


def page_weight(browser, server) -> dict[str, int]:
  """Bytes (uncompressed) of every file a fresh load of the page fetched, by URL path."""
  page = browser.open("about:blank")
  try:
    page.call("Network.enable")
    page.call("Network.setCacheDisabled", {"cacheDisabled": True})
    page.call("Page.navigate", {"url": server.url})
    page.wait_for("window.starJax && window.starJax.ready.then(() => true)", timeout=300)
    return page.evaluate(PAGE_BYTES)
  finally:
    page.call("Page.close")


def _runtime_version() -> str:
  import json
  from star_jax.deploy import web
  path = os.path.join(web.WEB_ROOT, "node_modules", "onnxruntime-web", "package.json")
  with open(path) as f:
    return json.load(f)["version"]


def _parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m benchmarks.web",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="rt64,rt64_int8,rt64_128,full",
                      help=f"comma-separated, of {', '.join(MODELS)}")
  parser.add_argument("--variants", default="default,1,2,1p,2p",
                      help="page settings to measure: 'default' (the page's own), N = N WASM "
                           "threads, Np = N threads in onnxruntime-web's proxy worker")
  parser.add_argument("--seconds", type=float, default=15.0, help="measuring window per row")
  parser.add_argument("--record", action="store_true", help="append the tables to RESULTS.md")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = _parse_args(argv)
  from star_jax.deploy import web
  from tests import chromium as chromium_lib
  chromium = chromium_lib.find_chromium()
  if chromium is None:
    print("no Chromium installed (apt-get install chromium)", file=sys.stderr)
    return 2
  web.check_page()
  names = [n for n in args.models.split(",") if n]
  unknown = [n for n in names if n not in MODELS]
  if unknown:
    print(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}", file=sys.stderr)
    return 2
  rows, weight_rows = [], []
  load = common.load_average()
  with tempfile.TemporaryDirectory(prefix="star-jax-web-bench-") as directory:
    clip = os.path.join(directory, "face.y4m")
    box = write_clip(clip)
    flags = (*chromium_lib.FAKE_CAMERA_FLAGS, f"--use-file-for-fake-video-capture={clip}")
    with chromium_lib.Chromium(chromium, flags, timeout=600) as browser:
      for name in names:
        path = _export(name, directory)
        slow = MODELS[name][1] >= 128
        with web.serve(path) as server:
          for variant in args.variants.split(","):
            if slow and variant not in ("default", "2"):
              continue  # minutes per row
            threads = None if variant == "default" else int(variant.rstrip("p"))
            result = measure(browser, server, box, threads=threads, proxy=variant.endswith("p"),
                             seconds=args.seconds, warmup_frames=2 if slow else 10)
            rows.append([name, MODELS[name][3], variant, result["threads"],
                         "yes" if result["proxy"] else "no", f"{result['fps']:.1f}",
                         f"{result['infer_ms']:.1f}", f"{result['frame_ms']:.1f}"])
            print(rows[-1], flush=True)
          sizes = page_weight(browser, server)
        model_bytes = sizes.get("/model.onnx", os.path.getsize(path))
        runtime_bytes = sum(v for k, v in sizes.items() if "onnxruntime-web" in k)
        page_bytes = sum(v for k, v in sizes.items()
                         if "onnxruntime-web" not in k and k != "/model.onnx")
        total = sum(sizes.values())
        weight_rows.append([name, f"{model_bytes / 2 ** 20:.2f}", f"{runtime_bytes / 2 ** 20:.2f}",
                            f"{page_bytes / 2 ** 10:.0f}", f"{total / 2 ** 20:.2f}",
                            "yes" if total / 2 ** 20 < SIZE_TARGET_MB else "no"])
        print(weight_rows[-1], sorted(sizes), flush=True)
  notes = (f"{browser.version} headless, onnxruntime-web {_runtime_version()} WASM (SIMD, "
           "threads), fake "
           f"webcam: {CLIP_SIZE[0]}x{CLIP_SIZE[1]} .y4m clip at {CLIP_FPS} frames/s (the page "
           "waits for each new frame, so 30 is the ceiling); fps over "
           f"{args.seconds:.0f} s after warm-up, tracking from landmarks; random weights; "
           f"at start: {load}. Targets: small "
           "model >= 15 fps, full >= 1 fps")
  common.record("In-browser demo, webcam path (headless Chromium, onnxruntime-web WASM)",
                ["model", "input px", "page setting", "WASM threads", "proxy worker", "fps",
                 "model ms (median)", "frame ms (median)"], rows, notes=notes,
                write=args.record)
  common.record("In-browser demo, page weight (uncompressed bytes the page loads)",
                ["model", "model MiB", "onnxruntime-web MiB", "page KiB", "total MiB",
                 f"< {SIZE_TARGET_MB:.0f} MB"], weight_rows,
                notes="model = the .onnx file; onnxruntime-web = ort.wasm.min.mjs + "
                      "ort-wasm-simd-threaded.mjs + .wasm; page = HTML, CSS, app.js, "
                      "geometry.js and the model's sidecar JSON", write=args.record)
  return 0


if __name__ == "__main__":
  sys.exit(main())
