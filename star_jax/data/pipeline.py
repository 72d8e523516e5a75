"""The tf.data input pipelines: training (official augmentation + AAM targets) and evaluation.

Owns `resolve_data` (where a config's data lives), the train/val/test splits, `train_dataset`
and `eval_dataset`. Both yield dicts of numpy arrays, channels-last, images RGB in [-1, 1].

Training stream. Global example position i (0, 1, 2, ... over all processes) belongs to epoch
`i // n` and is record `perm_epoch[i % n]`, where `perm_epoch` is a stateless shuffle keyed by
(config.seed, epoch). Global batch k is positions [k*B, (k+1)*B); process p takes the slice
[k*B + p*b, k*B + (p+1)*b) with b = B / process_count. Every random draw of the example at
position i comes from a generator keyed by (config.seed, i) (`transforms.example_rng`), so the
stream is a pure function of (seed, position): the same seed gives the same batches on any
number of processes or threads, and `start_step=k` resumes exactly where step k begins.

Per example: the image header gives its size; the augmentation plan (flip, crop matrix, random
similarity) gives the part of the photo the crop reads (`transforms.source_window`), and only
that window is decoded (`tf.image.decode_and_crop_jpeg`; other formats decode whole through
OpenCV/Pillow). The crop is warped with the plan's matrix moved to the window's frame, then the
texture operations run and the targets are drawn (`targets.py`). The warp equals the official
full-image warp up to OpenCV's 1/32-pixel coordinate rounding of the shifted matrix (rarely
one grey level); the evaluation crop decodes the whole image and is bit-exact.

TensorFlow is kept off accelerators: it never allocates GPU memory next to JAX.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator

import numpy as np
import tensorflow as tf

from star_jax.data import images as image_io
from star_jax.data import targets as target_lib
from star_jax.data import transforms
from star_jax.data.annotations import Annotations, AnnotationError, read_tsv
from star_jax.data.embedded import DataFiles
from star_jax.datasets import DatasetSpec, get_spec


def _hide_accelerators_from_tf() -> None:
  try:
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
  except (RuntimeError, ValueError):
    pass  # already initialised (devices were hidden earlier) or no such device type


_hide_accelerators_from_tf()

# The carved validation split does not depend on the training seed: the same images are held
# out whichever seed trains.
VAL_SPLIT_SEED = 20230601
_INFINITE = np.iinfo(np.int64).max // 4
SPLITS = ("train", "val", "test")


def resolve_data(config) -> DataFiles:
  """The files behind `config.data` ('tsv': as configured; 'embedded': generated and cached)."""
  data = config.data
  if data.source == "tsv":
    return DataFiles(image_dir=data.image_dir, train_tsv=data.train_tsv, val_tsv=data.val_tsv,
                     test_tsv=data.test_tsv)
  if data.source == "embedded":
    from star_jax.data import embedded  # pylint: disable=g-import-not-at-top
    return embedded.ensure_embedded_dataset(cache_dir=data.embedded_dir or None)
  if data.source == "tfds":
    # Records come from star_jax.data.tfds_builders; no TSV is read.
    return DataFiles(image_dir="", train_tsv="", val_tsv="", test_tsv="")
  raise ValueError(f"config.data.source={data.source!r}: use 'tsv', 'embedded' or 'tfds'")


def _read(path: str, spec: DatasetSpec, image_dir: str, what: str) -> Annotations:
  if not path:
    raise AnnotationError(f"config.data.{what} is empty: no {what.split('_')[0]} annotations")
  return read_tsv(path, spec, image_dir=image_dir or None)


def _carved_val_rows(num_rows: int, fraction: float) -> np.ndarray:
  num_val = int(round(num_rows * fraction))
  num_val = min(max(num_val, 1), num_rows - 1)
  perm = np.random.default_rng(VAL_SPLIT_SEED).permutation(num_rows)
  return np.sort(perm[:num_val])


def split_annotations(config, split: str) -> tuple[Annotations, np.ndarray]:
  """(annotations, TSV row of each) for 'train', 'val' or 'test' of a TSV-backed config.

  Without `config.data.val_tsv`, 'val' is `val_fraction` of the training TSV (rows fixed by
  VAL_SPLIT_SEED) and 'train' is the rest; with val_fraction 0 nothing is carved.
  """
  if split not in SPLITS:
    raise ValueError(f"split={split!r}: use one of {SPLITS}")
  spec = get_spec(config.dataset)
  files = resolve_data(config)
  if split == "test":
    ann = _read(files.test_tsv, spec, files.image_dir, "test_tsv")
    return ann, np.arange(len(ann))
  if split == "val" and files.val_tsv:
    ann = _read(files.val_tsv, spec, files.image_dir, "val_tsv")
    return ann, np.arange(len(ann))
  train = _read(files.train_tsv, spec, files.image_dir, "train_tsv")
  fraction = float(config.data.val_fraction)
  carve = not files.val_tsv and fraction > 0
  if split == "val":
    if not carve:
      raise ValueError("split='val' needs config.data.val_tsv or config.data.val_fraction > 0")
    rows = _carved_val_rows(len(train), fraction)
  else:
    rows = np.arange(len(train))
    if carve:
      rows = np.setdiff1d(rows, _carved_val_rows(len(train), fraction))
  return train.subset(rows), rows


# ---------------------------------------------------------------------------------------------
# Per-example work (numpy; called from tf.data through tf.numpy_function)


@dataclasses.dataclass(frozen=True)
class _TrainSettings:
  spec: DatasetSpec
  image_size: int
  seed: int
  aug_prob: float
  augment: dict
  sigma: float


def _train_plan(settings: _TrainSettings, position, landmarks, scale, center, image_hw):
  params = transforms.sample_params(
      transforms.example_rng(settings.seed, int(position)), settings.augment,
      settings.aug_prob, settings.image_size)
  plan = transforms.plan_crop(np.asarray(landmarks, np.float32), float(scale),
                              np.asarray(center), tuple(int(v) for v in image_hw), params,
                              settings.spec, settings.image_size)
  return params, plan


def _train_window(settings: _TrainSettings, position, landmarks, scale, center, image_hw):
  """The window (y, x, h, w) of the unmirrored image the example's crop reads, (0,0,0,0) if none."""
  _, plan = _train_plan(settings, position, landmarks, scale, center, image_hw)
  window = transforms.source_window(plan.matrix, image_hw, settings.image_size)
  if window is None:
    return np.zeros(4, np.int32)
  y, x, h, w = window
  if plan.flip:
    x = int(image_hw[1]) - x - w
  return np.asarray([y, x, h, w], np.int32)


def _train_render(settings: _TrainSettings, pixels, position, landmarks, scale, center,
                  image_hw, window):
  """The augmented crop (uint8 RGB), normalised landmarks, point maps and edge maps."""
  params, plan = _train_plan(settings, position, landmarks, scale, center, image_hw)
  size = settings.image_size
  y, x, h, w = (int(v) for v in window)
  if h == 0 or w == 0:
    crop = np.zeros((size, size, 3), np.uint8)   # the crop lies wholly outside the image
  else:
    if plan.flip:
      pixels = pixels[:, ::-1]   # the window of the mirrored image
      x = int(image_hw[1]) - x - w
    local = plan.matrix.astype(np.float64) @ transforms.translation(x, y)
    crop = transforms.warp(np.ascontiguousarray(pixels), local, size)
  crop = transforms.apply_texture(crop, params)
  lmk = transforms.normalize_landmarks(plan.landmarks_px, size)
  pointmaps = target_lib.point_maps(plan.landmarks_px, size, settings.sigma)
  edgemaps = target_lib.edge_maps(plan.landmarks_px, settings.spec, size)
  return crop, lmk, pointmaps, edgemaps


def _eval_render(image_size: int, pixels, landmarks, scale, center, offset):
  """The official test crop: matrix from (scale, center) in original pixels, bit-exact warp.

  Returns the uint8 crop, the matrix (original -> crop), normalised landmarks and the landmarks
  in original pixels. `offset` is where a stored image (a TFDS face crop) starts in the original.
  """
  offset = np.asarray(offset, np.float64)
  matrix = transforms.crop_matrix(float(scale), float(center[0]) + offset[0],
                                  float(center[1]) + offset[1], image_size)
  local = matrix
  landmarks_px = np.asarray(landmarks, np.float32)
  if offset.any():
    local = matrix.astype(np.float64) @ transforms.translation(offset[0], offset[1])
    landmarks_px = (landmarks_px + offset.astype(np.float32)).astype(np.float32)
  crop = transforms.warp(np.ascontiguousarray(pixels), local, image_size)
  lmk = transforms.normalize_landmarks(transforms.transform_points(landmarks_px, matrix),
                                       image_size)
  return crop, matrix, lmk, landmarks_px


# ---------------------------------------------------------------------------------------------
# Record sources


def _table_tensors(ann: Annotations, rows: np.ndarray) -> dict[str, tf.Tensor]:
  return dict(
      path=tf.constant(ann.image_paths, tf.string),
      landmarks=tf.constant(ann.landmarks, tf.float32),
      scale=tf.constant(ann.scale, tf.float64),
      center=tf.constant(ann.center, tf.float64),
      tags=tf.constant(ann.tags, tf.int32),
      index=tf.constant(np.asarray(rows, np.int64), tf.int64))


def num_examples(config, split: str) -> int:
  """How many examples `split` ('train', 'val' or 'test') of `config` holds."""
  if config.data.source == "tfds":
    count = int(_tfds_records(config, split).cardinality())
    if count < 0:
      raise ValueError(f"the TFDS {split} split of {config.dataset} has no known size")
    return count
  annotations, _ = split_annotations(config, split)
  return len(annotations)


def _tfds_records(config, split: str) -> tf.data.Dataset:
  from star_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
  return tfds_builders.load_records(config, split)


def _options(num_threads: int | None) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  if num_threads:
    options.threading.private_threadpool_size = num_threads
    options.threading.max_intra_op_parallelism = 1
  return options


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
  return int(process_index), int(process_count)


def _parallel(config, num_threads: int | None) -> int:
  if num_threads:
    return num_threads
  calls = int(config.data.num_parallel_calls)
  return tf.data.AUTOTUNE if calls <= 0 else calls


# ---------------------------------------------------------------------------------------------
# Training


def train_dataset(config, *, start_step: int = 0, process_index: int | None = None,
                  process_count: int | None = None,
                  num_threads: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Endless iterator of this process's training batches (see the module docstring).

  Each batch (b = config.batch_size // process_count): `image` (b,S,S,3) float32 RGB [-1,1];
  `landmarks` (b,N,2) float32 `clip((2p+1)/S - 1, -1, 1)`; `pointmaps` (b,S/4,S/4,N) and
  `edgemaps` (b,S/4,S/4,E) float32; `index` (b,) int64 TSV row.

  `num_threads` pins tf.data to that many threads (benchmarks); default: config's parallelism.
  """
  return build_train_dataset(config, start_step=start_step, process_index=process_index,
                             process_count=process_count,
                             num_threads=num_threads).as_numpy_iterator()


def build_train_dataset(config, *, start_step: int = 0, process_index: int | None = None,
                        process_count: int | None = None,
                        num_threads: int | None = None) -> tf.data.Dataset:
  """The tf.data.Dataset behind `train_dataset`."""
  spec = get_spec(config.dataset)
  size = int(config.data.image_size)
  if size % target_lib.HEATMAP_STRIDE:
    raise ValueError(f"config.data.image_size={size} must be a multiple of "
                     f"{target_lib.HEATMAP_STRIDE}")
  p, count = _process(process_index, process_count)
  global_batch = int(config.batch_size)
  if global_batch % count:
    raise ValueError(f"config.batch_size={global_batch} is not divisible by the "
                     f"{count} processes")
  local_batch = global_batch // count
  settings = _TrainSettings(spec=spec, image_size=size, seed=int(config.seed),
                            aug_prob=float(config.data.aug_prob),
                            augment=dict(config.data.augment),
                            sigma=float(config.data.gaussian_sigma))
  first_position = int(start_step) * global_batch
  seed = int(config.seed)

  if config.data.source == "tfds":
    records = _tfds_records(config, "train")
    elements = _sequential_positions(records, seed, first_position)
  else:
    ann, rows = split_annotations(config, "train")
    num = len(ann)
    table = _table_tensors(ann, rows)

    def epoch_order(epoch):
      perm = tf.random.experimental.stateless_shuffle(
          tf.range(num, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
      return tf.data.Dataset.from_tensor_slices(perm)

    first_epoch = first_position // num
    order = tf.data.Dataset.range(first_epoch, _INFINITE).flat_map(epoch_order)
    order = order.skip(first_position - first_epoch * num)
    elements = tf.data.Dataset.zip(tf.data.Dataset.range(first_position, _INFINITE), order)

  # This process's share of every global batch, before any decoding.
  elements = elements.filter(
      lambda pos, _: tf.equal((pos % global_batch) // local_batch, p))

  def load(position, record):
    if config.data.source == "tfds":
      rec = record
      pixels_all = rec["image"]
      image_hw = tf.shape(pixels_all)[:2]
    else:
      rec = {k: tf.gather(v, record) for k, v in table.items()}
      data = tf.io.read_file(rec["path"])
      image_hw = image_io.image_size_tensor(data)
    args = [position, rec["landmarks"], rec["scale"], rec["center"], image_hw]
    window = tf.numpy_function(lambda *a: _train_window(settings, *a), args, tf.int32,
                               stateful=False)
    window = tf.ensure_shape(window, [4])
    empty = tf.reduce_any(tf.equal(window[2:], 0))
    if config.data.source == "tfds":
      pixels = tf.cond(empty, lambda: tf.zeros([1, 1, 3], tf.uint8),
                       lambda: pixels_all[window[0]:window[0] + window[2],
                                          window[1]:window[1] + window[3]])
    else:
      pixels = tf.cond(empty, lambda: tf.zeros([1, 1, 3], tf.uint8),
                       lambda: image_io.decode_window_tensor(data, window))
    crop, lmk, pointmaps, edgemaps = tf.numpy_function(
        lambda *a: _train_render(settings, *a), [pixels] + args + [window],
        [tf.uint8, tf.float32, tf.float32, tf.float32], stateful=False)
    heat = size // target_lib.HEATMAP_STRIDE
    crop = tf.ensure_shape(crop, [size, size, 3])
    # The official dataset normalisation: (u8 - 127.5) * (1 / 127.5) in float32.
    image = (tf.cast(crop, tf.float32) - 127.5) * (1 / 127.5)
    return dict(
        image=image,
        landmarks=tf.ensure_shape(lmk, [spec.num_points, 2]),
        pointmaps=tf.ensure_shape(pointmaps, [heat, heat, spec.num_points]),
        edgemaps=tf.ensure_shape(edgemaps, [heat, heat, spec.num_edges]),
        index=tf.cast(rec["index"], tf.int64))

  ds = elements.map(load, num_parallel_calls=_parallel(config, num_threads), deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.prefetch(max(1, int(config.data.prefetch)))
  return ds.with_options(_options(num_threads))


def _sequential_positions(records: tf.data.Dataset, seed: int,
                          first_position: int) -> tf.data.Dataset:
  """(position, record) pairs for a source without random access (TFDS shards).

  The order is a seeded shuffle per epoch (deterministic for a given seed); resuming skips
  `first_position` records, which reads them.
  """
  num = int(records.cardinality())
  if num <= 0:
    raise ValueError("the TFDS training split has unknown or zero size")
  shuffled = records.shuffle(min(num, 20000), seed=seed, reshuffle_each_iteration=True).repeat()
  return tf.data.Dataset.zip(tf.data.Dataset.range(0, _INFINITE), shuffled).skip(first_position)


# ---------------------------------------------------------------------------------------------
# Evaluation


def eval_dataset(config, split: str, *, batch_size: int, process_index: int | None = None,
                 process_count: int | None = None,
                 num_threads: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `split` ('val' or 'test') in TSV order, as the official test path crops.

  Batches: `image` (b,S,S,3) float32 RGB `u8/255*2-1`; `landmarks` (b,N,2) normalised crop
  coordinates (clipped); `matrix` (b,3,3) float32 original->crop; `landmarks_px` (b,N,2)
  original pixels; `index` (b,) int64 TSV row; `tags` (b,6) int32; `mask` (b,) bool, False on
  the padding that fills the last batch (every batch has `batch_size` rows). With several
  processes each takes a contiguous share and all get the same number of batches.
  """
  return build_eval_dataset(config, split, batch_size=batch_size, process_index=process_index,
                            process_count=process_count,
                            num_threads=num_threads).as_numpy_iterator()


def build_eval_dataset(config, split: str, *, batch_size: int, process_index: int | None = None,
                       process_count: int | None = None,
                       num_threads: int | None = None) -> tf.data.Dataset:
  """The tf.data.Dataset behind `eval_dataset`."""
  if split not in ("val", "test"):
    raise ValueError(f"split={split!r}: eval_dataset takes 'val' or 'test'")
  spec = get_spec(config.dataset)
  size = int(config.data.image_size)
  p, count = _process(process_index, process_count)
  batch_size = int(batch_size)

  if config.data.source == "tfds":
    records = _tfds_records(config, split)
    num = int(records.cardinality())
    if num <= 0:
      raise ValueError(f"the TFDS {split} split has unknown or zero size")
  else:
    ann, rows = split_annotations(config, split)
    num = len(ann)
    table = _table_tensors(ann, rows)
  per_process = -(-num // count)
  num_batches = -(-per_process // batch_size)
  start = min(num, p * per_process)
  stop = min(num, start + per_process)
  padded = num_batches * batch_size
  valid = np.arange(padded) < (stop - start)

  if config.data.source == "tfds":
    mine = records.skip(start).take(stop - start)
    if stop == start:
      mine = records.take(1)   # a shape donor for padding-only shares
    filler = mine.take(1).repeat()
    elements = tf.data.Dataset.zip(mine.concatenate(filler).take(padded),
                                   tf.data.Dataset.from_tensor_slices(valid))
  else:
    local_rows = np.arange(start, stop, dtype=np.int64)
    local_rows = np.concatenate([local_rows, np.full(padded - len(local_rows),
                                                     local_rows[0] if len(local_rows) else 0)])
    elements = tf.data.Dataset.from_tensor_slices((local_rows, valid))

  def load(record, mask):
    if config.data.source == "tfds":
      rec = record
      pixels = rec["image"]
      offset = tf.cast(rec.get("offset", tf.zeros([2], tf.float64)), tf.float64)
    else:
      rec = {k: tf.gather(v, record) for k, v in table.items()}
      pixels = image_io.decode_tensor(tf.io.read_file(rec["path"]))
      offset = tf.zeros([2], tf.float64)
    crop, matrix, lmk, landmarks_px = tf.numpy_function(
        lambda *a: _eval_render(size, *a),
        [pixels, rec["landmarks"], rec["scale"], rec["center"], offset],
        [tf.uint8, tf.float32, tf.float32, tf.float32], stateful=False)
    return dict(
        # evaluate.py's normalisation: u8 / 255 * 2 - 1 in float32.
        image=tf.cast(tf.ensure_shape(crop, [size, size, 3]), tf.float32) / 255.0 * 2.0 - 1.0,
        landmarks=tf.ensure_shape(lmk, [spec.num_points, 2]),
        matrix=tf.ensure_shape(matrix, [3, 3]),
        landmarks_px=tf.ensure_shape(landmarks_px, [spec.num_points, 2]),
        index=tf.cast(rec["index"], tf.int64),
        tags=tf.cast(rec["tags"], tf.int32),
        mask=mask)

  ds = elements.map(load, num_parallel_calls=_parallel(config, num_threads), deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(max(1, int(config.data.prefetch)))
  return ds.with_options(_options(num_threads))
