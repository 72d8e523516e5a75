"""The installed environment is the locked one (constraints.txt), and the install split holds.

The suite's fidelity bounds and the figures in benchmarks/RESULTS.md were measured with the
versions in constraints.txt; a package that moved (OpenCV 5.1 changes the official crop by one
grey level on some pixels) is a deliberate update of that file, never an accident of a fresh
install. The base install (pyproject's `dependencies` plus `[runtime]`) is the inference-only
one: it must stay free of JAX, TensorFlow and TFDS.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Distributions that must never be needed by the inference-only install.
HEAVY = {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "tensorflow",
         "tensorflow-cpu", "tensorflow-datasets", "torch", "scipy", "matplotlib",
         "scikit-image", "clu", "absl-py", "ml-collections"}


def _canonical(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _locked() -> dict[str, str]:
  pins = {}
  with open(os.path.join(ROOT, "constraints.txt")) as f:
    for number, line in enumerate(f, 1):
      line = line.split("#", 1)[0].strip()
      if not line:
        continue
      name, sep, version = line.partition("==")
      assert sep and version, f"constraints.txt:{number}: not an exact pin: {line!r}"
      pins[_canonical(name)] = version.strip()
  return pins


def _requirement_name(requirement: str) -> str:
  return _canonical(re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0))


def test_installed_versions_equal_the_lock():
  differences = []
  for name, version in sorted(_locked().items()):
    try:
      installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      differences.append(f"{name}: locked {version}, not installed")
      continue
    if installed != version:
      differences.append(f"{name}: locked {version}, installed {installed}")
  assert not differences, (
      "the environment differs from constraints.txt (reinstall with `make install`, or renew the "
      "lock on purpose with `make lock` and re-measure):\n  " + "\n  ".join(differences))


def test_every_direct_dependency_is_locked():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  locked = _locked()
  wanted = list(project["dependencies"])
  for extra in ("runtime", "train", "test", "export"):
    wanted += project["optional-dependencies"][extra]
  missing = sorted({_requirement_name(r) for r in wanted} - set(locked))
  assert not missing, f"in pyproject.toml but not in constraints.txt: {missing}"


def test_inference_only_install_names_no_heavy_package():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  light = project["dependencies"] + project["optional-dependencies"]["runtime"]
  assert not {_requirement_name(r) for r in light} & HEAVY, light


def test_official_crop_fixtures_are_held_to_the_locked_opencv():
  import cv2
  assert cv2.__version__ == "5.0.0", (
      f"OpenCV {cv2.__version__}: the official crop fixtures agree with OpenCV 5.0.0 "
      "(opencv-python-headless 5.0.0.93) to the pixel; a newer OpenCV is a deliberate, "
      "re-measured update of constraints.txt")
  assert _locked()["opencv-python-headless"] == "5.0.0.93"
