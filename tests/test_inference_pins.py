"""The inference side pinned against independent expectations.

- Two faces in one image: each face's landmarks equal those of the same face predicted alone
  (crops are mapped back per face, whatever the batch holds).
- Test-time flip: the predictor's host-side flip equals the evaluation's jitted flip
  (`eval_lib.make_landmark_fn(..., 'flip')`) on the same crops, is mirror-equivariant (the
  mirrored crop gives the mirrored, re-labelled landmarks, exactly so for the mean of a crop
  and its mirror), and the runtime's flip on an export equals the JAX predictor's.
- A 12 frames/s clip is read and written at 12 frames/s, its records timed at k / 12 s.
"""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest
import skimage.data

from star_jax.deploy import clips
from star_jax.training import eval_lib
from star_jax.commands import predict as predict_command
from star_jax.deploy import video
from star_jax.training.model_store import load_model
from star_jax.deploy.detection import Box
from star_jax.deploy.export import exporter
from star_jax.deploy.inference import Predictor
from star_jax.deploy.runtime import RuntimePredictor
from tests.export_checkpoints import save_star_jax_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "official_wflw_small", "checkpoint.pkl")
ASTRONAUT_BOX = (160.0, 40.0, 300.0, 210.0)   # the face of scikit-image's astronaut


@pytest.fixture(scope="module")
def loaded():
  return load_model(FIXTURE)


@pytest.fixture(scope="module")
def two_astronauts():
  face = skimage.data.astronaut()
  return np.ascontiguousarray(np.concatenate([face, face[:, ::-1]], axis=1))


def test_each_of_two_faces_equals_its_own_prediction(loaded, two_astronauts):
  predictor = Predictor(loaded, batch_size=2)
  width = two_astronauts.shape[1]
  x1, y1, x2, y2 = ASTRONAUT_BOX
  boxes = [ASTRONAUT_BOX, (width - x2, y1, width - x1, y2)]
  together = predictor.predict(two_astronauts, boxes=boxes)
  alone = [predictor.predict(two_astronauts, boxes=[b])[0] for b in boxes]
  assert len(together) == 2
  for t, a in zip(together, alone):
    np.testing.assert_allclose(t, a, atol=1e-3)
  # The second face is the first one mirrored: its landmarks lie in the right half.
  assert together[1][:, 0].min() > width / 2 - 10


def _crops(predictor, image, box):
  pictures, _ = predictor.crops_at(image, [predictor.box_crop(Box(*box), "official")])
  return pictures


def test_predictor_flip_equals_the_evaluation_flip_and_is_mirror_equivariant(loaded):
  image = skimage.data.astronaut()
  flip = Predictor(loaded, tta="flip")
  crops = _crops(flip, image, ASTRONAUT_BOX)
  ours = flip.predict_crops(crops)
  evaluation = np.asarray(eval_lib.landmark_fn_for(loaded, "flip")(
      loaded.variables, eval_lib.normalize_crops(crops)))
  np.testing.assert_allclose(ours, evaluation, atol=2e-5)

  # Mirror-equivariance: L(mirror(crop)) = relabel(mirror_x(L(crop))), x -> -x in [-1, 1].
  mirrored = flip.predict_crops(np.ascontiguousarray(crops[:, :, ::-1]))
  permutation = np.asarray(loaded.spec.flip_permutation())
  expected = ours[:, permutation] * np.array([-1.0, 1.0], np.float32)
  np.testing.assert_allclose(mirrored, expected, atol=2e-5)
  # ... which the plain prediction is not (the test would not be vacuous).
  plain = Predictor(loaded)
  gap = np.abs(plain.predict_crops(np.ascontiguousarray(crops[:, :, ::-1]))
               - plain.predict_crops(crops)[:, permutation] * np.array([-1.0, 1.0])).max()
  assert gap > 1e-3


def test_runtime_flip_equals_the_jax_flip(tmp_path):
  checkpoint = load_model(save_star_jax_checkpoint(str(tmp_path / "ckpt"), num_stacks=1, seed=7))
  path = exporter.export(checkpoint, "onnx", str(tmp_path / "m.onnx")).path
  image = skimage.data.astronaut()
  jax_faces = Predictor(checkpoint, tta="flip").predict(image, boxes=[ASTRONAUT_BOX])
  runtime_faces = RuntimePredictor(path, tta="flip").predict(image, boxes=[ASTRONAUT_BOX])
  np.testing.assert_allclose(runtime_faces[0], jax_faces[0], atol=2e-3)
  plain = RuntimePredictor(path).predict(image, boxes=[ASTRONAUT_BOX])
  assert np.abs(plain[0] - runtime_faces[0]).max() > 1e-3


@pytest.mark.slow
def test_a_12_fps_clip_keeps_12_fps(tmp_path):
  clip = clips.moving_face_clip(18, fps=12.0, faces=1, seed=5, size=(320, 240), face_side=90)
  source = str(tmp_path / "clip12.mp4")
  video.write_clip(source, clip.frames, 12.0, (320, 240))
  out = tmp_path / "out"
  assert predict_command.main(["--checkpoint", FIXTURE, source, "--out", str(out)]) == 0
  written = [p for p in os.listdir(out) if p.startswith("clip12") and not p.endswith(".jsonl")]
  assert len(written) == 1, os.listdir(out)
  capture = cv2.VideoCapture(str(out / written[0]))
  try:
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(12.0)
  finally:
    capture.release()
  with open(out / "clip12.jsonl") as f:
    records = [json.loads(line) for line in f if line.strip()]
  assert [r["frame"] for r in records] == list(range(18))
  np.testing.assert_allclose([r["time_s"] for r in records], np.arange(18) / 12.0, atol=1e-6)
