"""Tests of the converters from original WFLW / 300W / COFW files to official TSVs."""

import os

import cv2
import numpy as np
import pytest
import scipy.io

from star_jax.foreign import original_formats as of
from star_jax.commands import original_formats as of_command
from star_jax.core.schemes import get_spec


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
  from star_jax.data import annotations
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
  of_command.main(["wflw", str(tmp_path), "--out", str(tmp_path / "tsv")])
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
                  np.zeros((100, 100, 3), np.uint8))  # holds the points (20-80)
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


# ---- the command line: the README's commands, pairing, checks before writing ---------------

WFLW_LIST_DIR = "WFLW_annotations/list_98pt_rect_attr_train_test"
README_WFLW = ["wflw", f"{WFLW_LIST_DIR}/list_98pt_rect_attr_train.txt", "--out", "data/wflw"]
README_COFW = ["cofw", "COFW_train_color.mat", "--out", "data/cofw"]


def _tiny_image(path, seed=0):
  path.parent.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  assert cv2.imwrite(str(path), rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))


def _wflw_release(root, counts=(3, 2), with_images=True):
  """The WFLW download's layout in `root`: annotations and (optionally) WFLW_images."""
  rng = np.random.default_rng(3)
  for split, n in zip(("train", "test"), counts):
    lines = []
    for k in range(n):
      rel = f"{k}--Event/{split}_{k}.jpg"
      if with_images:
        _tiny_image(root / "WFLW_images" / rel, k)
      lines.append(_wflw_line(rng.uniform(5, 35, (98, 2)), (1, 2, 30, 38), (0, 1, 0, 0, 1, 0),
                              rel))
    path = root / WFLW_LIST_DIR / f"list_98pt_rect_attr_{split}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _cofw_release(root, splits=("train", "test")):
  images, phis = _cofw_data()
  cells = np.empty((2, 1), object)
  cells[0, 0], cells[1, 0] = images
  for split in splits:
    image_key, phis_key = of.COFW_KEYS[split]
    scipy.io.savemat(str(root / f"COFW_{split}_color.mat"), {image_key: cells, phis_key: phis})
  return images, phis


def _run_cli(argv, cwd):
  """The converter as a user runs it: (exit code, stdout, stderr)."""
  import subprocess
  import sys
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
       os.environ.get("PYTHONPATH", "")]))
  env.pop("STAR_JAX_DEBUG", None)
  proc = subprocess.run([sys.executable, "-m", "star_jax.data.original_formats", *argv],
                        cwd=cwd, capture_output=True, text=True, env=env, check=False)
  return proc.returncode, proc.stdout, proc.stderr


def _assert_one_line_error(code, err, expected_code, pattern):
  assert code == expected_code, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  assert "Traceback" not in err
  assert pattern in lines[0], lines[0]


def _assert_dataset_folder(out, spec_name, counts):
  """OUT is what both consumers read: TSVs whose paths resolve under OUT/images."""
  from star_jax.data import annotations
  for split, n in zip(("train", "test"), counts):
    ann = annotations.read_tsv(str(out / f"{split}.tsv"), get_spec(spec_name),
                               image_dir=str(out / "images"), check_images=True)
    assert len(ann.image_paths) == n
    assert all(os.path.isfile(p) for p in ann.image_paths)


def test_readme_wflw_command_takes_the_train_file(tmp_path, monkeypatch, capsys):
  _wflw_release(tmp_path)
  monkeypatch.chdir(tmp_path)
  assert of_command.main(README_WFLW) == 0
  out = capsys.readouterr().out
  assert "list_98pt_rect_attr_train.txt (3 faces)" in out
  assert "list_98pt_rect_attr_test.txt (2 faces)" in out
  assert "all 5 present" in out
  out_dir = tmp_path / "data" / "wflw"
  assert len(_read(out_dir / "train.tsv")[1]) == 3
  assert len(_read(out_dir / "test.tsv")[1]) == 2
  # WFLW_images was found beside the annotations and linked as OUT/images.
  assert os.path.islink(out_dir / "images")
  assert os.path.samefile(out_dir / "images", tmp_path / "WFLW_images")
  _assert_dataset_folder(out_dir, "wflw", (3, 2))


@pytest.mark.parametrize("source", [f"{WFLW_LIST_DIR}/list_98pt_rect_attr_test.txt",
                                    "WFLW_annotations", "."])
def test_wflw_test_file_or_folder_gives_the_same_tsvs(tmp_path, monkeypatch, source):
  _wflw_release(tmp_path)
  monkeypatch.chdir(tmp_path)
  assert of_command.main(README_WFLW[:2] + ["--out", "ref"]) == 0
  assert of_command.main(["wflw", source, "--out", "other"]) == 0
  for split in ("train", "test"):
    assert (tmp_path / "other" / f"{split}.tsv").read_text() == \
        (tmp_path / "ref" / f"{split}.tsv").read_text()


def test_wflw_missing_counterpart_is_one_line_and_writes_nothing(tmp_path):
  _wflw_release(tmp_path)
  os.remove(tmp_path / WFLW_LIST_DIR / "list_98pt_rect_attr_test.txt")
  code, _, err = _run_cli(README_WFLW, tmp_path)
  _assert_one_line_error(code, err, 1, "list_98pt_rect_attr_test.txt is missing")
  assert not (tmp_path / "data").exists()
  code, _, err = _run_cli(["wflw", "WFLW_annotations", "--out", "data/wflw"], tmp_path)
  _assert_one_line_error(code, err, 1, "list_98pt_rect_attr_test.txt not found under")
  assert not (tmp_path / "data").exists()


def test_wflw_explicit_images_folder_is_checked_before_writing(tmp_path, monkeypatch, capsys):
  _wflw_release(tmp_path)
  moved = tmp_path / "elsewhere" / "photos"
  os.renames(tmp_path / "WFLW_images", moved)
  monkeypatch.chdir(tmp_path)
  assert of_command.main(README_WFLW + ["--images", str(moved)]) == 0
  assert os.path.samefile(tmp_path / "data" / "wflw" / "images", moved)
  _assert_dataset_folder(tmp_path / "data" / "wflw", "wflw", (3, 2))
  # A folder lacking an image: one line naming it, nothing written.
  os.remove(moved / "1--Event" / "test_1.jpg")
  with pytest.raises(SystemExit) as exit_info:
    of_command.main(["wflw", WFLW_LIST_DIR, "--out", "fresh", "--images", str(moved)])
  assert exit_info.value.code == 1
  assert "1 of 5 images" in capsys.readouterr().err
  assert not (tmp_path / "fresh").exists()


def test_wflw_without_images_writes_tsvs_and_says_so(tmp_path, monkeypatch, capsys):
  _wflw_release(tmp_path, with_images=False)
  monkeypatch.chdir(tmp_path)
  assert of_command.main(README_WFLW) == 0
  out = capsys.readouterr().out
  assert "no WFLW_images folder" in out
  assert len(_read(tmp_path / "data" / "wflw" / "train.tsv")[1]) == 3
  assert not os.path.lexists(tmp_path / "data" / "wflw" / "images")


def test_existing_images_entry_is_never_replaced(tmp_path, monkeypatch, capsys):
  _wflw_release(tmp_path)
  (tmp_path / "data" / "wflw" / "images").mkdir(parents=True)
  monkeypatch.chdir(tmp_path)
  with pytest.raises(SystemExit) as exit_info:
    of_command.main(README_WFLW)
  assert exit_info.value.code == 2
  assert "is not a link to" in capsys.readouterr().err
  assert not (tmp_path / "data" / "wflw" / "train.tsv").exists()


def test_wflw_file_name_without_split_is_a_usage_error(tmp_path):
  (tmp_path / "annotations.txt").write_text("")
  code, _, err = _run_cli(["wflw", "annotations.txt", "--out", "o"], tmp_path)
  _assert_one_line_error(code, err, 2, "names neither 'train' nor 'test'")
  code, _, err = _run_cli(["wflw", "nowhere.txt", "--out", "o"], tmp_path)
  _assert_one_line_error(code, err, 1, "nowhere.txt: no such file or folder")
  assert not (tmp_path / "o").exists()


def test_readme_cofw_command_takes_the_train_file(tmp_path, monkeypatch, capsys):
  images, phis = _cofw_release(tmp_path)
  monkeypatch.chdir(tmp_path)
  assert of_command.main(README_COFW) == 0
  out = capsys.readouterr().out
  assert "COFW_train_color.mat (2 faces)" in out and "COFW_test_color.mat (2 faces)" in out
  out_dir = tmp_path / "data" / "cofw"
  _check_cofw(out_dir, images, phis, "train")
  _check_cofw(out_dir, images, phis, "test")
  _assert_dataset_folder(out_dir, "cofw", (2, 2))


def test_cofw_missing_counterpart_is_one_line_and_writes_nothing(tmp_path):
  _cofw_release(tmp_path, splits=("train",))
  code, _, err = _run_cli(README_COFW, tmp_path)
  _assert_one_line_error(code, err, 1, "COFW_test_color.mat is missing")
  assert not (tmp_path / "data").exists()


def test_cofw_damaged_mat_is_one_line(tmp_path):
  _cofw_release(tmp_path)
  (tmp_path / "COFW_test_color.mat").write_bytes(b"not a MATLAB file at all" * 10)
  code, _, err = _run_cli(README_COFW, tmp_path)
  _assert_one_line_error(code, err, 1, "COFW_test_color.mat: not a readable MATLAB file")
  assert not (tmp_path / "data").exists()


def test_300w_cli_links_the_folder_and_reports_subsets(w300_root, tmp_path, monkeypatch, capsys):
  root, _ = w300_root
  monkeypatch.chdir(tmp_path)
  assert of_command.main(["300w", str(root), "--out", "data/300w"]) == 0
  out = capsys.readouterr().out
  assert "train: lfpw/trainset 2, helen/trainset 1, afw 2 faces" in out
  assert "test_challenge: ibug 2 faces" in out
  out_dir = tmp_path / "data" / "300w"
  assert os.path.samefile(out_dir / "images", root)
  _assert_dataset_folder(out_dir, "300w", (5, 4))
  for name in ("test_common", "test_challenge"):
    assert (out_dir / f"{name}.tsv").exists()


def test_300w_incomplete_folder_writes_nothing(w300_root, tmp_path):
  root, _ = w300_root
  import shutil
  shutil.rmtree(root / "ibug")
  code, _, err = _run_cli(["300w", str(root), "--out", "out"], tmp_path)
  _assert_one_line_error(code, err, 1, "ibug is missing")
  assert not (tmp_path / "out").exists()
  code, _, err = _run_cli(["300w", str(root / "afw" / "image_0000.pts"), "--out", "out"],
                          tmp_path)
  _assert_one_line_error(code, err, 2, "takes the 300W folder")


def test_converted_wflw_folder_builds_as_a_tfds_manual_dir(tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  from star_jax.data import tfds_builders
  _wflw_release(tmp_path)
  monkeypatch.chdir(tmp_path)
  assert of_command.main(README_WFLW) == 0
  builder = tfds_builders.builder_for("wflw", data_dir=str(tmp_path / "tfds"), config="png")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(tmp_path / "data" / "wflw")))
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 3, "test": 2}
  _, rows = _read(tmp_path / "data" / "wflw" / "train.tsv")
  stored = sorted(tfds.as_numpy(builder.as_dataset(split="train")), key=lambda e: e["index"])
  for row, example in zip(rows, stored):
    np.testing.assert_allclose(example["landmarks"] + example["offset"].astype(np.float32),
                               _landmarks(row, 98), atol=1e-3)
