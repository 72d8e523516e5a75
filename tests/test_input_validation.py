"""Inputs that today's checks refuse, each with one line: scheme files (a self pair, an index
equal to num_points), boxes of no width, annotation scale and centre far from the landmarks,
and a missing input file (exit 1, data, not 2)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from star_jax.core import schemes as datasets
from star_jax.data.annotations import BOX_TO_LANDMARKS, AnnotationError, read_tsv
from star_jax.deploy.detection import Box
from star_jax.errors import DataError, UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "official_wflw_data")
SHARED_FIXTURE = "/work/shared/fixtures/official_wflw_data"
WFLW = datasets.get_spec("wflw")


def _scheme(**changes):
  data = {"name": "five", "num_points": 5,
          "edges": [{"name": "all", "closed": False, "points": [0, 1, 2, 3, 4]}],
          "flip_pairs": [[0, 4], [1, 3]]}
  data.update(changes)
  return data


def test_a_valid_scheme_loads():
  spec = datasets.scheme_from_dict(_scheme())
  assert spec.num_points == 5 and spec.flip_pairs == ((0, 4), (1, 3))


@pytest.mark.parametrize("changes, fragment", [
    ({"flip_pairs": [[2, 2]]}, "flip_pairs[0] = [2, 2]"),
    ({"flip_pairs": [[0, 4], [1, 1]]}, "flip_pairs[1] = [1, 1]"),
    ({"flip_pairs": [[0, 5]]}, "flip_pairs[0] index must be an integer from 0 to 4, got 5"),
    ({"edges": [{"name": "e", "closed": False, "points": [0, 5]}]},
     "edges[0] point must be an integer from 0 to 4, got 5"),
    ({"ocular": [0, 5]}, "ocular index must be an integer from 0 to 4, got 5"),
    ({"pupil": [[0, 1], [2, 5]]}, "pupil index must be an integer from 0 to 4, got 5"),
])
def test_scheme_with_a_self_pair_or_an_index_equal_to_num_points_is_refused(tmp_path, changes,
                                                                             fragment):
  path = tmp_path / "scheme.json"
  path.write_text(json.dumps(_scheme(**changes)))
  with pytest.raises(UsageError) as info:
    datasets.load_scheme(str(path))
  message = str(info.value)
  assert message.startswith(f"{path}: ") and fragment in message and "\n" not in message


def test_a_missing_scheme_file_is_a_data_error(tmp_path):
  with pytest.raises(DataError, match="scheme file not found") as info:
    datasets.get_spec(str(tmp_path / "nope.json"))
  assert info.value.exit_code == 1


@pytest.mark.parametrize("text", ["10,10,10,20", "10,10,20,10", "10,10,5,20", "0,0,0,0"])
def test_boxes_of_no_width_or_height_are_refused(text):
  with pytest.raises(ValueError, match="x2 > x1 and y2 > y1"):
    Box.parse(text)
  with pytest.raises(ValueError, match="x2 > x1 and y2 > y1"):
    Box.checked([float(v) for v in text.split(",")])
  assert Box.parse("10,10,10.5,20") == Box(10, 10, 10.5, 20)


def test_predictor_refuses_a_given_box_of_no_width():
  from star_jax.training import model_store
  from star_jax.deploy.inference import Predictor
  predictor = Predictor(model_store.load_model(os.path.join(
      ROOT, "tests", "fixtures", "official_wflw_small", "checkpoint.pkl")))
  image = np.zeros((64, 64, 3), np.uint8)
  with pytest.raises(ValueError, match="x2 > x1"):
    predictor.plan(image, [(10, 10, 10, 40)])
  with pytest.raises(ValueError, match="x2 > x1"):
    predictor.plan(image, [Box(10, 10, 10, 40)])


# --------------------------------------------------------------------------------------------
# Annotation scale and centre: the face box (`scale * 200` pixels) must be 0.2-20 times the
# landmarks' extent, and the centre within max(box, extent) of the landmarks' centre (along
# each axis).

def _fixture_row():
  with open(os.path.join(FIXTURE, "test_noheader.tsv")) as f:
    row = f.readline().rstrip("\n").split("\t")
  row[0] = os.path.join(FIXTURE, row[0])
  return row


def _write(tmp_path, row):
  path = tmp_path / "a.tsv"
  path.write_text("\t".join(row) + "\n")
  return str(path)


def _geometry(row):
  lm = np.array(row[2].split(","), np.float64).reshape(-1, 2)
  lo, hi = lm.min(axis=0), lm.max(axis=0)
  return float((hi - lo).max()), (lo + hi) / 2


def test_the_real_fixtures_pass_the_bounds():
  for folder in (FIXTURE, SHARED_FIXTURE):
    for name in ("test.tsv", "test_noheader.tsv"):
      path = os.path.join(folder, name)
      if os.path.exists(path):
        ann = read_tsv(path, WFLW)
        assert len(ann) >= 2


@pytest.mark.parametrize("ratio, refused", [
    (BOX_TO_LANDMARKS[1] * 1.01, True), (BOX_TO_LANDMARKS[1] * 0.99, False),
    (BOX_TO_LANDMARKS[0] * 0.99, True), (BOX_TO_LANDMARKS[0] * 1.01, False),
])
def test_scale_far_from_the_landmark_box_is_refused(tmp_path, ratio, refused):
  row = _fixture_row()
  extent, _ = _geometry(row)
  row[3] = f"{ratio * extent / 200:.6f}"
  path = _write(tmp_path, row)
  if refused:
    with pytest.raises(AnnotationError, match=r"a\.tsv:1: scale .* is the scale column right"):
      read_tsv(path, WFLW)
  else:
    assert len(read_tsv(path, WFLW)) == 1


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("beyond, refused", [(1.05, True), (0.5, False)])
def test_centre_far_outside_the_landmark_box_is_refused(tmp_path, axis, beyond, refused):
  row = _fixture_row()
  extent, middle = _geometry(row)
  limit = max(float(row[3]) * 200, extent)
  centre = middle.copy()
  centre[axis] += beyond * limit
  row[4], row[5] = f"{centre[0]:.3f}", f"{centre[1]:.3f}"
  path = _write(tmp_path, row)
  if refused:
    with pytest.raises(AnnotationError, match=r"a\.tsv:1: centre .* is the centre column right"):
      read_tsv(path, WFLW, check_images=False)
  else:
    assert len(read_tsv(path, WFLW, check_images=False)) == 1


def test_the_error_names_the_first_bad_line_among_many(tmp_path):
  row = _fixture_row()
  extent, middle = _geometry(row)
  bad = list(row)
  bad[4] = f"{middle[0] + 3 * max(float(row[3]) * 200, extent):.3f}"
  rows = [row] * 5000 + [bad] + [row] * 10
  path = tmp_path / "many.tsv"
  path.write_text("".join("\t".join(r) + "\n" for r in rows))
  with pytest.raises(AnnotationError, match=r"many\.tsv:5001: centre"):
    read_tsv(str(path), WFLW)


def test_a_missing_annotation_file_is_a_data_error(tmp_path):
  with pytest.raises(AnnotationError, match="annotation file not found") as info:
    read_tsv(str(tmp_path / "absent.tsv"), WFLW)
  assert info.value.exit_code == 1


def test_a_small_file_draws_no_progress_bar(capfd):
  ann = read_tsv(os.path.join(FIXTURE, "test.tsv"), WFLW)
  assert len(ann) == 3 and capfd.readouterr().err == ""


def test_the_progress_bar_counts_the_file_bytes(monkeypatch):
  from star_jax.data import annotations
  bars = []
  real = annotations._progress_bar

  def recording(path, size, progress):
    bar = real(path, size, True)
    bars.append((bar, size))
    return bar
  monkeypatch.setattr(annotations, "_progress_bar", recording)
  path = os.path.join(FIXTURE, "test.tsv")
  read_tsv(path, WFLW)
  (bar, size), = bars
  assert size == os.path.getsize(path) and bar.n == size
