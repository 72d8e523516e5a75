"""Tests of the TFDS builders: stored face crops warp exactly like the original photos."""

import math
import os

import cv2
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from configs import base  # noqa: E402
from star_jax.data import embedded  # noqa: E402
from star_jax.foreign import original_formats  # noqa: E402
from star_jax.data import tfds_builders as tb  # noqa: E402
from star_jax.commands import tfds_builders as tb_command  # noqa: E402
from star_jax.errors import DataError  # noqa: E402

S = 256


def _crop_matrix(scale, cw, ch):
  # The official crop matrix, written out here: the scale*200 box onto S x S, centre at (S-1)/2.
  s = S / (scale * 200.0)
  mid = (S - 1) / 2
  return np.array([[s, 0, mid - s * cw], [0, s, mid - s * ch], [0, 0, 1]], np.float64)


def _augment_matrix(angle, scale, shift):
  c, s = scale * math.cos(angle), scale * math.sin(angle)
  mid = (S - 1) / 2
  return np.array([[c, -s, mid - c * mid + s * mid + shift[0]],
                   [s, c, mid - s * mid - c * mid + shift[1]], [0, 0, 1]], np.float64)


def _warp(image, m):
  return cv2.warpPerspective(image, m.astype(np.float32), (S, S), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory):
  """Embedded faces pasted into larger photos, so that the stored crop is a real cut-out."""
  root = tmp_path_factory.mktemp("tfds")
  src = embedded.ensure_embedded_dataset(str(root / "emb"), counts=(3, 0, 2))
  manual = root / "manual"
  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    rows = [line.rstrip("\n").split("\t") for line in open(getattr(src, f"{split}_tsv"))][1:]
    lines = [original_formats.header(98, True)]
    for k, row in enumerate(rows):
      face = cv2.imread(os.path.join(src.image_dir, row[0]))
      h, w = 1000, 1200
      # A smooth random backdrop, like a photo (i.i.d. pixel noise would defeat JPEG).
      low = rng.integers(0, 256, size=(h // 40, w // 40, 3), dtype=np.uint8)
      canvas = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
      # Faces near a border too, so that the stored crop is clipped by the image.
      ox, oy = [(40, 600), (880, 20), (500, 300)][k % 3]
      canvas[oy:oy + face.shape[0], ox:ox + face.shape[1]] = face
      rel = f"{split}/{k}.png"
      os.makedirs(manual / "images" / split, exist_ok=True)
      cv2.imwrite(str(manual / "images" / rel), canvas)
      lm = np.array(row[2].split(","), np.float64).reshape(98, 2) + [ox, oy]
      tags = [int(t) for t in row[6].split(",")]
      lines.append(original_formats.format_row(rel, lm, tags))
    (manual / f"{split}.tsv").write_text("\n".join(lines) + "\n")
  return manual


@pytest.fixture(scope="module")
def built(manual_dir, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds_data"))
  for name in ("png", "jpeg"):
    builder = tb.builder_for("wflw", data_dir=data_dir, config=name)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return data_dir


def _tsv_rows(path):
  return [line.rstrip("\n").split("\t") for line in open(path)][1:]


def test_margin_factor_by_hand():
  # 3 sigma: rotation 54 deg (> 45, so |cos|+|sin| peaks at sqrt 2), zoom 0.7, shift 0.15 S.
  expected = (math.sqrt(2) / 2 + math.sqrt(2) * 0.15) / 0.7
  assert tb.margin_factor() == pytest.approx(expected)
  # Rotation below 45 degrees: the rotated square's half-extent is (cos + sin) / 2.
  assert tb.margin_factor(10.0, 0.0, 0.0) == pytest.approx(
      (math.cos(math.radians(30)) + math.sin(math.radians(30))) / 2)


@pytest.mark.parametrize("encoding", ["png", "jpeg"])
def test_records_reproduce_the_original_crops(built, manual_dir, encoding):
  cfg = base.get_base_config("wflw")
  cfg.data.tfds_data_dir = built
  rows = _tsv_rows(manual_dir / "test.tsv")
  builder = tb.prepared_builder(cfg, encoding)
  records = list(tb.load_records(builder, "test").as_numpy_iterator())
  assert sorted(r["index"] for r in records) == list(range(len(rows)))
  # The official augmentation spreads, written out (the margin must cover 3 sigma of them).
  sigma = dict(rotation_sigma_deg=18.0, scale_sigma=0.1, shift_sigma=0.05)
  extremes = [(0.0, 1.0, (0.0, 0.0))] + [
      (a * math.radians(3 * sigma["rotation_sigma_deg"]), 1 - 3 * sigma["scale_sigma"],
       (sx * 3 * sigma["shift_sigma"] * (S - 1), sy * 3 * sigma["shift_sigma"] * (S - 1)))
      for a, sx, sy in ((1, 1, 1), (-1, -1, 1), (1, -1, -1), (-1, 1, -1))]
  for rec in records:
    assert set(rec) == {"pixels", "landmarks", "scale", "center", "offset", "tags", "index",
                        "path"}
    rec["image"] = rec["pixels"]
    assert rec["image"].dtype == np.uint8 and rec["image"].shape[2] == 3
    row = rows[rec["index"]]
    original = cv2.imread(str(manual_dir / "images" / row[0]))[..., ::-1]  # RGB
    lm = np.array(row[2].split(","), np.float64).reshape(98, 2)
    scale, cw, ch = float(row[3]), float(row[4]), float(row[5])
    # Landmarks and centre are shifted into the crop frame by the offset.
    np.testing.assert_allclose(rec["landmarks"] + rec["offset"], lm, atol=2e-4)
    np.testing.assert_allclose(rec["center"] + rec["offset"], (cw, ch), atol=1e-9)
    assert rec["scale"] == pytest.approx(scale)
    np.testing.assert_array_equal(rec["tags"], [int(t) for t in row[6].split(",")])
    assert rec["path"].decode() == row[0]
    # The stored crop is a real cut-out, smaller than the photo.
    assert rec["image"].shape[0] * rec["image"].shape[1] < original.shape[0] * original.shape[1]
    for angle, zoom, shift in extremes:
      g = _augment_matrix(angle, zoom, shift)
      want = _warp(original, g @ _crop_matrix(scale, cw, ch)).astype(np.int32)
      got = _warp(rec["image"], g @ _crop_matrix(scale, *rec["center"])).astype(np.int32)
      diff = np.abs(want - got)
      if encoding == "png":   # lossless: equal up to float32 matrix rounding in the warp
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (angle, diff.max())
      else:                   # JPEG quality 95 re-encoding of a noisy photo
        assert diff.mean() < 3.0, (angle, diff.mean())
    # Mirroring the stored crop about its own width is the official mirror of the photo.
    want = _warp(original[:, ::-1].copy(),
                 _crop_matrix(scale, original.shape[1] - 1 - cw, ch)).astype(np.int32)
    crop = rec["image"]
    got = _warp(crop[:, ::-1].copy(),
                _crop_matrix(scale, crop.shape[1] - 1 - rec["center"][0],
                             rec["center"][1])).astype(np.int32)
    limit = 1 if encoding == "png" else 3.0
    assert (np.abs(want - got).max() if encoding == "png"
            else np.abs(want - got).mean()) <= limit


def test_300w_test_subsets_follow_the_path_rule_below_the_dataset_root(tmp_path):
  # The dataset root's own name contains 'ibug' (as many 300W downloads do): it must not decide.
  manual = tmp_path / "ibug_300W_large_face_landmark_dataset"
  rng = np.random.default_rng(3)
  layout = {"train": ["afw/a.png", "lfpw/trainset/b.png"],
            "test": ["lfpw/testset/c.png", "ibug/d.png", "helen/testset/e.png"]}
  for split, paths in layout.items():
    lines = [original_formats.header(68, False)]
    for rel in paths:
      os.makedirs(manual / "images" / os.path.dirname(rel), exist_ok=True)
      cv2.imwrite(str(manual / "images" / rel), rng.integers(0, 256, (60, 50, 3), np.uint8))
      lm = rng.uniform(10, 40, size=(68, 2))
      lines.append(original_formats.format_row(rel, lm, None,
                                               five_points=original_formats.FIVE_POINTS["300w"]))
    (manual / f"{split}.tsv").write_text("\n".join(lines) + "\n")
  assert tb_command.main(["300w", "--manual_dir", str(manual), "--data_dir", str(tmp_path / "data"),
                  "--config", "png"]) == 0
  cfg = base.get_base_config("300w")
  cfg.data.tfds_data_dir = str(tmp_path / "data")
  builder = tb.prepared_builder(cfg)
  def indices(split):
    return sorted(int(r["index"]) for r in tb.load_records(builder, split).as_numpy_iterator())
  assert indices("train") == [0, 1]
  assert indices("test") == [0, 1, 2]
  assert indices("test_common") == [0, 2]
  assert indices("test_challenge") == [1]


def test_unprepared_dataset_error_says_how_to_build(tmp_path):
  cfg = base.get_base_config("cofw")
  cfg.data.tfds_data_dir = str(tmp_path)
  with pytest.raises(DataError, match="python -m star_jax.data.tfds_builders cofw"):
    tb.prepared_builder(cfg)


def test_manual_dir_without_test_tsv_is_a_one_line_error(tmp_path, capsys):
  (tmp_path / "manual").mkdir()
  with pytest.raises(SystemExit) as info:
    tb_command.main(["wflw", "--manual_dir", str(tmp_path / "manual"), "--data_dir",
             str(tmp_path / "data")])
  assert info.value.code == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "train.tsv is missing" in err and err.count("\n") == 1
