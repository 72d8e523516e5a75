"""The Python API: `from star_jax import Predictor` without loading JAX, the pictures
`predict` takes (arrays, grey, BGR, PIL images, paths), one-line errors for the rest, and the
README's three-line example run as written."""

from __future__ import annotations

from tests.limits import LAST_GUARD_S

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

import star_jax
from star_jax.training import model_store
from star_jax.deploy import tracking
from star_jax.errors import UsageError
from star_jax.deploy.image_io import ImageError, as_rgb_image, load_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT = os.path.join(ROOT, "tests", "fixtures", "official_wflw_small", "checkpoint.pkl")
PHOTO = os.path.join(ROOT, "tests", "fixtures", "official_wflw_data", "images",
                     "face_640x480.jpg")
BOX = [(150, 60, 450, 420)]


@pytest.fixture(scope="module")
def predictor():
  return star_jax.Predictor(model_store.load_model(CHECKPOINT), batch_size=4)


def test_import_is_light_and_names_load_on_use():
  script = textwrap.dedent("""
      import json, sys
      import star_jax
      heavy = lambda: sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'jaxlib', 'flax',
                                                                      'tensorflow', 'cv2'})
      first = heavy()
      from star_jax import Predictor, RuntimePredictor
      import star_jax.deploy.inference, star_jax.deploy.runtime
      print(json.dumps({"first": first, "after": heavy(),
                        "same": [Predictor is star_jax.deploy.inference.Predictor,
                                 RuntimePredictor is star_jax.deploy.runtime.RuntimePredictor],
                        "listed": "Predictor" in dir(star_jax)}))
      """)
  run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                       timeout=LAST_GUARD_S)
  assert run.returncode == 0, run.stderr
  result = json.loads(run.stdout.strip().splitlines()[-1])
  # Nothing heavy on `import star_jax`; the predictor classes bring OpenCV, never JAX.
  assert result == {"first": [], "after": ["cv2"], "same": [True, True], "listed": True}
  with pytest.raises(AttributeError, match="no attribute 'Predicter'"):
    star_jax.Predicter  # noqa: B018


def test_pictures_become_rgb_uint8(tmp_path):
  rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
  # BGR: the channels reversed, pixel by pixel (literal values).
  bgr = np.array([[[2, 1, 0]]], np.uint8)
  np.testing.assert_array_equal(as_rgb_image(bgr, color="bgr"), [[[0, 1, 2]]])
  np.testing.assert_array_equal(as_rgb_image(rgb), rgb)
  grey = np.array([[0, 128], [255, 7]], np.uint8)
  expected_grey = np.repeat(grey[:, :, None], 3, axis=2)
  np.testing.assert_array_equal(as_rgb_image(grey), expected_grey)
  np.testing.assert_array_equal(as_rgb_image(grey[:, :, None]), expected_grey)
  np.testing.assert_array_equal(as_rgb_image(grey.astype(np.int64)), expected_grey)
  rgba = np.concatenate([rgb, np.full((2, 3, 1), 9, np.uint8)], axis=2)
  np.testing.assert_array_equal(as_rgb_image(rgba), rgb)
  np.testing.assert_array_equal(as_rgb_image(Image.fromarray(rgb)), rgb)
  np.testing.assert_array_equal(as_rgb_image(Image.fromarray(grey)), expected_grey)
  path = tmp_path / "face.png"
  cv2.imwrite(str(path), np.ascontiguousarray(rgb[:, :, ::-1]))
  np.testing.assert_array_equal(as_rgb_image(str(path)), rgb)
  np.testing.assert_array_equal(as_rgb_image(path), rgb)
  for image in (rgb, grey, str(path)):
    out = as_rgb_image(image)
    assert out.dtype == np.uint8 and out.shape[2] == 3 and out.flags.c_contiguous


@pytest.mark.parametrize("image, color, message", [
    (np.zeros((4, 4, 3), np.float32), "rgb", "float32 array; give uint8 values 0-255"),
    (np.zeros((4, 4, 2), np.uint8), "rgb", r"shape \(4, 4, 2\)"),
    (np.zeros((0, 4, 3), np.uint8), "rgb", r"shape \(0, 4, 3\)"),
    (np.zeros((2, 4, 4, 3), np.uint8), "rgb", r"shape \(2, 4, 4, 3\)"),
    (np.full((4, 4), 300, np.int32), "rgb", "values 300..300"),
    (None, "rgb", "got NoneType"),
    (b"\x89PNG", "rgb", "got bytes"),
    (np.zeros((4, 4, 3), np.uint8), "hsv", "color='hsv'"),
    (PHOTO, "bgr", "color='bgr' applies to arrays"),
])
def test_wrong_pictures_are_one_line_usage_errors(image, color, message):
  with pytest.raises(UsageError, match=message) as caught:
    as_rgb_image(image, color=color)
  assert "\n" not in str(caught.value)


def test_a_missing_path_names_the_file(tmp_path):
  missing = str(tmp_path / "nope.jpg")
  with pytest.raises(ImageError, match=re.escape(missing) + ": no such file"):
    as_rgb_image(missing)


def test_predict_takes_every_picture_alike(predictor):
  rgb = load_image(PHOTO)
  expected = predictor.predict(rgb, boxes=BOX)
  assert len(expected) == 1 and expected[0].shape == (98, 2)
  for image, color in [(PHOTO, "rgb"), (pathlib.Path(PHOTO), "rgb"), (Image.open(PHOTO), "rgb"),
                       (np.ascontiguousarray(rgb[:, :, ::-1]), "bgr")]:
    got = predictor.predict(image, boxes=BOX, color=color)
    np.testing.assert_array_equal(got[0], expected[0])
  # BGR taken as RGB is another picture: the argument matters.
  swapped = predictor.predict(np.ascontiguousarray(rgb[:, :, ::-1]), boxes=BOX)
  assert not np.array_equal(swapped[0], expected[0])
  with pytest.raises(UsageError, match="got a 0-d <U9 array"):
    predictor.predict(np.asarray("photo.jpg"), boxes=BOX)


def test_grey_photo_through_the_detector(predictor):
  """A 2-D grey array is detected and predicted as its three-channel copy (it crashed the
  network after detection)."""
  grey = cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2GRAY)
  faces = predictor.predict(grey)
  assert faces and all(f.shape == (98, 2) for f in faces)
  np.testing.assert_array_equal(np.stack(faces),
                                np.stack(predictor.predict(np.stack([grey] * 3, axis=2))))
  # The fixture's random weights scatter the points, which the tracker rightly calls lost; the
  # input path is what is tested here, so that rule is off.
  keep = tracking.TrackerConfig(lost_max_segment=float("inf"))
  tracked = list(predictor.track([grey[:, :, None]], config=keep))
  assert len(tracked[0]) == len(faces)


def test_readme_python_example_runs(tmp_path):
  readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S)
            if "from star_jax import Predictor" in b]
  assert len(blocks) == 1
  code = textwrap.dedent(blocks[0])
  assert len(code.strip().splitlines()) == 3
  # The released model's name stands for the fixture checkpoint (no network in tests).
  code = code.replace('Predictor("wflw")', f"Predictor({CHECKPOINT!r})")
  code = code.replace('"photo.jpg"', repr(PHOTO) + ", boxes=" + repr(BOX))
  script = code + "\nimport json; print(json.dumps([f.shape for f in faces]))\n"
  run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                       timeout=LAST_GUARD_S)
  assert run.returncode == 0, run.stderr[-3000:]
  assert json.loads(run.stdout.strip().splitlines()[-1]) == [[98, 2]]
