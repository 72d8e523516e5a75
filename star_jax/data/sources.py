"""Where examples come from: one interface over TSV files, the embedded dataset and TFDS.

`source_for(config)` returns a `Source`; the pipeline (star_jax/data/pipeline.py) only talks to
that interface and never asks which kind it has. A source knows its splits ('train', 'val',
'test'), hands the pipeline per-example records as tf.data datasets, reads the pixels a record
names (the whole image, or only the window a training crop reads), and says where an example
came from (`describe`: `file:line` of its TSV row), so that errors can name it.

Splits. Without a validation file, 'val' is `config.data.val_fraction` of the training rows
(at most `MAX_CARVED_VAL_ROWS`), chosen by `carved_val_rows` with a fixed seed (the same rows
whatever the training seed), and 'train' is the rest. This rule is the same for every source: a
TFDS dataset built without a `val` split carves the same rows of its `train` split (its records
keep their TSV row index).

Record fields (tf.data element dicts): `landmarks` (N, 2) float32, `scale` float64, `center`
(2,) float64, `tags` (T,) int32, `index` int64 (row of the split's TSV), `path` string (as
written in the TSV, for reports and subset rules); TSV records add `file` (absolute image path),
TFDS records `pixels` (the stored uint8 crop) and `offset` (2,) float64 (where the stored crop
starts in the original image).
"""

from __future__ import annotations

import abc
import os
from typing import Any

import numpy as np
import tensorflow as tf

from star_jax.data import images as image_io
from star_jax.data.annotations import Annotations, DataFiles, read_tsv
from star_jax.core.schemes import DatasetSpec, get_spec
from star_jax.registry import Registry
from star_jax.errors import DataError, UsageError
from star_jax.deploy.image_io import ImageError, load_image

SPLITS = ("train", "val", "test")
# The carved validation split does not depend on the training seed: the same images are held
# out whichever seed trains.
VAL_SPLIT_SEED = 20230601
SOURCES = ("tsv", "embedded", "tfds")
# A carved validation split holds at most this many rows (WFLW's 5% is 375): with a million
# training rows, 5% would be validated (before the first step, and at every validation) for no
# better an estimate.
MAX_CARVED_VAL_ROWS = 1000
# The inverse DCT TFDS's image feature decodes JPEG crops with (TensorFlow's default).
TFDS_DCT_METHOD = ""
# Records a TFDS training shuffle holds at most (a whole WFLW training split fits).
TFDS_SHUFFLE_BUFFER = 20000


def carved_val_rows(num_rows: int, fraction: float) -> np.ndarray:
  """The training rows held out for validation (sorted), by the fixed-seed rule above."""
  if num_rows < 2:
    raise DataError(f"a training set of {num_rows} example(s) cannot give a validation split; "
                    "set config.data.val_tsv or config.data.val_fraction=0")
  num_val = min(int(round(num_rows * fraction)), MAX_CARVED_VAL_ROWS)
  num_val = min(max(num_val, 1), num_rows - 1)
  perm = np.random.default_rng(VAL_SPLIT_SEED).permutation(num_rows)
  return np.sort(perm[:num_val])


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise UsageError(f"split {split!r}: use one of {', '.join(SPLITS)}")


class Source(abc.ABC):
  """The examples of one dataset configuration, split into train / val / test."""

  def __init__(self, config):
    self.config = config
    self.spec: DatasetSpec = get_spec(config.dataset)

  @abc.abstractmethod
  def num_examples(self, split: str) -> int:
    """How many examples `split` holds."""

  @abc.abstractmethod
  def records(self, split: str) -> tf.data.Dataset:
    """The split's records in row order (finite, known cardinality)."""

  @abc.abstractmethod
  def train_records(self, seed: int, first_position: int) -> tf.data.Dataset:
    """Endless `(position, record)` pairs of the training stream from `first_position` on."""

  @abc.abstractmethod
  def image_hw(self, record) -> tf.Tensor:
    """(height, width) int32 of the record's image (of the stored crop, for TFDS)."""

  @abc.abstractmethod
  def read_window(self, record, window: tf.Tensor) -> tf.Tensor:
    """uint8 RGB pixels `window = (y, x, h, w)` of the record's image (inside it)."""

  def image_file(self, record) -> tf.Tensor | None:
    """The path of the record's image file, for callers that decode it themselves (with
    `check_image`'s decoder); None when the source hands over decoded pixels."""
    return None

  @abc.abstractmethod
  def read_image(self, record) -> tuple[tf.Tensor, tf.Tensor]:
    """(uint8 RGB pixels, offset (2,) float64 of those pixels in the original image)."""

  @abc.abstractmethod
  def describe(self, split: str, index: int) -> str:
    """Where row `index` of `split` comes from, for messages (`file:line: image`)."""

  @abc.abstractmethod
  def check_image(self, split: str, index: int) -> str | None:
    """Decodes row `index`'s image outside tf.data: None if fine, else why not."""

  def image_dir(self) -> str | None:
    """The folder TSV image paths are relative to (subset rules match below it), if any."""
    return None

  def label(self, split: str) -> str:
    """What `split` is, for titles and reports: the scheme, the split and its file."""
    return f"{self.spec.name} {split}"


# ---------------------------------------------------------------------------------------------
# TSV files (and the embedded dataset, which is TSV files generated on demand).


def _read(path: str, spec: DatasetSpec, image_dir: str, what: str) -> Annotations:
  if not path:
    raise UsageError(f"config.data.{what} is empty: no {what.split('_')[0]} annotations")
  return read_tsv(path, spec, image_dir=image_dir or None)


class TsvSource(Source):
  """Examples listed in official-format TSV files; images decoded from their files."""

  def __init__(self, config, files: DataFiles | None = None):
    super().__init__(config)
    data = config.data
    self.files = files or DataFiles(image_dir=data.image_dir, train_tsv=data.train_tsv,
                                    val_tsv=data.val_tsv, test_tsv=data.test_tsv)
    self._parsed: dict[str, Annotations] = {}               # TSV path -> its rows
    self._splits: dict[str, tuple[Annotations, np.ndarray]] = {}
    # Image file -> (height, width): each header is read once, not once per epoch.
    self._sizes: dict[bytes, np.ndarray] = {}

  def image_dir(self) -> str | None:
    return self.files.image_dir or None

  def _read_once(self, path: str, what: str) -> Annotations:
    """Each TSV file is read once, however many splits it holds ('train' and a carved 'val')."""
    if path not in self._parsed:
      self._parsed[path] = _read(path, self.spec, self.files.image_dir, what)
    return self._parsed[path]

  def _split(self, split: str) -> tuple[Annotations, np.ndarray]:
    """(all rows of the split's TSV, the rows of it that the split holds)."""
    _check_split(split)
    if split not in self._splits:
      self._splits[split] = self._split_rows(split)
    return self._splits[split]

  def _split_rows(self, split: str) -> tuple[Annotations, np.ndarray]:
    files = self.files
    if split == "test":
      ann = self._read_once(files.test_tsv, "test_tsv")
      return ann, np.arange(len(ann))
    if split == "val" and files.val_tsv:
      ann = self._read_once(files.val_tsv, "val_tsv")
      return ann, np.arange(len(ann))
    train = self._read_once(files.train_tsv, "train_tsv")
    fraction = float(self.config.data.val_fraction)
    carve = not files.val_tsv and fraction > 0
    if split == "val":
      if not carve:
        raise UsageError("split 'val' needs config.data.val_tsv or config.data.val_fraction > 0")
      return train, carved_val_rows(len(train), fraction)
    rows = np.arange(len(train))
    if carve:
      rows = np.setdiff1d(rows, carved_val_rows(len(train), fraction))
    return train, rows

  def annotations(self, split: str) -> tuple[Annotations, np.ndarray]:
    """(annotations, TSV row of each) of `split` (see the module docstring for 'val')."""
    ann, rows = self._split(split)
    return (ann if len(rows) == len(ann) else ann.subset(rows)), rows

  def num_examples(self, split: str) -> int:
    return len(self._split(split)[1])

  def _record_at(self, split: str):
    """`record(i)`: the tf.data record of the split's i-th example, looked up in the parsed
    arrays themselves (a tf constant would copy them: twice their size while it is made)."""
    ann, rows = self._split(split)
    rows = np.asarray(rows, np.int64)
    n = self.spec.num_points

    def lookup(i):
      row = rows[int(i)]
      return (ann.image_paths[row].encode(), ann.raw_paths[row].encode(), ann.landmarks[row],
              ann.scale[row], ann.center[row], ann.tags[row], row)

    def record(i):
      fields = tf.numpy_function(lookup, [i], (tf.string, tf.string, tf.float32, tf.float64,
                                               tf.float64, tf.int32, tf.int64), stateful=False)
      shapes = ([], [], [n, 2], [], [2], [ann.tags.shape[1]], [])
      for tensor, shape in zip(fields, shapes):
        tensor.set_shape(shape)
      return dict(zip(("file", "path", "landmarks", "scale", "center", "tags", "index"),
                      fields))
    return record

  def records(self, split: str) -> tf.data.Dataset:
    return tf.data.Dataset.range(self.num_examples(split)).map(self._record_at(split))

  def train_records(self, seed: int, first_position: int) -> tf.data.Dataset:
    """Position i is record `perm_epoch[i % n]` of epoch `i // n` (stateless shuffles)."""
    num = self.num_examples("train")
    record = self._record_at("train")

    def epoch_order(epoch):
      perm = tf.random.experimental.stateless_shuffle(
          tf.range(num, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
      return tf.data.Dataset.from_tensor_slices(perm)

    first_epoch = first_position // num
    order = tf.data.Dataset.range(first_epoch, _INFINITE).flat_map(epoch_order)
    order = order.skip(first_position - first_epoch * num)
    gathered = order.map(record)
    return tf.data.Dataset.zip(tf.data.Dataset.range(first_position, _INFINITE), gathered)

  def train_row_at(self, seed: int, position: int) -> int:
    """The training-split row the stream reads at `position` (for error reports)."""
    num = self.num_examples("train")
    perm = tf.random.experimental.stateless_shuffle(
        tf.range(num, dtype=tf.int64),
        seed=tf.constant([seed, position // num], tf.int64)).numpy()
    return int(perm[position % num])

  def _image_size(self, file: bytes) -> np.ndarray:
    size = self._sizes.get(file)
    if size is None:   # racing threads may both read it: the same value, stored twice
      size = self._sizes[file] = image_io.image_size_file(os.fsdecode(file))
    return size

  def image_hw(self, record) -> tf.Tensor:
    hw = tf.numpy_function(self._image_size, [record["file"]], tf.int32, stateful=False)
    return tf.ensure_shape(hw, [2])

  def read_window(self, record, window: tf.Tensor) -> tf.Tensor:
    return image_io.decode_window_tensor(tf.io.read_file(record["file"]), window)

  def image_file(self, record) -> tf.Tensor:
    return record["file"]

  def read_image(self, record) -> tuple[tf.Tensor, tf.Tensor]:
    return (image_io.decode_tensor(tf.io.read_file(record["file"])),
            tf.zeros([2], tf.float64))

  def describe(self, split: str, index: int) -> str:
    ann, rows = self._split(split)
    row = int(rows[index])
    return f"{ann.tsv_path}:{int(ann.line_numbers[row])}: {ann.image_paths[row]}"

  def label(self, split: str) -> str:
    ann, _ = self.annotations(split)
    carved = " (rows held out of it)" if split == "val" and not self.files.val_tsv else ""
    return f"{self.spec.name} {split}, {os.path.basename(ann.tsv_path)}{carved}"

  def check_image(self, split: str, index: int) -> str | None:
    ann, rows = self._split(split)
    path = ann.image_paths[int(rows[index])]
    try:
      load_image(path)
    except ImageError as e:
      return str(e).removeprefix(f"{path}: ")
    return None


class EmbeddedSource(TsvSource):
  """The synthetic dataset shipped with star-jax (generated and cached on first use)."""

  def __init__(self, config):
    from star_jax.data import embedded
    files = embedded.ensure_embedded_dataset(cache_dir=config.data.embedded_dir or None)
    super().__init__(config, files)

  def label(self, split: str) -> str:
    ann, _ = self.annotations(split)
    return (f"embedded synthetic faces {split}, {os.path.basename(ann.tsv_path)} "
            f"({self.spec.name} scheme)")


# ---------------------------------------------------------------------------------------------
# TFDS (star_jax/data/tfds_builders.py): margin-padded face crops, decoded by TFDS.


class TfdsSource(Source):
  """Examples of a prepared star-jax TFDS dataset (its `train`, `test` and optional `val`)."""

  def __init__(self, config):
    super().__init__(config)
    from star_jax.data import tfds_builders
    self._builders = tfds_builders
    self.builder = tfds_builders.prepared_builder(config)
    self._splits = {name: int(info.num_examples)
                    for name, info in self.builder.info.splits.items()}
    self._val_rows: np.ndarray | None = None
    if "val" not in self._splits and float(config.data.val_fraction) > 0:
      self._val_rows = carved_val_rows(self._splits["train"], float(config.data.val_fraction))

  def _raw_split(self, split: str) -> str:
    _check_split(split)
    if split == "val" and "val" not in self._splits:
      if self._val_rows is None:
        raise UsageError(f"{self.builder.name} has no 'val' split and "
                         "config.data.val_fraction is 0: nothing to validate on")
      return "train"
    return split

  def num_examples(self, split: str) -> int:
    raw = self._raw_split(split)
    if raw == "train" and self._val_rows is not None:
      carved = len(self._val_rows)
      return carved if split == "val" else self._splits["train"] - carved
    return self._splits[raw]

  def _filtered(self, split: str, dataset: tf.data.Dataset) -> tf.data.Dataset:
    if self._raw_split(split) != "train" or self._val_rows is None:
      return dataset
    held_out = np.zeros(self._splits["train"], bool)
    held_out[self._val_rows] = True
    mask = tf.constant(held_out if split == "val" else ~held_out)
    count = self.num_examples(split)
    return dataset.filter(lambda r: tf.gather(mask, r["index"])).apply(
        tf.data.experimental.assert_cardinality(count))

  def _load(self, split: str, *, decode_image: bool = True) -> tf.data.Dataset:
    return self._filtered(split, self._builders.load_records(
        self.builder, self._raw_split(split), decode_image=decode_image))

  def records(self, split: str) -> tf.data.Dataset:
    return self._load(split)

  def train_records(self, seed: int, first_position: int) -> tf.data.Dataset:
    """A seeded shuffle per epoch (no random access in TFDS shards); resuming re-reads the
    skipped records.

    The shuffle buffer holds the records as stored (the encoded image bytes plus the small
    annotation tensors), up to `TFDS_SHUFFLE_BUFFER` of them, and each image is decoded after
    the shuffle: the buffer costs about the encoded size of the training split, not its
    decoded crops. The order is the same as a shuffle of decoded records with the same seed
    and buffer (it does not depend on the contents).
    """
    num = self.num_examples("train")
    if num <= 0:
      raise DataError(f"{self.builder.name}: the training split is empty")
    stored, decode = self._stored_train_records()
    shuffled = stored.shuffle(
        min(num, TFDS_SHUFFLE_BUFFER), seed=seed, reshuffle_each_iteration=True).repeat()
    if not self.decodes_windows():
      shuffled = shuffled.map(lambda r: {**r, "pixels": decode(r["pixels"])},
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return tf.data.Dataset.zip(tf.data.Dataset.range(0, _INFINITE),
                               shuffled).skip(first_position)

  def decodes_windows(self) -> bool:
    """Whether training records keep their JPEG bytes and each sample decodes only the window
    its crop reads (as the TSV source does; bit-identical to decoding the stored crop whole and
    slicing, given the planner's margin: star_jax.data.images). A stored crop spans every draw
    up to 3 sigma, most of the photo, while one draw reads a fraction of it. PNG-stored crops
    are decoded whole."""
    config = getattr(getattr(self, "builder", None), "builder_config", None)
    return getattr(config, "encoding", None) == "jpeg"

  def _stored_train_records(self) -> tuple[tf.data.Dataset, Any]:
    """(the training records with `pixels` as stored, encoded; the decoder of `pixels`)."""
    return (self._load("train", decode_image=False),
            self.builder.info.features["image"].decode_example)

  def image_hw(self, record) -> tf.Tensor:
    pixels = record["pixels"]
    if pixels.dtype == tf.string:   # JPEG bytes (decodes_windows): the header says it
      return tf.image.extract_jpeg_shape(pixels)[:2]
    return tf.shape(pixels)[:2]

  def read_window(self, record, window: tf.Tensor) -> tf.Tensor:
    pixels = record["pixels"]
    if pixels.dtype == tf.string:
      # TFDS's decoder (the whole-crop path, and evaluation) uses TensorFlow's default inverse
      # DCT, not the cv2-equal one: the same here keeps the samples those of a whole decode.
      return image_io.decode_window_tensor(pixels, window, dct_method=TFDS_DCT_METHOD)
    return pixels[window[0]:window[0] + window[2], window[1]:window[1] + window[3]]

  def read_image(self, record) -> tuple[tf.Tensor, tf.Tensor]:
    return record["pixels"], tf.cast(record["offset"], tf.float64)

  def describe(self, split: str, index: int) -> str:
    return f"{self.builder.name}/{self._raw_split(split)} row {index}"

  def label(self, split: str) -> str:
    return f"TFDS {self.builder.name} {split}"

  def check_image(self, split: str, index: int) -> str | None:
    return None  # TFDS decoded and re-encoded every image when the dataset was built


_INFINITE = np.iinfo(np.int64).max // 4


SOURCE_KINDS: Registry[type] = Registry("data source")
SOURCE_KINDS.register("tsv", TsvSource)
SOURCE_KINDS.register("embedded", EmbeddedSource)
SOURCE_KINDS.register("tfds", TfdsSource)


def source_for(config) -> Source:
  """The source `config.data.source` names ('tsv', 'embedded' or 'tfds')."""
  kind = str(config.data.source)
  source = SOURCE_KINDS.lookup(kind)
  if source is None:
    raise UsageError(f"config.data.source={kind!r}: use one of {', '.join(SOURCES)}")
  return source(config)


def check_images(source: Source, split: str, *, progress: bool = True,
                 log=None, threads: int = 4) -> None:
  """Decodes every image of `split` once; DataError naming each unreadable one (file:line).

  Every bad image is reported through `log` (one line each); the error names the count and
  the first one.
  """
  from concurrent import futures
  import sys
  count = source.num_examples(split)
  bad: list[str] = []
  iterator: Any = range(count)
  with futures.ThreadPoolExecutor(max(1, threads)) as pool:
    results = pool.map(lambda i: (i, source.check_image(split, i)), iterator)
    if progress:
      from tqdm import tqdm
      results = tqdm(results, total=count, desc=f"checking {split} images", unit="image",
                     file=sys.stderr, mininterval=1.0)
    for index, problem in results:
      if problem is not None:
        line = f"{source.describe(split, index)}: {problem}"
        bad.append(line)
        if log is not None:
          log(line)
  if bad:
    more = f" (and {len(bad) - 1} more, listed above)" if len(bad) > 1 else ""
    raise DataError(f"{bad[0]}{more}")
