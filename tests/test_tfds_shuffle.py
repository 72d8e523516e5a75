"""The TFDS training shuffle holds encoded records and decodes after the shuffle: same stream as
a shuffle of decoded records with the same seed and buffer, pixel for pixel."""

from __future__ import annotations

import os

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

import tensorflow as tf  # noqa: E402

from configs import base  # noqa: E402
from star_jax.data import sources  # noqa: E402
from star_jax.commands import tfds_builders as tfds_builders_command  # noqa: E402
from tests import tiny_data  # noqa: E402


@pytest.fixture(scope="module")
def wflw_tfds_jpeg(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds_shuffle")
  files = tiny_data.wflw(str(root / "manual"), counts=(12, 4, 4))
  data_dir = str(root / "data")
  assert tfds_builders_command.main(["wflw", "--manual_dir", os.path.dirname(files.train_tsv),
                             "--data_dir", data_dir, "--config", "jpeg"]) == 0
  return data_dir


def test_training_stream_equals_a_shuffle_of_decoded_records(wflw_tfds_jpeg):
  config = base.get_base_config("wflw")
  config.data.source = "tfds"
  config.data.tfds_data_dir = wflw_tfds_jpeg
  source = sources.source_for(config)
  num = source.num_examples("train")
  assert num == 12
  seed, first = 7, 3
  # The former stream: decoded records in the shuffle buffer.
  decoded = source._load("train").shuffle(num, seed=seed, reshuffle_each_iteration=True)
  reference = tf.data.Dataset.zip(tf.data.Dataset.range(0, 1 << 40),
                                  decoded.repeat()).skip(first)
  # What the buffer holds now: the stored bytes.
  stored = source._load("train", decode_image=False)
  assert stored.element_spec["pixels"].dtype == tf.string
  got = source.train_records(seed, first)
  # JPEG-stored crops stay encoded in the stream too (each sample decodes its window).
  assert source.decodes_windows()
  assert got.element_spec[1]["pixels"].dtype == tf.string
  decode = source.builder.info.features["image"].decode_example
  count = 2 * num + 2                    # across two epoch boundaries
  for (pos, record), (ref_pos, ref) in zip(got.take(count).as_numpy_iterator(),
                                           reference.take(count).as_numpy_iterator()):
    assert pos == ref_pos
    assert record["index"] == ref["index"]
    np.testing.assert_array_equal(decode(tf.constant(record["pixels"])).numpy(), ref["pixels"])
    np.testing.assert_array_equal(record["landmarks"], ref["landmarks"])
  assert sources.TFDS_SHUFFLE_BUFFER >= 7500   # all of a WFLW-sized training split


def test_window_decodes_give_the_samples_of_whole_decodes(wflw_tfds_jpeg, monkeypatch):
  """Training samples (augmented crops and targets) from JPEG windows equal those from the
  stored crops decoded whole, bit for bit."""
  from star_jax.data import pipeline
  config = base.get_base_config("wflw")
  config.data.source = "tfds"
  config.data.tfds_data_dir = wflw_tfds_jpeg
  config.data.image_size = 64
  config.batch_size = 4
  config.data.aug_prob = 1.0

  def batches(windows: bool):
    monkeypatch.setattr(sources.TfdsSource, "decodes_windows", lambda self: windows)
    stream = pipeline.train_dataset(config, start_step=0, num_threads=1)
    return [next(stream) for _ in range(6)]   # two epochs of 12

  windowed, whole = batches(True), batches(False)
  for a, b in zip(windowed, whole, strict=True):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
