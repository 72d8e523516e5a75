"""Tests of the converters from original WFLW / 300W / COFW files to official TSVs."""

import os

import cv2
import numpy as np
import pytest
import scipy.io

from star_jax.data import original_formats as of
from star_jax.datasets import get_spec


def _read(tsv):
  with open(tsv) as f:
    lines = [line.rstrip("\n") for line in f if line.strip()]
  return lines[0].split("\t"), [line.split("\t") for line in lines[1:]]


def _landmarks(row, n):
  return np.array(row[2].split(","), np.float64).reshape(n, 2)


# ---- crop rule -------------------------------------------------------------------------------


def test_crop_rules_by_hand():
  # Landmark box x 10..110 (w 100), y 20..220 (h 200).
  lm = np.array([[10.0, 20.0], [110.0, 220.0], [50.0, 100.0]])
  assert of.crop_params(lm, "max") == pytest.approx((1.05, 60.0, 120.0))
  assert of.crop_params(lm, "min") == pytest.approx((0.525, 60.0, 120.0))
  assert of.crop_params(lm, "height") == pytest.approx((1.0, 60.0, 120.0))
  assert of.crop_params(lm, "max", rect=(0, 0, 400, 100)) == pytest.approx((2.1, 200.0, 50.0))
  with pytest.raises(ValueError, match="crop_rule"):
    of.crop_params(lm, "area")


# ---- WFLW ------------------------------------------------------------------------------------


def _wflw_line(lm, rect, attrs, path):
  return " ".join([f"{v:.6f}" for v in lm.reshape(-1)] + [str(v) for v in rect]
                  + [str(v) for v in attrs] + [path])


@pytest.fixture
def wflw_list(tmp_path):
  rng = np.random.default_rng(0)
  lms = [rng.uniform(100, 300, size=(98, 2)) for _ in range(3)]
  lms[0][:, 0] = np.linspace(10, 110, 98)      # box 100 wide ...
  lms[0][:, 1] = np.linspace(20, 220, 98)      # ... and 200 high
  attrs = [(1, 0, 0, 0, 1, 0), (0, 1, 1, 0, 0, 0), (0, 0, 0, 1, 0, 1)]
  paths = ["51--Dresses/51_a.jpg", "0--Parade\\0_b.jpg", "9--Press/9_c.jpg"]
  path = tmp_path / "list_98pt_rect_attr_train.txt"
  path.write_text("\n".join(_wflw_line(lm, (5, 6, 120, 230), a, p)
                            for lm, a, p in zip(lms, attrs, paths)) + "\n")
  return path, lms, attrs


def test_wflw_list_to_tsv(wflw_list, tmp_path):
  path, lms, attrs = wflw_list
  out = tmp_path / "train.tsv"
  assert of.convert_wflw(str(path), str(out)) == 3
  head, rows = _read(out)
  assert head == ["image_path", "landmarks_5pts", "landmarks_98", "scale", "center_w",
                  "center_h", "tags"]
  assert [r[0] for r in rows] == ["51--Dresses/51_a.jpg", "0--Parade/0_b.jpg",
                                  "9--Press/9_c.jpg"]
  for row, lm, a in zip(rows, lms, attrs):
    got = _landmarks(row, 98)
    np.testing.assert_allclose(got, lm, atol=5e-4)  # copied as they are (0-based), 3 decimals
    np.testing.assert_array_equal(np.array(row[1].split(","), float).reshape(5, 2),
                                  got[[96, 97, 54, 76, 82]])
    assert [int(t) for t in row[6].split(",")] == list(a)
  assert float(rows[0][3]) == pytest.approx(1.05)
  assert (float(rows[0][4]), float(rows[0][5])) == pytest.approx((60.0, 120.0))


def test_wflw_detector_rect_and_other_rules(wflw_list, tmp_path):
  path, _, _ = wflw_list
  of.convert_wflw(str(path), str(tmp_path / "rect.tsv"), box="rect")
  _, rows = _read(tmp_path / "rect.tsv")
  # Rectangle 5,6 .. 120,230: w 115, h 224.
  assert float(rows[1][3]) == pytest.approx(224 / 200 * 1.05, abs=1e-6)
  assert (float(rows[1][4]), float(rows[1][5])) == pytest.approx((62.5, 118.0))
  of.convert_wflw(str(path), str(tmp_path / "h.tsv"), crop_rule="height")
  _, rows = _read(tmp_path / "h.tsv")
  assert float(rows[0][3]) == pytest.approx(1.0)


def test_wflw_bad_line_names_file_and_line(tmp_path):
  path = tmp_path / "list.txt"
  good = _wflw_line(np.zeros((98, 2)), (0, 0, 1, 1), (0,) * 6, "a.jpg")
  path.write_text(good + "\n" + good.replace(" a.jpg", "") + "\n")
  with pytest.raises(of.FormatError, match=r"list.txt:2: expected 207"):
    of.read_wflw_list(str(path))
  path.write_text(good.replace("0.000000", "x", 1) + "\n")
  with pytest.raises(of.FormatError, match=r"list.txt:1: non-numeric"):
    of.read_wflw_list(str(path))


def test_wflw_output_reads_back_with_read_tsv(wflw_list, tmp_path):
  annotations = pytest.importorskip("star_jax.data.annotations")
  path, lms, _ = wflw_list
  out = tmp_path / "train.tsv"
  of.convert_wflw(str(path), str(out))
  ann = annotations.read_tsv(str(out), get_spec("wflw"), image_dir=str(tmp_path),
                             check_images=False)
  assert len(ann.image_paths) == 3
  np.testing.assert_allclose(ann.landmarks, np.stack(lms), atol=5e-4)


def test_wflw_cli(wflw_list, tmp_path):
  path, _, _ = wflw_list
  (tmp_path / "list_98pt_rect_attr_test.txt").write_text(path.read_text())
  of.main(["wflw", str(tmp_path), "--out", str(tmp_path / "tsv")])
  for split in ("train", "test"):
    assert len(_read(tmp_path / "tsv" / f"{split}.tsv")[1]) == 3


# ---- 300W ------------------------------------------------------------------------------------


def _write_pts(path, pts):
  body = "\n".join(f"{x:.3f} {y:.3f}" for x, y in pts)
  path.write_text(f"version: 1\nn_points:  {len(pts)}\n{{\n{body}\n}}\n")


@pytest.fixture
def w300_root(tmp_path):
  root = tmp_path / "300W"
  layout = {"afw": 2, "helen/trainset": 1, "helen/testset": 1, "lfpw/trainset": 2,
            "lfpw/testset": 1, "ibug": 2}
  rng = np.random.default_rng(1)
  truth = {}
  for folder, n in layout.items():
    (root / folder).mkdir(parents=True)
    for k in range(n):
      stem = root / folder / f"image_{k:04d}"
      pts = rng.uniform(20, 80, size=(68, 2))
      _write_pts(stem.with_suffix(".pts"), pts)
      cv2.imwrite(str(stem.with_suffix(".png" if folder != "afw" else ".jpg")),
                  np.zeros((4, 4, 3), np.uint8))
      truth[os.path.relpath(str(stem), root)] = pts
  return root, truth


def test_300w_splits_and_one_based_shift(w300_root, tmp_path):
  root, truth = w300_root
  out = tmp_path / "tsv"
  counts = of.convert_300w(str(root), str(out))
  assert counts == {"train": 5, "test_common": 2, "test_challenge": 2, "test": 4}
  _, train = _read(out / "train.tsv")
  assert all(r[0].split("/")[0] in ("afw", "helen", "lfpw") for r in train)
  assert not any("testset" in r[0] for r in train)
  _, test = _read(out / "test.tsv")
  _, common = _read(out / "test_common.tsv")
  _, challenge = _read(out / "test_challenge.tsv")
  assert [r[0] for r in test] == [r[0] for r in common + challenge]
  # The 300W spec's path rule recovers the subsets from the full test file.
  subsets = dict(get_spec("300w").path_subsets)
  assert [r[0] for r in test if any(s in r[0] for s in subsets["challenge"])] == \
      [r[0] for r in challenge]
  for row in train + test:
    stem = os.path.splitext(row[0])[0]
    assert os.path.exists(root / row[0])
    # .pts are 1-based: one pixel is subtracted.
    np.testing.assert_allclose(_landmarks(row, 68), truth[stem] - 1.0, atol=5e-4)
    five = np.array(row[1].split(","), float).reshape(5, 2)
    np.testing.assert_allclose(five[0], _landmarks(row, 68)[36:42].mean(0), atol=1e-3)
  of.convert_300w(str(root), str(tmp_path / "raw"), one_based=True)
  _, raw = _read(tmp_path / "raw" / "train.tsv")
  np.testing.assert_allclose(_landmarks(raw[0], 68), _landmarks(train[0], 68) + 1.0, atol=1e-6)


def test_300w_errors(tmp_path):
  pts = tmp_path / "x.pts"
  _write_pts(pts, np.zeros((3, 2)))
  pts.write_text(pts.read_text().replace("n_points:  3", "n_points: 4"))
  with pytest.raises(of.FormatError, match="n_points says 4"):
    of.read_pts(str(pts))
  with pytest.raises(of.FormatError, match="lfpw/trainset is missing"):
    of.convert_300w(str(tmp_path), str(tmp_path / "out"))


# ---- COFW ------------------------------------------------------------------------------------


def _cofw_data():
  rng = np.random.default_rng(2)
  images = [rng.integers(0, 256, size=(12, 9, 3), dtype=np.uint8),
            rng.integers(0, 256, size=(7, 10), dtype=np.uint8)]   # one grayscale
  phis = np.concatenate([rng.uniform(1, 9, (2, 29)), rng.uniform(1, 7, (2, 29)),
                         rng.integers(0, 2, (2, 29))], axis=1)
  return images, phis


def _check_cofw(out, images, phis, split="train"):
  _, rows = _read(out / f"{split}.tsv")
  assert len(rows) == 2
  for k, row in enumerate(rows):
    png = cv2.imread(str(out / "images" / row[0]), cv2.IMREAD_UNCHANGED)[..., ::-1]
    expected = images[k] if images[k].ndim == 3 else np.repeat(images[k][..., None], 3, -1)
    np.testing.assert_array_equal(png, expected)
    lm = _landmarks(row, 29)
    np.testing.assert_allclose(lm[:, 0], phis[k, :29] - 1, atol=5e-4)
    np.testing.assert_allclose(lm[:, 1], phis[k, 29:58] - 1, atol=5e-4)
  flags = np.loadtxt(out / f"{split}_occlusion.tsv", delimiter=",")
  np.testing.assert_array_equal(flags, phis[:, 58:])


def test_cofw_mat_v5(tmp_path):
  images, phis = _cofw_data()
  cells = np.empty((2, 1), object)
  cells[0, 0], cells[1, 0] = images
  mat = tmp_path / "COFW_train_color.mat"
  scipy.io.savemat(str(mat), {"IsTr": cells, "phisTr": phis})
  assert of.convert_cofw(str(mat), "train", str(tmp_path / "out")) == 2
  _check_cofw(tmp_path / "out", images, phis)


def test_cofw_mat_v73_hdf5(tmp_path):
  h5py = pytest.importorskip("h5py")
  images, phis = _cofw_data()
  mat = tmp_path / "COFW_test_color.mat"
  # MATLAB v7.3: a 512-byte text header, then HDF5 with every array's axes reversed and cell
  # arrays as object references into '#refs#'.
  with h5py.File(str(mat), "w", userblock_size=512) as f:
    refs = f.create_group("#refs#")
    ref_list = []
    for k, img in enumerate(images):
      ref_list.append(refs.create_dataset(f"img{k}", data=img.T).ref)
    ds = f.create_dataset("IsT", (1, 2), dtype=h5py.ref_dtype)
    ds[0, :] = ref_list
    f.create_dataset("phisT", data=phis.T)
  with open(mat, "r+b") as f:
    f.write(b"MATLAB 7.3 MAT-file, created by a test".ljust(116))
  assert of._is_hdf5(str(mat))
  assert of.convert_cofw(str(mat), "test", str(tmp_path / "out")) == 2
  _check_cofw(tmp_path / "out", images, phis, split="test")


def test_cofw_wrong_variables(tmp_path):
  mat = tmp_path / "bad.mat"
  scipy.io.savemat(str(mat), {"phisTr": np.zeros((1, 87))})
  with pytest.raises(of.FormatError, match="IsTr"):
    of.read_cofw_mat(str(mat), "train")
