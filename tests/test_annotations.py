"""TSV reading: header detection, path rewriting, validation errors, image formats."""

import os
import shutil

import cv2
import numpy as np
import pytest

from star_jax.data import images as image_io
from star_jax.data.annotations import AnnotationError, read_tsv, rewrite_image_path
from star_jax.core.schemes import get_spec

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "official_wflw_data")
WFLW = get_spec("wflw")


def _rows(path):
  with open(path) as f:
    return [line.rstrip("\n").split("\t") for line in f if line.strip()]


def _write(path, rows, header=False):
  with open(path, "w") as f:
    if header:
      f.write("image_path\tlandmarks_5pts\tlandmarks_98\tscale\tcenter_w\tcenter_h\ttags\n")
    for row in rows:
      f.write("\t".join(row) + "\n")
  return str(path)


@pytest.fixture
def data_rows():
  """The three fixture rows with absolute image paths."""
  rows = _rows(os.path.join(FIXTURE, "test_noheader.tsv"))
  return [[os.path.join(FIXTURE, r[0])] + r[1:] for r in rows]


def test_header_and_headerless_keep_every_row():
  expected = np.load(os.path.join(FIXTURE, "dataset_eval_expected.npz"))
  with_header = read_tsv(os.path.join(FIXTURE, "test.tsv"), WFLW)
  without = read_tsv(os.path.join(FIXTURE, "test_noheader.tsv"), WFLW)
  assert len(with_header) == len(without) == 3
  for ann in (with_header, without):
    np.testing.assert_array_equal(ann.landmarks, expected["landmarks_gt"])
    np.testing.assert_array_equal(ann.scale, expected["scale"])
    np.testing.assert_array_equal(ann.center, expected["center"])
    np.testing.assert_array_equal(ann.tags, expected["tags"].astype(np.int32))
    assert [os.path.basename(p) for p in ann.image_paths] == [
        os.path.basename(p) for p in expected["image_path"]]
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in ann.image_paths)
  np.testing.assert_array_equal(with_header.line_numbers, [2, 3, 4])
  np.testing.assert_array_equal(without.line_numbers, [1, 2, 3])


def test_without_tags_column(tmp_path, data_rows):
  ann = read_tsv(_write(tmp_path / "a.tsv", [r[:6] for r in data_rows]), WFLW)
  assert not ann.has_tags
  np.testing.assert_array_equal(ann.tags, np.zeros((3, 6), np.int32))


def test_official_path_rewrites():
  assert rewrite_image_path("a\\b\\c.jpg") == "a/b/c.jpg"
  assert rewrite_image_path(
      "//msr-facestore/Workspace/MSRA_EP_Allergan/users/yanghuan/training_data/wflw/rawImages/"
      "0--Parade/x.jpg") == "0--Parade/x.jpg"
  assert rewrite_image_path("./rawImages/0--Parade/x.jpg") == "0--Parade/x.jpg"


def test_paths_resolve_through_prefixes_and_windows_separators(tmp_path, data_rows):
  image_dir = tmp_path / "imgs"
  (image_dir / "0--Parade").mkdir(parents=True)
  names = []
  for i, row in enumerate(data_rows):
    shutil.copy(row[0], image_dir / "0--Parade" / f"{i}.jpg")
    names.append(f"{i}.jpg")
  rows = [
      ["WFLW\\WFLW_images\\0--Parade\\0.jpg"] + data_rows[0][1:],
      ["./rawImages/0--Parade/1.jpg"] + data_rows[1][1:],
      ["//msr-facestore/Workspace/MSRA_EP_Allergan/users/yanghuan/training_data/wflw/rawImages/"
       "0--Parade/2.jpg"] + data_rows[2][1:],
  ]
  ann = read_tsv(_write(tmp_path / "a.tsv", rows), WFLW, image_dir=str(image_dir))
  assert ann.image_paths == [str(image_dir / "0--Parade" / n) for n in names]


def _error(tmp_path, rows, **kw):
  path = _write(tmp_path / "bad.tsv", rows, header=True)
  with pytest.raises(AnnotationError) as info:
    read_tsv(path, WFLW, **kw)
  return path, str(info.value)


def test_wrong_column_count(tmp_path, data_rows):
  rows = [data_rows[0], data_rows[1][:5]]
  path, msg = _error(tmp_path, rows)
  assert f"{path}:3" in msg and "columns" in msg and "got 5" in msg


def test_wrong_point_count(tmp_path, data_rows):
  bad = list(data_rows[1])
  bad[2] = ",".join(bad[2].split(",")[:-2])   # 97 points
  path, msg = _error(tmp_path, [data_rows[0], bad])
  assert f"{path}:3" in msg and "98 points" in msg and "97 points" in msg


def test_wrong_point_count_for_other_dataset(tmp_path, data_rows):
  path = _write(tmp_path / "a.tsv", data_rows)
  with pytest.raises(AnnotationError, match=r"a\.tsv:1: .*300w has 68 points"):
    read_tsv(path, get_spec("300w"))


@pytest.mark.parametrize("column,value,needle", [
    (2, "abc", "not a number"), (2, "nan", "not finite"), (3, "inf", "not finite"),
    (3, "x", "not a number"), (4, "1.0.0", "not a number"), (1, "1,2,3", "expected 10"),
    (6, "0,1", "expected 6"),
])
def test_bad_values_name_file_and_line(tmp_path, data_rows, column, value, needle):
  bad = list(data_rows[2])
  if column == 2:
    numbers = bad[2].split(",")
    numbers[7] = value
    bad[2] = ",".join(numbers)
  else:
    bad[column] = value
  path, msg = _error(tmp_path, [data_rows[0], data_rows[1], bad])
  assert f"{path}:4" in msg and needle in msg


def test_missing_images_are_all_listed(tmp_path, data_rows):
  rows = [["nowhere/a.jpg"] + data_rows[0][1:], data_rows[1],
          ["nowhere/b.png"] + data_rows[2][1:]]
  path, msg = _error(tmp_path, rows)
  assert "2 of 3 image files not found" in msg
  assert "line 2: nowhere/a.jpg" in msg and "line 4: nowhere/b.png" in msg
  # Without the check the rows are read and the paths joined to the TSV's folder.
  ann = read_tsv(path, WFLW, check_images=False)
  assert ann.image_paths[0] == os.path.join(str(tmp_path), "nowhere", "a.jpg")


def test_empty_file(tmp_path):
  path = tmp_path / "empty.tsv"
  path.write_text("image_path\tlandmarks_5pts\tlandmarks_98\tscale\tcenter_w\tcenter_h\n")
  with pytest.raises(AnnotationError, match="no annotation rows"):
    read_tsv(str(path), WFLW)


@pytest.mark.parametrize("ext", [".ppm", ".bmp", ".png", ".pgm", ".tif", ".webp"])
def test_any_opencv_format_decodes(tmp_path, ext):
  rng = np.random.default_rng(0)
  bgr = rng.integers(0, 256, (23, 31, 3), np.uint8)
  path = str(tmp_path / f"img{ext}")
  assert cv2.imwrite(path, bgr[..., 0] if ext == ".pgm" else bgr)
  expected = cv2.imread(path, cv2.IMREAD_COLOR)[..., ::-1]
  np.testing.assert_array_equal(image_io.read_image(path), expected)
  with open(path, "rb") as f:
    data = f.read()
  import tensorflow as tf
  np.testing.assert_array_equal(image_io.decode_tensor(tf.constant(data)).numpy(), expected)
  np.testing.assert_array_equal(image_io.image_size_tensor(tf.constant(data)).numpy(), [23, 31])
  window = image_io.decode_window_tensor(tf.constant(data), tf.constant([2, 3, 10, 12]))
  np.testing.assert_array_equal(window.numpy(), expected[2:12, 3:15])


def test_pillow_only_format_decodes(tmp_path):
  from PIL import Image
  rgb = np.random.default_rng(1).integers(0, 256, (9, 13, 3), np.uint8)
  path = str(tmp_path / "img.gif")
  Image.fromarray(rgb).save(path)
  expected = np.asarray(Image.open(path).convert("RGB"))
  np.testing.assert_array_equal(image_io.read_image(path), expected)


def test_jpeg_decode_matches_opencv():
  import tensorflow as tf
  for name in ("face_640x480.jpg", "face_300x300.jpg"):
    path = os.path.join(FIXTURE, "images", name)
    expected = cv2.imread(path, cv2.IMREAD_COLOR)[..., ::-1]
    data = tf.io.read_file(path)
    np.testing.assert_array_equal(image_io.decode_tensor(data).numpy(), expected)
    # A window with a margin from where it is used is exact (see images.py).
    window = image_io.decode_window_tensor(data, tf.constant([17, 29, 120, 140])).numpy()
    np.testing.assert_array_equal(window[:, 1:-1], expected[17:137, 30:168])
