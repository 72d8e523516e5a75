"""Evaluation against the official evaluate.py: crop, mapping back, per-image NME, outputs.

Reference: tests/fixtures/official_wflw_data/evaluate_expected_small.npz, the official
evaluate.py run of the small random-weight WFLW model (tests/fixtures/official_wflw_small/
checkpoint.pkl, its "net" weights) on the three fixture images (see EVALUATE_EXPECTED_SMALL.md).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import wflw as wflw_config
from star_jax.training import model_store
from star_jax.training import eval_lib
from star_jax.data import pipeline
from star_jax.data import transforms
from star_jax.data import annotations as annotations_lib
from star_jax.core.schemes import get_spec
from tests.limits import LAST_GUARD_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
DATA_DIR = os.path.join(FIXTURES, "official_wflw_data")
TEST_TSV = os.path.join(DATA_DIR, "test.tsv")
CHECKPOINT = os.path.join(FIXTURES, "official_wflw_small", "checkpoint.pkl")
EXPECTED = os.path.join(DATA_DIR, "evaluate_expected_small.npz")
WFLW = get_spec("wflw")
# Eval and prediction tests share this batch size: one compilation serves both.
BATCH = 4


@pytest.fixture(scope="module")
def expected():
  return dict(np.load(EXPECTED))


@pytest.fixture(scope="module")
def loaded():
  return model_store.load_model(CHECKPOINT)


@pytest.fixture(scope="module")
def config():
  c = wflw_config.get_config()
  c.data.test_tsv = TEST_TSV
  c.data.image_dir = DATA_DIR
  c.eval_batch_size = BATCH
  return c


@pytest.fixture(scope="module")
def evaluation(config, loaded, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("eval"))
  result = eval_lib.evaluate(config, loaded, out, progress=False, verbose=False)
  return result, out


def test_crop_matrix_is_bit_identical_to_official(expected):
  rows = annotations_lib.read_tsv(TEST_TSV, WFLW, image_dir=DATA_DIR)
  for i in range(3):
    m = transforms.crop_matrix(rows.scale[i], *rows.center[i], 256)
    np.testing.assert_array_equal(m, expected["matrix"][i])


def test_crop_matches_official_warp(config, expected):
  batch = next(pipeline.eval_dataset(config, "test", batch_size=BATCH))
  assert batch["mask"].tolist() == [True, True, True, False]
  crops_rgb = expected["crop_bgr_uint8"][..., ::-1]
  reference = crops_rgb.astype(np.float32) / np.float32(255) * np.float32(2) - np.float32(1)
  # Same decoder and bilinear warp as the official code: equal up to one grey level.
  assert np.abs(batch["image"][:3] - reference).max() <= 2.0 / 255 + 1e-6
  assert np.mean(batch["image"][:3] != reference) < 1e-3


def test_mapping_back_matches_official(expected):
  pred = transforms.landmarks_to_original(expected["net_landmarks"], expected["matrix"], 256)
  np.testing.assert_allclose(pred, expected["pred_landmarks"], atol=1e-3)


def test_stored_crop_reproduces_official_network_output(loaded, expected):
  crops = expected["crop_bgr_uint8"][..., ::-1]          # BGR -> RGB for the NHWC model
  images = eval_lib.normalize_crops(np.concatenate([crops, crops[:1]]))  # batch of BATCH
  out = np.asarray(eval_lib.landmark_fn_for(loaded)(loaded.variables, images))[:3]
  np.testing.assert_allclose(out, expected["net_landmarks"], atol=1e-4)


def test_evaluate_matches_official_nme_per_image(evaluation, expected):
  result, _ = evaluation
  np.testing.assert_allclose(result.nme, expected["nme"], atol=5e-3)
  # Ground truth in TSV order, in original pixels.
  np.testing.assert_allclose(result.landmarks_gt, expected["gt_landmarks"], atol=1e-4)
  np.testing.assert_allclose(result.landmarks, expected["pred_landmarks"], atol=0.05)
  assert result.index.tolist() == [0, 1, 2]


def test_evaluate_writes_metrics_predictions_and_ced(evaluation, expected):
  result, out = evaluation
  with open(os.path.join(out, "metrics.json")) as f:
    metrics = json.load(f)
  assert metrics["num_images"] == 3 and metrics["count"] == 3
  assert metrics["dataset"] == "wflw" and metrics["norm"] == "ocular"
  # What the errors were computed on (also the CED plot's title).
  assert metrics["data"] == f"wflw test, {os.path.basename(TEST_TSV)}"
  assert metrics["failure_threshold"] == 0.1
  assert metrics["nme"] == pytest.approx(float(np.mean(expected["nme"])), abs=5e-3)
  # Random weights: every image fails, so FR = 1 and AUC = 0.
  assert metrics["fr"] == 1.0 and metrics["auc"] == 0.0
  subsets = metrics["subsets"]
  assert list(subsets) == ["full", "largepose", "expression", "illumination", "makeup",
                           "occlusion", "blur"]
  # TSV tags: row 0 = 0,1,0,0,1,0; row 1 = 1,0,0,0,0,1; row 2 = 0,0,1,1,0,0.
  assert subsets["largepose"]["count"] == 1
  assert subsets["largepose"]["nme"] == pytest.approx(expected["nme"][1], abs=5e-3)
  assert subsets["occlusion"]["nme"] == pytest.approx(expected["nme"][0], abs=5e-3)
  assert subsets["makeup"]["nme"] == pytest.approx(expected["nme"][2], abs=5e-3)
  assert subsets["full"]["count"] == 3

  saved = np.load(os.path.join(out, "predictions.npz"))
  assert saved["landmarks"].shape == (3, 98, 2) and saved["landmarks"].dtype == np.float32
  # Image paths as the TSV writes them.
  assert list(saved["image_paths"]) == [r.split("\t")[0] for r in
                                        open(TEST_TSV).read().splitlines()[1:]]
  names = [os.path.basename(p) for p in saved["image_paths"]]
  assert names == [os.path.basename(p) for p in expected["image_path"]]
  np.testing.assert_allclose(saved["landmarks"], expected["pred_landmarks"], atol=0.05)

  with open(os.path.join(out, "ced.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_format_table_lists_subsets(evaluation):
  result, _ = evaluation
  table = eval_lib.format_table(result.metrics)
  for name in ("full", "largepose", "blur", "NME %", "AUC"):
    assert name in table


def test_rejects_checkpoint_of_other_dataset(loaded):
  from configs import cofw as cofw_config
  with pytest.raises(ValueError, match="98 landmarks"):
    eval_lib.evaluate(cofw_config.get_config(), loaded, None, progress=False, verbose=False)


def test_eval_cli_end_to_end(tmp_path, expected):
  out = tmp_path / "out"
  cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--config",
         os.path.join(ROOT, "configs", "wflw.py"), "--checkpoint", CHECKPOINT,
         "--output_dir", str(out), f"--config.data.test_tsv={TEST_TSV}",
         f"--config.data.image_dir={DATA_DIR}", "--batch_size=2"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=LAST_GUARD_S)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ("metrics.json", "predictions.npz", "ced.png"):
    assert (out / name).is_file(), name
  assert "largepose" in proc.stdout
  nme = np.load(out / "predictions.npz")["nme"]
  np.testing.assert_allclose(nme, expected["nme"], atol=5e-3)


def test_flip_tta_is_mirror_equivariant_and_averages(loaded, expected):
  """The flip-TTA prediction of a mirrored crop is the mirrored prediction (points swapped by
  the flip pairs, x -> -x), and it is the mean of the two single predictions."""
  crops = expected["crop_bgr_uint8"][..., ::-1]
  images = eval_lib.normalize_crops(np.concatenate([crops, crops[:1]]))
  mirrored = images[:, :, ::-1]
  tta = eval_lib.landmark_fn_for(loaded, "flip")
  plain = eval_lib.landmark_fn_for(loaded)
  perm = WFLW.flip_permutation()
  a = np.asarray(tta(loaded.variables, images))
  b = np.asarray(tta(loaded.variables, mirrored))
  np.testing.assert_allclose(b, a[:, perm] * [-1.0, 1.0], atol=1e-5)
  single = np.asarray(plain(loaded.variables, images))
  single_mirrored = np.asarray(plain(loaded.variables, mirrored))
  np.testing.assert_allclose(a, 0.5 * (single + single_mirrored[:, perm] * [-1.0, 1.0]),
                             atol=1e-5)
