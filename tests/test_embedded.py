"""Tests of the embedded synthetic dataset: files, format, layout semantics, determinism, cache."""

import json
import os

import cv2
import numpy as np
import pytest

from star_jax.data import embedded
from star_jax.data import synthetic_faces
from star_jax.commands import embedded as embedded_command
from star_jax.core.schemes import get_spec

SPEC = get_spec("wflw")
COUNTS = (8, 2, 2)


def _rows(tsv):
  with open(tsv) as f:
    lines = [line.rstrip("\n") for line in f if line.strip()]
  return lines[0], [line.split("\t") for line in lines[1:]]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  return embedded.ensure_embedded_dataset(str(tmp_path_factory.mktemp("emb") / "data"),
                                          counts=COUNTS)


def test_files_and_official_tsv_format(small):
  for split, count in zip(("train", "val", "test"), COUNTS):
    header, rows = _rows(getattr(small, f"{split}_tsv"))
    assert header.split("\t") == ["image_path", "landmarks_5pts", "landmarks_98", "scale",
                                  "center_w", "center_h", "tags"]
    assert len(rows) == count
    for row in rows:
      assert len(row) == 7
      path = os.path.join(small.image_dir, row[0])
      with open(path, "rb") as f:
        assert f.read(3) == b"\xff\xd8\xff"  # JPEG
      image = cv2.imread(path, cv2.IMREAD_COLOR)
      h, w = image.shape[:2]
      assert 256 <= h <= 320 and 256 <= w <= 320
      lm = np.array(row[2].split(","), np.float64).reshape(98, 2)
      five = np.array(row[1].split(","), np.float64).reshape(5, 2)
      # The 5 points are copies of pupils, nose tip and mouth corners.
      np.testing.assert_array_equal(five, lm[[96, 97, 54, 76, 82]])
      # ADNet crop rule, recomputed here from the written landmarks.
      lo, hi = lm.min(0), lm.max(0)
      assert float(row[3]) == pytest.approx(max(hi - lo) / 200 * 1.05, abs=1e-6)
      assert float(row[4]) == pytest.approx((lo[0] + hi[0]) / 2, abs=1e-4)
      assert float(row[5]) == pytest.approx((lo[1] + hi[1]) / 2, abs=1e-4)
      tags = [int(t) for t in row[6].split(",")]
      assert len(tags) == 6 and set(tags) <= {0, 1}
      # The face lies (almost) inside the picture.
      assert (lm > -0.05 * np.array([w, h])).all() and (lm < 1.05 * np.array([w, h])).all()


def test_read_tsv_accepts_the_files(small):
  from star_jax.data import annotations
  ann = annotations.read_tsv(small.train_tsv, SPEC, image_dir=small.image_dir)
  assert ann.landmarks.shape == (COUNTS[0], 98, 2)


def _frontal(**overrides):
  values = dict(roll_deg=0.0, yaw=0.0, pitch=0.0, mouth_open=0.05, smile=0.0, brow_raise=0.0,
                eye_open=(1.0, 1.0), gaze=(0.0, 0.0))
  values.update(overrides)
  return synthetic_faces.FaceParams(**values)


def test_layout_mirrors_onto_the_flip_pairs():
  # Mirroring a frontal face (x -> -x) and relabelling by the flip pairs gives the face back,
  # up to the small per-point jitter the generator adds.
  canon = synthetic_faces.canonical_landmarks(_frontal(), np.random.default_rng(0))
  mirrored = canon[SPEC.flip_permutation()] * np.array([-1.0, 1.0])
  assert np.abs(mirrored - canon).max() < 0.05
  # Mirror-symmetric points lie on the midline.
  self_pairs = [i for i in range(98) if SPEC.flip_permutation()[i] == i]
  assert sorted(self_pairs) == [16, 51, 52, 53, 54, 57, 79, 85, 90, 94]
  assert np.abs(canon[self_pairs, 0]).max() < 0.03


def test_layout_semantics():
  canon = synthetic_faces.canonical_landmarks(_frontal(), np.random.default_rng(1))
  x, y = canon[:, 0], canon[:, 1]
  assert x[0] < x[16] < x[32]                       # temple, chin, temple: left to right
  assert y[16] == pytest.approx(y.max(), abs=0.02)  # the chin is the lowest point
  assert x[60] < x[64] < x[68] < x[72]              # outer, inner, inner, outer eye corners
  assert y[51] < y[52] < y[53] < y[54]              # nose bridge runs down to the tip
  assert x[76] < x[79] < x[82]                      # mouth corners around the upper lip top
  assert y[[33, 46]].max() < y[[60, 72]].min()      # brows above eyes
  assert y[54] < y[[76, 82]].min()                  # nose tip above the mouth corners
  for pupil, eye in ((96, range(60, 68)), (97, range(68, 76))):
    pts = canon[list(eye)]
    assert pts[:, 0].min() < x[pupil] < pts[:, 0].max()
  # Expressions move the right points.
  smiling = synthetic_faces.canonical_landmarks(_frontal(smile=0.12), np.random.default_rng(1))
  assert (smiling[[76, 82], 1] < canon[[76, 82], 1]).all()
  opened = synthetic_faces.canonical_landmarks(_frontal(mouth_open=0.25), np.random.default_rng(1))
  assert opened[94, 1] - opened[90, 1] > canon[94, 1] - canon[90, 1] + 0.15


def test_drawing_puts_dark_pupils_at_96_97():
  dark, skin = [], []
  for index in range(12):
    sample = synthetic_faces.generate_sample(
        embedded._image_rng(embedded.DEFAULT_SEED, "train", index))
    if sample.tags[[1, 2, 4, 5]].any():  # expression (closed eyes), light, occlusion, blur
      continue
    gray = cv2.cvtColor(sample.image, cv2.COLOR_RGB2GRAY).astype(np.float64)
    for p in (96, 97):
      x, y = np.round(sample.landmarks[p]).astype(int)
      dark.append(gray[y, x])
    # Cheek: between the outer eye corner and the jaw, inside the face.
    cheek = 0.5 * sample.landmarks[6] + 0.5 * sample.landmarks[54]
    skin.append(gray[int(round(cheek[1])), int(round(cheek[0]))])
  assert len(dark) >= 4
  assert np.mean(dark) < 70 and np.mean(dark) < np.mean(skin) - 30


def test_tags_vary_with_the_generator_choices():
  tags = np.array([synthetic_faces.generate_sample(
      embedded._image_rng(embedded.DEFAULT_SEED, "train", i)).tags for i in range(40)])
  rates = tags.mean(0)
  assert (rates > 0).all() and (rates < 0.7).all(), rates


def test_deterministic_and_independent_of_counts(small, tmp_path):
  other = embedded.ensure_embedded_dataset(str(tmp_path / "again"), counts=(2, 1, 1))
  for split in ("train", "val", "test"):
    _, rows_a = _rows(getattr(small, f"{split}_tsv"))
    _, rows_b = _rows(getattr(other, f"{split}_tsv"))
    assert rows_b == rows_a[:len(rows_b)]
    for row in rows_b:
      with open(os.path.join(small.image_dir, row[0]), "rb") as f:
        a = f.read()
      with open(os.path.join(other.image_dir, row[0]), "rb") as f:
        assert f.read() == a


def test_cache_reused_and_regenerated_when_stale(tmp_path, monkeypatch):
  root = tmp_path / "cache"
  files = embedded.ensure_embedded_dataset(str(root), counts=(2, 0, 1))
  first = os.path.join(files.image_dir, "train/00000.jpg")
  os.utime(first, (1, 1))
  embedded.ensure_embedded_dataset(str(root), counts=(2, 0, 1))
  assert os.stat(first).st_mtime == 1  # reused, not rewritten
  monkeypatch.setattr(embedded, "GENERATOR_VERSION", embedded.GENERATOR_VERSION + "-next")
  embedded.ensure_embedded_dataset(str(root), counts=(2, 0, 1))
  assert os.stat(first).st_mtime != 1
  with open(root / "STAMP.json") as f:
    assert json.load(f)["generator_version"].endswith("-next")
  # No partial folders left behind.
  assert sorted(os.listdir(tmp_path)) == ["cache"]


def test_env_var_sets_the_default_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("STAR_JAX_CACHE", str(tmp_path))
  assert embedded.default_cache_dir() == str(tmp_path / "embedded")


def test_cli_writes_dataset_and_preview(tmp_path):
  out, preview = tmp_path / "cli", tmp_path / "grid.png"
  embedded_command.main(["--out", str(out), "--counts", "4", "0", "0", "--preview", str(preview),
                 "--preview-count", "4"])
  grid = cv2.imread(str(preview))
  assert grid.shape == (512, 512, 3)
  assert os.path.exists(out / "train.tsv")
