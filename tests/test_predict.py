"""Prediction on arbitrary images: detection, box rules, image formats, folders with failures,
flag validation and the error contract."""

import json
import os

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from star_jax.training import model_store
from star_jax.deploy import detection
from star_jax.deploy import predict
from star_jax.commands import predict as predict_command
from star_jax.data import annotations as annotations_lib
from star_jax.core.schemes import get_spec
from star_jax.deploy.image_io import ImageError, load_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
DATA_DIR = os.path.join(FIXTURES, "official_wflw_data")
CHECKPOINT = os.path.join(FIXTURES, "official_wflw_small", "checkpoint.pkl")
EXPECTED = os.path.join(DATA_DIR, "evaluate_expected_small.npz")
# Same batch as tests/test_eval.py (one compilation of the network per shape).
BATCH = 4
# The astronaut's face, read off the photograph (x1, y1, x2, y2): brow line to chin, cheek to
# cheek, in pixels of skimage.data.astronaut() (512 x 512).
ASTRONAUT_FACE = (178, 85, 270, 172)


@pytest.fixture(scope="module")
def predictor():
  return predict.Predictor(model_store.load_model(CHECKPOINT), batch_size=BATCH)


@pytest.fixture(scope="module")
def astronaut():
  return skdata.astronaut()


@pytest.mark.parametrize("name", ["default", "lbp"])
def test_detectors_find_the_astronaut(astronaut, name):
  boxes = detection.detect(astronaut, name)
  assert len(boxes) == 1
  box = boxes[0]
  x1, y1, x2, y2 = ASTRONAUT_FACE
  cx, cy = (box.x1 + box.x2) / 2, (box.y1 + box.y2) / 2
  assert x1 < cx < x2 and y1 - 20 < cy < y2
  assert 0.7 * (x2 - x1) < box.width < 1.4 * (x2 - x1)
  # The calibrated crop covers the whole face and not much more.
  scale, center = detection.box_to_crop(box, name)
  side = scale * 200
  assert center[0] - side / 2 <= x1 + 5 and center[0] + side / 2 >= x2 - 5
  assert center[1] - side / 2 <= y1 + 5 and center[1] + side / 2 >= y2 - 5
  assert side < 1.3 * max(x2 - x1, y2 - y1)


def test_given_box_reproduces_official_evaluation(predictor):
  """A box whose official-rule crop is the annotated crop gives evaluate.py's predictions."""
  expected = np.load(EXPECTED)
  rows = annotations_lib.read_tsv(os.path.join(DATA_DIR, "test.tsv"), get_spec("wflw"),
                                  image_dir=DATA_DIR)
  for i in range(3):
    half = rows.scale[i] * 200 / 1.05 / 2
    cx, cy = rows.center[i]
    image = load_image(rows.image_paths[i])
    faces = predictor.predict(image, boxes=[(cx - half, cy - half, cx + half, cy + half)])
    assert len(faces) == 1 and faces[0].shape == (98, 2)
    np.testing.assert_allclose(faces[0], expected["pred_landmarks"][i], atol=0.05)
    mapped = predictor.predict(image, boxes=[(cx - half, cy - half, cx + half, cy + half)],
                               num_points=68)[0]
    assert mapped.shape == (68, 2)
    np.testing.assert_allclose(mapped[36], faces[0][60])


def test_folder_with_formats_and_failures(predictor, astronaut, tmp_path):
  src = tmp_path / "in"
  src.mkdir()
  bgr = astronaut[..., ::-1]
  cv2.imwrite(str(src / "a_photo.jpg"), bgr)
  cv2.imwrite(str(src / "b_photo.ppm"), bgr)
  cv2.imwrite(str(src / "c_photo.bmp"), bgr)
  Image.fromarray(astronaut).save(src / "d_photo.gif")           # decoded by Pillow
  cv2.imwrite(str(src / "e_flat.png"), np.full((200, 300, 3), 90, np.uint8))
  (src / "f_broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
  (src / "notes.txt").write_text("not an image")
  paths = predict.list_images(str(src)) + [str(src / "g_missing.png")]
  assert [os.path.basename(p) for p in paths] == [
      "a_photo.jpg", "b_photo.ppm", "c_photo.bmp", "d_photo.gif", "e_flat.png", "f_broken.jpg",
      "g_missing.png"]
  messages = []
  out = tmp_path / "out"
  reports = predict.predict_files(predictor, paths, str(out), log=messages.append,
                                  progress=False, num_points=68)
  status = {os.path.basename(r.path): r.status for r in reports}
  assert status == {"a_photo.jpg": "ok", "b_photo.ppm": "ok", "c_photo.bmp": "ok",
                    "d_photo.gif": "ok", "e_flat.png": "no_face", "f_broken.jpg": "error",
                    "g_missing.png": "error"}
  # Every failure is reported by name.
  for name in ("e_flat.png", "f_broken.jpg", "g_missing.png"):
    assert any(name in m for m in messages), name
  lossless = []
  for stem in ("a_photo", "b_photo", "c_photo", "d_photo"):
    with open(out / f"{stem}.json") as f:
      record = json.load(f)
    assert (record["width"], record["height"]) == (512, 512)
    assert record["num_points"] == 68
    assert len(record["faces"]) == 1
    face = record["faces"][0]
    assert np.asarray(face["landmarks"]).shape == (68, 2)
    x1, y1, x2, y2 = face["box"]
    assert x1 < (ASTRONAUT_FACE[0] + ASTRONAUT_FACE[2]) / 2 < x2
    assert y1 < (ASTRONAUT_FACE[1] + ASTRONAUT_FACE[3]) / 2 < y2
    png = cv2.imread(str(out / f"{stem}.png"))
    assert png is not None and png.shape == (512, 512, 3)
    if stem in ("b_photo", "c_photo"):  # lossless formats: the same pixels
      lossless.append(np.asarray(face["landmarks"]))
  for other in lossless[1:]:
    np.testing.assert_allclose(other, lossless[0], atol=1e-3)
  with open(out / "e_flat.json") as f:
    assert json.load(f)["faces"] == []
  assert not (out / "f_broken.json").exists()


def test_load_image_conversions(tmp_path):
  gray = np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) % 256
  cv2.imwrite(str(tmp_path / "g.png"), gray.astype(np.uint8))
  rgba = np.zeros((10, 12, 4), np.uint8)
  rgba[..., 0] = 200  # red in RGB order
  Image.fromarray(rgba, "RGBA").save(tmp_path / "r.png")
  g = load_image(str(tmp_path / "g.png"))
  assert g.shape == (48, 64, 3) and g.dtype == np.uint8
  np.testing.assert_array_equal(g[..., 0], gray.astype(np.uint8))
  r = load_image(str(tmp_path / "r.png"))
  assert r.shape == (10, 12, 3) and r[0, 0].tolist() == [200, 0, 0]
  with pytest.raises(ImageError, match="nope.jpg"):
    load_image(str(tmp_path / "nope.jpg"))


def test_cli_reports_and_exit_status(tmp_path, astronaut, capsys):
  image = tmp_path / "astro.png"
  cv2.imwrite(str(image), astronaut[..., ::-1])
  out = tmp_path / "out"
  code = predict_command.main(["--checkpoint", CHECKPOINT, str(image),
                               str(tmp_path / "missing.jpg"), "--out", str(out), "--box",
                               "178,85,270,172", "--batch_size", str(BATCH)])
  captured = capsys.readouterr()
  assert code == 1                                   # one input could not be read
  assert "missing.jpg" in captured.err + captured.out
  with open(out / "astro.json") as f:
    record = json.load(f)
  face = record["faces"][0]
  assert face["box_source"] == "given" and face["box"] == [178, 85, 270, 172]
  assert np.asarray(face["landmarks"]).shape == (98, 2)
  assert (out / "astro.png").is_file()


BAD_ARGUMENTS = [
    (["--box", "1,2,3"], "--box"),
    (["--box", "nan,0,10,10"], "--box"),
    (["--box", "0,0,inf,inf"], "--box"),
    (["--batch_size", "0"], "--batch_size"),
    (["--batch_size", "two"], "--batch_size"),
    (["--points", "5"], "--points"),
    (["--detector", "nope"], "--detector"),
    (["--redetect_every", "0"], "--redetect_every"),
    (["--box", "0,0,10,10", "--whole_image"], "--box or --whole_image"),
    (["--spin"], "--spin"),
]


@pytest.mark.parametrize("extra,flag", BAD_ARGUMENTS)
def test_bad_flags_are_one_line_usage_errors(tmp_path, capsys, extra, flag):
  image = tmp_path / "x.png"
  image.write_bytes(b"")
  with pytest.raises(SystemExit) as exit_info:
    predict_command.main(["--checkpoint", CHECKPOINT, str(image), "--out", str(tmp_path / "o")]
                         + extra)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert flag in err and "Traceback" not in err
  assert not (tmp_path / "o").exists()


def test_out_is_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  loaded = []
  monkeypatch.setattr(model_store, "load_model", lambda *a, **k: loaded.append(1))
  with pytest.raises(SystemExit) as exit_info:
    predict_command.main(["--checkpoint", CHECKPOINT, str(blocker), "--out", str(blocker)])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: --out") and str(blocker) in err and not loaded


def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
  image = tmp_path / "x.png"
  cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
  with pytest.raises(SystemExit) as exit_info:
    predict_command.main(["--checkpoint", str(tmp_path / "nope.pkl"), str(image),
                  "--out", str(tmp_path / "o")])
  assert exit_info.value.code == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "nope.pkl" in err


def test_same_names_in_different_folders_do_not_collide(predictor, astronaut, tmp_path):
  for folder, picture in (("a", astronaut), ("b", astronaut[:, ::-1])):
    (tmp_path / folder).mkdir()
    cv2.imwrite(str(tmp_path / folder / "face.png"), np.ascontiguousarray(picture[..., ::-1]))
  paths = [str(tmp_path / "a" / "face.png"), str(tmp_path / "b" / "face.png")]
  assert predict._output_stems(paths) == ["a_face", "b_face"]
  assert predict._output_stems(["x/face.png", "x/face.jpg", "y.png"]) == [
      "face_png", "face_jpg", "y"]
  assert predict._output_stems(["p/q/f.png", "r/q/f.png"]) == ["p_q_f", "r_q_f"]
  assert predict._output_stems(["f.png", "f.png"]) == ["f", "f_2"]
  out = tmp_path / "out"
  reports = predict.predict_files(predictor, paths, str(out), progress=False)
  assert [r.status for r in reports] == ["ok", "ok"]
  with open(out / "a_face.json") as f:
    a = json.load(f)
  with open(out / "b_face.json") as f:
    b = json.load(f)
  assert a["image"].endswith(os.path.join("a", "face.png"))
  assert b["image"].endswith(os.path.join("b", "face.png"))
  # The mirrored picture's face box is the mirror image of the other's.
  ax1, _, ax2, _ = a["faces"][0]["box"]
  bx1, _, bx2, _ = b["faces"][0]["box"]
  assert abs((ax1 + ax2) / 2 - (511 - (bx1 + bx2) / 2)) < 6


def test_whole_image_for_precropped_faces(predictor, astronaut, tmp_path):
  # A face filling the frame escapes the detector; --whole_image uses the image as the box.
  path = tmp_path / "tight.png"
  cv2.imwrite(str(path), astronaut[85:172, 180:268][..., ::-1])    # 88 x 87 pixels
  assert detection.detect(load_image(str(path)), "lbp") == []
  reports = predict.predict_files(predictor, [str(path)], str(tmp_path / "out"),
                                  whole_image=True, progress=False)
  assert reports[0].status == "ok"
  with open(tmp_path / "out" / "tight.json") as f:
    face = json.load(f)["faces"][0]
  assert face["box"] == [0, 0, 87, 86]
  assert face["center"] == [43.5, 43.0]
  assert face["scale"] == pytest.approx(86 / 200 * 1.05)
