"""tf.data pipelines: official eval path, determinism, resume, sharding, padding, splits."""

import itertools
import os
import shutil

import cv2
import numpy as np
import pytest
import tensorflow as tf

from configs import base
from star_jax.data import annotations, pipeline, sources, targets, transforms
from star_jax.core.schemes import get_spec
from star_jax.errors import DataError, UsageError

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "official_wflw_data")
WFLW = get_spec("wflw")


def _config(image_size=64, batch_size=4, seed=0, tsv="test.tsv"):
  c = base.get_base_config("wflw")
  c.data.source = "tsv"
  c.data.image_dir = FIXTURE
  c.data.train_tsv = os.path.join(FIXTURE, tsv)
  c.data.test_tsv = os.path.join(FIXTURE, "test_noheader.tsv")
  c.data.val_tsv = ""
  c.data.val_fraction = 0.0
  c.data.image_size = image_size
  c.data.num_parallel_calls = 2
  c.batch_size = batch_size
  c.seed = seed
  return c


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_eval_batches_equal_official_test_path():
  expected = np.load(os.path.join(FIXTURE, "dataset_eval_expected.npz"))
  batches = _take(pipeline.eval_dataset(_config(256), "test", batch_size=2, process_index=0,
                                        process_count=1), 5)
  assert len(batches) == 2   # 3 rows -> 2 batches of 2, the last padded
  b = {k: np.concatenate([x[k] for x in batches]) for k in batches[0]}
  np.testing.assert_array_equal(b["mask"], [True, True, True, False])
  np.testing.assert_array_equal(b["index"][:3], [0, 1, 2])
  # evaluate.py's input: u8 / 255 * 2 - 1 of the official crop, RGB.
  crop = expected["crop_bgr_uint8"][..., ::-1].astype(np.float32)
  np.testing.assert_array_equal(b["image"][:3], crop / np.float32(255) * 2 - 1)
  # The dataset's (u8 - 127.5) / 127.5 agrees to 6e-8.
  np.testing.assert_allclose(b["image"][:3], (crop - 127.5) / 127.5, atol=1e-7)
  np.testing.assert_allclose(b["matrix"][:3], expected["matrix"], atol=0)
  np.testing.assert_allclose(b["landmarks"][:3], expected["landmarks"], atol=1e-4)
  np.testing.assert_array_equal(b["landmarks_px"][:3], expected["landmarks_gt"])
  np.testing.assert_array_equal(b["tags"][:3], expected["tags"])
  chex_shapes = {"image": (2, 256, 256, 3), "landmarks": (2, 98, 2), "matrix": (2, 3, 3),
                 "landmarks_px": (2, 98, 2), "index": (2,), "tags": (2, 6), "mask": (2,),
                 "path": (2,), "position": (2,), "problem": (2,)}
  assert {k: v.shape for k, v in batches[0].items()} == chex_shapes
  np.testing.assert_array_equal(b["position"], [0, 1, 2, 0])
  assert not b["problem"].any()


def test_eval_sharding_covers_every_row_once():
  config = _config(64)
  shares = []
  for p in range(2):
    batches = list(pipeline.eval_dataset(config, "test", batch_size=1, process_index=p,
                                         process_count=2))
    assert len(batches) == 2   # same batch count on every process
    shares.append(np.concatenate([b["index"][b["mask"]] for b in batches]))
  np.testing.assert_array_equal(np.sort(np.concatenate(shares)), [0, 1, 2])


def test_train_batches_shapes_and_ranges():
  config = _config(64)
  batch = next(pipeline.train_dataset(config, process_index=0, process_count=1))
  assert batch["image"].shape == (4, 64, 64, 3) and batch["image"].dtype == np.float32
  assert batch["landmarks"].shape == (4, 98, 2)
  assert batch["pointmaps"].shape == (4, 16, 16, 98)
  assert batch["edgemaps"].shape == (4, 16, 16, 9)
  assert batch["index"].dtype == np.int64
  assert -1 <= batch["image"].min() and batch["image"].max() <= 1
  assert np.abs(batch["landmarks"]).max() <= 1
  assert 0 <= batch["pointmaps"].min() and batch["pointmaps"].max() <= 1


def test_same_seed_same_batches_and_seed_changes_them():
  a = _take(pipeline.train_dataset(_config(seed=3), process_index=0, process_count=1), 2)
  b = _take(pipeline.train_dataset(_config(seed=3), process_index=0, process_count=1), 2)
  c = _take(pipeline.train_dataset(_config(seed=4), process_index=0, process_count=1), 2)
  assert all(_equal(x, y) for x, y in zip(a, b))
  assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_start_step_resumes_the_stream_and_epochs_permute():
  config = _config(seed=1)
  stream = _take(pipeline.train_dataset(config, process_index=0, process_count=1), 3)
  resumed = _take(pipeline.train_dataset(config, start_step=2, process_index=0,
                                         process_count=1), 1)
  assert _equal(stream[2], resumed[0])
  # Positions 0..11 span 4 epochs of 3 records: each epoch visits every record once.
  order = np.concatenate([b["index"] for b in stream])
  for epoch in range(4):
    np.testing.assert_array_equal(np.sort(order[3 * epoch:3 * epoch + 3]), [0, 1, 2])


def test_process_shards_make_up_the_global_batch():
  config = _config(seed=2)
  whole = _take(pipeline.train_dataset(config, process_index=0, process_count=1), 2)
  parts = [_take(pipeline.train_dataset(config, process_index=p, process_count=2), 2)
           for p in range(2)]
  for step in range(2):
    for key in whole[step]:
      np.testing.assert_array_equal(
          whole[step][key], np.concatenate([parts[0][step][key], parts[1][step][key]]))
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.train_dataset(_config(batch_size=3), process_index=0, process_count=2)


def test_one_thread_gives_the_same_batches():
  config = _config(seed=5)
  a = _take(pipeline.train_dataset(config, process_index=0, process_count=1), 1)[0]
  b = _take(pipeline.train_dataset(config, process_index=0, process_count=1, num_threads=1),
            1)[0]
  assert _equal(a, b)


def test_pipelines_run_without_autotuning_at_the_stated_parallelism(monkeypatch):
  # Autotuning made each finished pass hang in the iterator's teardown (see pipeline._options).
  config = _config()
  train = pipeline.build_train_dataset(config, process_index=0, process_count=1)
  evaluation = pipeline.build_eval_dataset(config, "test", batch_size=2, process_index=0,
                                           process_count=1)
  for dataset in (train, evaluation):
    assert dataset.options().autotune.enabled is False
    assert dataset.options().deterministic is True
  config.data.num_parallel_calls = -1
  monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: {0, 3, 5})
  assert pipeline._parallel(config, None) == 3
  assert pipeline._parallel(config, 1) == 1
  config.data.num_parallel_calls = 4
  assert pipeline._parallel(config, None) == 4


def test_image_headers_are_read_once_per_image(monkeypatch):
  # 3 records, 4 batches of 4: 16 samples over 5+ epochs, each image's size read once.
  from star_jax.data import images
  reads = []
  real = images.image_size_file
  monkeypatch.setattr(images, "image_size_file", lambda path: reads.append(path) or real(path))
  batches = _take(pipeline.train_dataset(_config(seed=7), process_index=0, process_count=1), 4)
  assert len(batches) == 4 and sum(len(b["index"]) for b in batches) == 16
  assert sorted(reads) == sorted(set(reads)) and len(reads) == 3
  expected = [cv2.imread(path).shape[:2] for path in sorted(reads)]
  assert [tuple(real(path)) for path in sorted(reads)] == expected


def test_train_example_equals_official_recipe():
  """An example rebuilt from its parameters the official way (whole image, flip first)."""
  config = _config(image_size=256, batch_size=1, seed=11)
  ann = annotations.read_tsv(config.data.train_tsv, WFLW)
  it = pipeline.train_dataset(config, process_index=0, process_count=1)
  for position, batch in enumerate(_take(it, 3)):
    row = int(batch["index"][0])
    params = transforms.sample_params(transforms.example_rng(11, position),
                                      dict(config.data.augment), 1.0, 256)
    image = cv2.imread(ann.image_paths[row], cv2.IMREAD_COLOR)[..., ::-1]
    landmarks, center_w = ann.landmarks[row], ann.center[row][0]
    width = image.shape[1]
    if params.flip:   # the official flips the whole photo before cropping
      image = image[:, ::-1]
      landmarks = transforms.flip_landmarks(landmarks, width, WFLW)
      center_w = width - 1 - center_w
    matrix = transforms.geometry_matrix(params, 256) @ transforms.crop_matrix(
        ann.scale[row], center_w, ann.center[row][1], 256)
    crop = transforms.apply_texture(
        transforms.warp(np.ascontiguousarray(image), matrix, 256), params)
    got = np.round((batch["image"][0] * 127.5) + 127.5).astype(int)
    diff = np.abs(got - crop.astype(int))
    assert diff.max() <= 2 and (diff > 0).mean() < 1e-3
    px = transforms.transform_points(landmarks, matrix)
    np.testing.assert_allclose(batch["landmarks"][0], transforms.normalize_landmarks(px, 256),
                               atol=1e-6)
    np.testing.assert_allclose(batch["pointmaps"][0], targets.point_maps(px, 256), atol=1e-6)
    np.testing.assert_allclose(batch["edgemaps"][0], targets.edge_maps(px, WFLW, 256),
                               atol=1e-6)


def test_carved_validation_split_is_disjoint(tmp_path):
  rows = open(os.path.join(FIXTURE, "test_noheader.tsv")).read().splitlines()
  lines = [os.path.join(FIXTURE, r.split("\t")[0]) + "\t" + r.split("\t", 1)[1]
           for r in rows] * 10
  path = tmp_path / "train.tsv"
  path.write_text("\n".join(lines) + "\n")
  config = _config()
  config.data.train_tsv = str(path)
  config.data.val_fraction = 0.1
  source = sources.source_for(config)
  train_ann, train_rows = source.annotations("train")
  val_ann, val_rows = source.annotations("val")
  assert len(val_rows) == 3 and len(train_rows) == 27
  assert not set(train_rows) & set(val_rows)
  batches = list(pipeline.eval_dataset(config, "val", batch_size=2, process_index=0,
                                       process_count=1))
  got = np.concatenate([b["index"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(got, val_rows)


def test_headerless_tsv_keeps_first_row():
  config = _config()
  ann, rows = sources.source_for(config).annotations("test")   # test_noheader.tsv
  assert len(ann) == 3
  np.testing.assert_array_equal(rows, [0, 1, 2])


class _RecordSource(sources.TfdsSource):
  """TFDS-style records (stored crops with offsets) made in memory from the fixture TSV."""

  def __init__(self, config, images, offsets, ann):
    sources.Source.__init__(self, config)
    self._images, self._offsets, self._ann = images, offsets, ann

  def num_examples(self, split):
    return len(self._images)

  def _load(self, split):
    images, offsets, ann = self._images, self._offsets, self._ann

    def gen():
      for i in range(len(images)):
        off = np.asarray(offsets[i], np.float64)
        yield dict(pixels=images[i], landmarks=ann.landmarks[i] - off.astype(np.float32),
                   scale=ann.scale[i], center=ann.center[i] - off, tags=ann.tags[i],
                   index=np.int64(i), offset=off, path=ann.raw_paths[i])
    sig = dict(pixels=tf.TensorSpec([None, None, 3], tf.uint8),
               landmarks=tf.TensorSpec([98, 2], tf.float32), scale=tf.TensorSpec([], tf.float64),
               center=tf.TensorSpec([2], tf.float64), tags=tf.TensorSpec([6], tf.int32),
               index=tf.TensorSpec([], tf.int64), offset=tf.TensorSpec([2], tf.float64),
               path=tf.TensorSpec([], tf.string))
    return tf.data.Dataset.from_generator(gen, output_signature=sig).apply(
        tf.data.experimental.assert_cardinality(len(images)))

  def _stored_train_records(self):
    return self._load("train"), lambda pixels: pixels   # held decoded, in memory


def test_stored_crops_with_offset_equal_tsv_eval():
  """A stored, margin-padded face crop with shifted labels (the TFDS source) gives the same eval
  batch as the TSV source."""
  config = _config(256)
  ann = annotations.read_tsv(config.data.test_tsv, WFLW)
  images, offsets = [], []
  for i, path in enumerate(ann.image_paths):
    image = cv2.imread(path)[..., ::-1]
    y0, x0 = 7 * i + 3, 5 * i + 1
    images.append(np.ascontiguousarray(image[y0:, x0:]))
    offsets.append((x0, y0))
  records = _RecordSource(config, images, offsets, ann)
  tsv = list(pipeline.eval_dataset(config, "test", batch_size=4, process_index=0,
                                   process_count=1))[0]
  rec = list(pipeline.eval_dataset(config, "test", batch_size=4, process_index=0,
                                   process_count=1, source=records))[0]
  np.testing.assert_array_equal(rec["mask"], tsv["mask"])
  np.testing.assert_array_equal(rec["path"], tsv["path"])
  np.testing.assert_allclose(rec["matrix"], tsv["matrix"], atol=1e-4)
  np.testing.assert_allclose(rec["landmarks"][:3], tsv["landmarks"][:3], atol=1e-4)
  np.testing.assert_allclose(rec["landmarks_px"][:3], tsv["landmarks_px"][:3], atol=1e-3)
  diff = np.abs(rec["image"][:3] - tsv["image"][:3]) * 127.5
  assert diff.max() <= 2.01 and (diff > 0.5).mean() < 1e-3
  # Training from records runs and keeps the batch contract.
  batch = next(pipeline.train_dataset(config, process_index=0, process_count=1, source=records))
  assert batch["image"].shape == (4, 256, 256, 3) and batch["edgemaps"].shape == (4, 64, 64, 9)


def test_source_for_each_kind():
  config = _config()
  source = sources.source_for(config)
  assert isinstance(source, sources.TsvSource) and source.image_dir() == FIXTURE
  config.data.source = "nope"
  with pytest.raises(UsageError, match="config.data.source='nope'"):
    sources.source_for(config)


def test_unreadable_image_is_named_with_its_tsv_line(tmp_path):
  """A truncated image fails inside tf.data; the error names the TSV line and the file."""
  rows = open(os.path.join(FIXTURE, "test_noheader.tsv")).read().splitlines()
  for name in os.listdir(os.path.join(FIXTURE, "images")):
    shutil.copy(os.path.join(FIXTURE, "images", name), tmp_path / name)
  bad = rows[1].split("\t")[0]
  data = (tmp_path / os.path.basename(bad)).read_bytes()
  (tmp_path / os.path.basename(bad)).write_bytes(data[:len(data) // 3])
  tsv = tmp_path / "train.tsv"
  tsv.write_text("\n".join(os.path.basename(r.split("\t")[0]) + "\t" + r.split("\t", 1)[1]
                           for r in rows) + "\n")
  config = _config(64, batch_size=3)
  config.data.train_tsv = str(tsv)
  config.data.test_tsv = str(tsv)
  config.data.image_dir = str(tmp_path)
  for make in (lambda: next(pipeline.train_dataset(config, process_index=0, process_count=1)),
               lambda: list(pipeline.eval_dataset(config, "test", batch_size=2,
                                                  process_index=0, process_count=1))):
    with pytest.raises(DataError) as info:
      make()
    assert f"{tsv}:2: " in str(info.value) and os.path.basename(bad) in str(info.value)
  with pytest.raises(DataError, match=f"{tsv}:2: "):
    sources.check_images(sources.source_for(config), "test", progress=False)
