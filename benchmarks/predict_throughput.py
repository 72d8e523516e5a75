"""Predictor throughput on a folder of photos, end to end, against the network alone.

    python -m benchmarks.predict_throughput [--models full,1x64] [--images 48] [--record]
    python benchmarks/predict_throughput.py --help

A folder of `--images` 640x480 JPEG photos (quality 90), each with one synthetic face of
120-200 pixels (frames of `star_jax.deploy.clips`), is written to a temporary folder. For each
model:

- network only: the images' face crops, cut beforehand, go through `Predictor.predict_crops`
  in batches of `--batch_size` (what the network alone sustains on this machine);
- end to end: `star_jax.deploy.predict.predict_files` on the folder: decoding and face detection in
  `--workers` threads, crops, batched network, landmarks mapped back to the photo, JSON and
  annotated PNG written in the background; the default detector (BlazeFace);
- end to end without the PNG (JSON only), to show what the picture costs.

Models have random weights (throughput does not depend on them): 'full' is the official
architecture (4 stacks x 256 channels, 256x256 input), '2x128' and '1x64' the real-time configs
(128x128 input). Each measurement follows a warm-up pass that compiles the network.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as `python benchmarks/predict_throughput.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2
import numpy as np

from benchmarks import common

MODELS = {"full": "configs/wflw.py", "2x128": "configs/realtime_2x128.py",
          "1x64": "configs/realtime_1x64.py"}


def loaded_model(name: str):
  """A `model_store.LoadedModel` with random weights for a model name of MODELS."""
  import jax
  from configs import base, realtime_1x64, realtime_2x128
  from star_jax.core import schemes as datasets
  from star_jax.training.model_store import LoadedModel
  from star_jax.models import create_model, init_variables
  config = {"full": lambda: base.get_base_config("wflw"),
            "2x128": realtime_2x128.get_config, "1x64": realtime_1x64.get_config}[name]()
  model = create_model(config.model, datasets.WFLW)
  variables = jax.device_put(init_variables(model, 0, config.data.image_size))
  return LoadedModel(model, variables, datasets.WFLW, int(config.data.image_size), config,
                     f"random {name}", "raw")


def write_folder(folder: str, count: int) -> list[str]:
  from star_jax.deploy import clips
  paths = []
  for k in range(count):
    clip = clips.moving_face_clip(1, face_side=120 + 80 * (k % 5) / 4, seed=k)
    path = os.path.join(folder, f"photo_{k:03d}.jpg")
    cv2.imwrite(path, clip.frames[0][..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    paths.append(path)
  return paths


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default="full,1x64", help=f"comma-separated of {list(MODELS)}")
  parser.add_argument("--images", type=int, default=48)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=2, help="timed passes (best is kept)")
  parser.add_argument("--record", action="store_true", help="append the table to RESULTS.md")
  args = parser.parse_args(argv)
  from star_jax.commands import host
  host.configure_process()
  from star_jax.deploy import predict
  from star_jax.deploy.image_io import load_image
  folder = tempfile.mkdtemp(prefix="star_jax_throughput_")
  load = common.load_average()
  rows = []
  try:
    images_dir = os.path.join(folder, "in")
    os.makedirs(images_dir)
    paths = write_folder(images_dir, args.images)
    for name in [n for n in args.models.split(",") if n]:
      predictor = predict.Predictor(loaded_model(name), batch_size=args.batch_size)
      plans = []
      for path in paths:
        image = load_image(path)
        plans.append((image, predictor.plan(image)))
      crops = np.concatenate([predictor.crops_at(image, plan[2])[0] for image, plan in plans])
      faces = len(crops)
      predictor.predict_crops(crops[:args.batch_size])  # compile
      out = os.path.join(folder, f"out_{name}")
      predict.predict_files(predictor, paths[:args.batch_size], out, progress=False,
                            workers=args.workers, log=lambda m: None)
      # Passes interleaved, so that load from other work on the machine hits all alike.
      network, results = [], {"end to end": [], "end to end, JSON only": []}
      for _ in range(args.repeats):
        t0 = time.perf_counter()
        predictor.predict_crops(crops)
        network.append(time.perf_counter() - t0)
        for label, png in (("end to end", True), ("end to end, JSON only", False)):
          shutil.rmtree(out, ignore_errors=True)
          t0 = time.perf_counter()
          reports = predict.predict_files(predictor, paths, out, progress=False, write_png=png,
                                          workers=args.workers, log=lambda m: None)
          results[label].append(time.perf_counter() - t0)
          assert sum(r.num_faces for r in reports) == faces, "detections changed between runs"
      results = {label: min(times) for label, times in results.items()}
      net_rate = len(paths) / min(network)
      rows.append([name, "network only (crops ready)", f"{net_rate:.2f}", "100 %", faces])
      for label, seconds in results.items():
        rate = len(paths) / seconds
        rows.append([name, label, f"{rate:.2f}", f"{100 * rate / net_rate:.0f} %", faces])
  finally:
    shutil.rmtree(folder, ignore_errors=True)
  common.record(
      "Predictor throughput on a folder (640x480 JPEG, one face each)",
      ["model", "path", "images/s", "of network-only", "faces"], rows,
      notes=(f"{args.images} images, batch {args.batch_size}, {args.workers} decode/detect "
             f"threads, best of {args.repeats} passes after a warm-up; random weights; default "
             f"detector; at start: {load}"),
      write=args.record)


if __name__ == "__main__":
  main()
