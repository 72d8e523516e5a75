"""The tf.data input pipelines: training (official augmentation + AAM targets) and evaluation.

Owns `train_dataset` and `eval_dataset` (and the `tf.data.Dataset`s behind them). Both read
examples through `star_jax.data.sources` (TSV files, the embedded dataset or TFDS alike) and
yield dicts of numpy arrays, channels-last, images RGB in [-1, 1].

Training stream. Global example position i (0, 1, 2, ... over all processes) is a record of the
source's training stream (for TSV files: epoch `i // n`, record `perm_epoch[i % n]` of a
stateless shuffle keyed by (config.seed, epoch)). Global batch k is positions [k*B, (k+1)*B);
process p takes the slice [k*B + p*b, k*B + (p+1)*b) with b = B / process_count. Every random
draw of the example at position i comes from a generator keyed by (config.seed, i)
(`transforms.example_rng`), so the stream is a pure function of (seed, position): the same seed
gives the same batches on any number of processes or threads, and `start_step=k` resumes
exactly where step k begins.

Per example: the image header gives its size (a TSV source reads each header once); the
augmentation plan (flip, crop matrix, random similarity; made once, by the window step) gives
the part of the photo the crop reads (`transforms.source_window`), and only that window is
decoded (`tf.image.decode_and_crop_jpeg`; other formats decode whole through OpenCV/Pillow).
The crop is warped with the plan's matrix moved to the window's frame, then the texture
operations run and the targets are drawn (`targets.py`). The warp equals the official
full-image warp up to OpenCV's 1/32-pixel coordinate rounding of the shifted matrix (rarely
one grey level). The evaluation crop decodes the whole image with OpenCV (`cv2.imdecode`, the
decoder behind the official `cv2.imread`) and warps it with the official matrix: it is the
official crop pixel for pixel. That one decode also serves the image check: with
`report_unreadable`, an image that cannot be read becomes a `problem` string in its batch row
instead of an error, so that an evaluation reads every image once and still lists all the
unreadable ones.

Unreadable images. A decode failure inside tf.data carries no file name, so the iterators here
catch it, decode the failing batch's images again outside tf.data and raise a DataError naming
the TSV file, line and image (`config.data.check_images` checks every image up front instead).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import numpy as np
import tensorflow as tf

from star_jax.deploy import image_io
from star_jax.data import sources as sources_lib
from star_jax.data import targets as target_lib
from star_jax.data import transforms
from star_jax.core.schemes import DatasetSpec
from star_jax.errors import DataError, UsageError


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


class _Plans:
  """Plans made by the window step, kept for the render step of the same example.

  The render step takes its example's plan (or, if another iterator of the same dataset took it
  first, plans again: the plan is a pure function of the example, so the result is the same).
  Bounded: entries whose render never ran (a failed read) are dropped past `_LIMIT`.
  """

  _LIMIT = 4096

  def __init__(self):
    self._plans: dict[int, tuple] = {}

  def put(self, position: int, plan: tuple) -> None:
    if len(self._plans) >= self._LIMIT:
      self._plans.clear()
    self._plans[position] = plan

  def take(self, position: int) -> tuple | None:
    return self._plans.pop(position, None)


def _train_window(settings: _TrainSettings, position, landmarks, scale, center, image_hw,
                  plans: _Plans | None = None):
  """The window (y, x, h, w) of the unmirrored image the example's crop reads, (0,0,0,0) if none."""
  params, plan = _train_plan(settings, position, landmarks, scale, center, image_hw)
  if plans is not None:
    plans.put(int(position), (params, plan))
  window = transforms.source_window(plan.matrix, image_hw, settings.image_size)
  if window is None:
    return np.zeros(4, np.int32)
  y, x, h, w = window
  if plan.flip:
    x = int(image_hw[1]) - x - w
  return np.asarray([y, x, h, w], np.int32)


def _train_render(settings: _TrainSettings, pixels, position, landmarks, scale, center,
                  image_hw, window, plans: _Plans | None = None):
  """The augmented crop (uint8 RGB), normalised landmarks, point maps and edge maps."""
  planned = plans.take(int(position)) if plans is not None else None
  params, plan = planned or _train_plan(settings, position, landmarks, scale, center, image_hw)
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


def _eval_render_file(image_size: int, report_unreadable: bool, path, landmarks, scale,
                      center):
  """`_eval_render` of the image file at `path`, plus a problem string ('' when readable).

  An unreadable image raises ImageError, or with `report_unreadable` gives a black crop and the
  reason (the ImageError's message without the path, as `Source.check_image` words it).
  """
  path = os.fsdecode(path.item() if isinstance(path, np.ndarray) else path)
  try:
    # Warped in the decoder's BGR order and only the crop reordered: the warp treats channels
    # alike, so the crop is the same, without a copy of the whole photograph.
    pixels_bgr = image_io.load_image(path, bgr=True)
  except image_io.ImageError as e:
    if not report_unreadable:
      raise
    _, matrix, lmk, landmarks_px = _eval_render(
        image_size, np.zeros((1, 1, 3), np.uint8), landmarks, scale, center, np.zeros(2))
    crop = np.zeros((image_size, image_size, 3), np.uint8)
    return crop, matrix, lmk, landmarks_px, str(e).removeprefix(f"{path}: ")
  crop_bgr, matrix, lmk, landmarks_px = _eval_render(image_size, pixels_bgr, landmarks, scale,
                                                     center, np.zeros(2))
  return np.ascontiguousarray(crop_bgr[..., ::-1]), matrix, lmk, landmarks_px, ""


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
# Options


def _options(num_threads: int | None) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  # No autotuning: destroying an iterator waits for the autotune thread's current period (it
  # doubles up to a minute) instead of waking it, so each finished pass (an evaluation, a
  # validation during training) could hang for up to 60 s after its last batch. The
  # parallelism is stated instead (`_parallel`) and the buffers are the pipeline's own.
  options.autotune.enabled = False
  if num_threads:
    options.threading.private_threadpool_size = num_threads
    options.threading.max_intra_op_parallelism = 1
  return options


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise UsageError(f"process_index={process_index} is not in [0, {process_count})")
  return int(process_index), int(process_count)


def _parallel(config, num_threads: int | None) -> int:
  if num_threads:
    return num_threads
  calls = int(config.data.num_parallel_calls)
  return calls if calls > 0 else _usable_cpus()


def _usable_cpus() -> int:
  """The CPUs this process may run on (its affinity mask; `os.cpu_count` where there is none)."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:   # not Linux
    return max(1, os.cpu_count() or 1)


def num_examples(config, split: str, source: sources_lib.Source | None = None) -> int:
  """How many examples `split` ('train', 'val' or 'test') of `config` holds."""
  return (source or sources_lib.source_for(config)).num_examples(split)


class _Named:
  """Iterates a tf.data numpy iterator; a decode failure becomes a DataError naming the image.

  `rows_of(k)` gives the (split, row) pairs of the k-th element, whose images are decoded again
  outside tf.data to find the bad one.
  """

  def __init__(self, dataset: tf.data.Dataset, source: sources_lib.Source, rows_of):
    self._iterator = dataset.as_numpy_iterator()
    self._source = source
    self._rows_of = rows_of
    self._count = 0

  def __iter__(self):
    return self

  def __next__(self):
    try:
      element = next(self._iterator)
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError,
            tf.errors.DataLossError) as e:
      raise self._diagnose(e) from None
    self._count += 1
    return element

  def _diagnose(self, error: Exception) -> Exception:
    for split, row in self._rows_of(self._count):
      problem = self._source.check_image(split, row)
      if problem is not None:
        return DataError(f"{self._source.describe(split, row)}: {problem}")
    return error


# ---------------------------------------------------------------------------------------------
# Training


def train_dataset(config, *, start_step: int = 0, process_index: int | None = None,
                  process_count: int | None = None, num_threads: int | None = None,
                  source: sources_lib.Source | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Endless iterator of this process's training batches (see the module docstring).

  Each batch (b = config.batch_size // process_count): `image` (b,S,S,3) float32 RGB [-1,1];
  `landmarks` (b,N,2) float32 `clip((2p+1)/S - 1, -1, 1)`; `pointmaps` (b,S/4,S/4,N) and
  `edgemaps` (b,S/4,S/4,E) float32; `index` (b,) int64 TSV row.

  `num_threads` pins tf.data to that many threads (benchmarks); default: config's parallelism.
  """
  source = source or sources_lib.source_for(config)
  p, count = _process(process_index, process_count)
  dataset = build_train_dataset(config, start_step=start_step, process_index=p,
                                process_count=count, num_threads=num_threads, source=source)
  global_batch = int(config.batch_size)
  local = global_batch // count
  seed = int(config.seed)
  row_at = getattr(source, "train_row_at", None)

  def rows_of(k: int):
    if row_at is None:
      return []
    first = (int(start_step) + k) * global_batch + p * local
    return [("train", row_at(seed, pos)) for pos in range(first, first + local)]

  return _Named(dataset, source, rows_of)


def build_train_dataset(config, *, start_step: int = 0, process_index: int | None = None,
                        process_count: int | None = None, num_threads: int | None = None,
                        source: sources_lib.Source | None = None) -> tf.data.Dataset:
  """The tf.data.Dataset behind `train_dataset`."""
  source = source or sources_lib.source_for(config)
  spec = source.spec
  size = int(config.data.image_size)
  if size % target_lib.HEATMAP_STRIDE:
    raise UsageError(f"config.data.image_size={size} must be a multiple of "
                     f"{target_lib.HEATMAP_STRIDE}")
  p, count = _process(process_index, process_count)
  global_batch = int(config.batch_size)
  if global_batch % count:
    raise UsageError(f"config.batch_size={global_batch} is not divisible by the "
                     f"{count} processes")
  local_batch = global_batch // count
  settings = _TrainSettings(spec=spec, image_size=size, seed=int(config.seed),
                            aug_prob=float(config.data.aug_prob),
                            augment=dict(config.data.augment),
                            sigma=float(config.data.gaussian_sigma))
  elements = source.train_records(int(config.seed), int(start_step) * global_batch)
  # This process's share of every global batch, before any decoding.
  elements = elements.filter(
      lambda pos, _: tf.equal((pos % global_batch) // local_batch, p))

  plans = _Plans()   # the crop is planned once per example, by the window step

  def load(position, record):
    image_hw = source.image_hw(record)
    args = [position, record["landmarks"], record["scale"], record["center"], image_hw]
    window = tf.numpy_function(lambda *a: _train_window(settings, *a, plans), args, tf.int32,
                               stateful=False)
    window = tf.ensure_shape(window, [4])
    empty = tf.reduce_any(tf.equal(window[2:], 0))
    pixels = tf.cond(empty, lambda: tf.zeros([1, 1, 3], tf.uint8),
                     lambda: source.read_window(record, window))
    crop, lmk, pointmaps, edgemaps = tf.numpy_function(
        lambda *a: _train_render(settings, *a, plans), [pixels] + args + [window],
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
        index=tf.cast(record["index"], tf.int64))

  ds = elements.map(load, num_parallel_calls=_parallel(config, num_threads), deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.prefetch(max(1, int(config.data.prefetch)))
  return ds.with_options(_options(num_threads))


# ---------------------------------------------------------------------------------------------
# Evaluation


def _eval_share(num: int, batch_size: int, p: int, count: int) -> tuple[int, int, int]:
  """(start, stop, padded size) of process p's contiguous share of `num` rows."""
  per_process = -(-num // count)
  num_batches = -(-per_process // batch_size)
  start = min(num, p * per_process)
  stop = min(num, start + per_process)
  return start, stop, num_batches * batch_size


def eval_dataset(config, split: str, *, batch_size: int, process_index: int | None = None,
                 process_count: int | None = None, num_threads: int | None = None,
                 source: sources_lib.Source | None = None,
                 report_unreadable: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `split` ('val' or 'test') in TSV order, as the official test path crops.

  Batches: `image` (b,S,S,3) float32 RGB `u8/255*2-1`; `landmarks` (b,N,2) normalised crop
  coordinates (clipped); `matrix` (b,3,3) float32 original->crop; `landmarks_px` (b,N,2)
  original pixels; `index` (b,) int64 TSV row; `tags` (b,T) int32; `path` (b,) bytes, the image
  path as the TSV writes it; `position` (b,) int64 row of the split (for `Source.describe`);
  `problem` (b,) bytes, why the image could not be read ('' when it could; only with
  `report_unreadable`, else an unreadable image raises a DataError naming it); `mask` (b,)
  bool, False on the padding that fills the last batch (every batch has `batch_size` rows).
  With several processes each takes a contiguous share and all get the same number of batches.
  """
  source = source or sources_lib.source_for(config)
  p, count = _process(process_index, process_count)
  dataset = build_eval_dataset(config, split, batch_size=batch_size, process_index=p,
                               process_count=count, num_threads=num_threads, source=source,
                               report_unreadable=report_unreadable)
  start, stop, _ = _eval_share(source.num_examples(split), int(batch_size), p, count)

  def rows_of(k: int):
    first = start + k * int(batch_size)
    return [(split, row) for row in range(first, min(stop, first + int(batch_size)))]

  return _Named(dataset, source, rows_of)


def build_eval_dataset(config, split: str, *, batch_size: int, process_index: int | None = None,
                       process_count: int | None = None, num_threads: int | None = None,
                       source: sources_lib.Source | None = None,
                       report_unreadable: bool = False) -> tf.data.Dataset:
  """The tf.data.Dataset behind `eval_dataset`."""
  if split not in ("val", "test"):
    raise UsageError(f"split {split!r}: evaluation takes 'val' or 'test'")
  source = source or sources_lib.source_for(config)
  spec = source.spec
  size = int(config.data.image_size)
  p, count = _process(process_index, process_count)
  batch_size = int(batch_size)
  if batch_size <= 0:
    raise UsageError(f"batch size must be positive, got {batch_size}")
  num = source.num_examples(split)
  if num <= 0:
    raise DataError(f"the {split} split of {spec.name} has no examples")
  start, stop, padded = _eval_share(num, batch_size, p, count)
  valid = np.arange(padded) < (stop - start)
  records = source.records(split)
  mine = records.skip(start).take(stop - start) if stop > start else records.take(1)
  filler = mine.take(1).repeat()   # shape donor for the padding rows
  positions = np.where(valid, start + np.arange(padded), start)   # padding: the filler's
  elements = tf.data.Dataset.zip(mine.concatenate(filler).take(padded),
                                 tf.data.Dataset.from_tensor_slices(valid),
                                 tf.data.Dataset.from_tensor_slices(positions.astype(np.int64)))

  def load(record, mask, position):
    image_file = source.image_file(record)
    if image_file is not None:   # decoded here: one decode for the check and the crop
      crop, matrix, lmk, landmarks_px, problem = tf.numpy_function(
          lambda *a: _eval_render_file(size, report_unreadable, *a),
          [image_file, record["landmarks"], record["scale"], record["center"]],
          [tf.uint8, tf.float32, tf.float32, tf.float32, tf.string], stateful=False)
    else:
      pixels, offset = source.read_image(record)
      crop, matrix, lmk, landmarks_px = tf.numpy_function(
          lambda *a: _eval_render(size, *a),
          [pixels, record["landmarks"], record["scale"], record["center"], offset],
          [tf.uint8, tf.float32, tf.float32, tf.float32], stateful=False)
      problem = tf.constant("")
    return dict(
        # evaluate.py's normalisation: u8 / 255 * 2 - 1 in float32.
        image=tf.cast(tf.ensure_shape(crop, [size, size, 3]), tf.float32) / 255.0 * 2.0 - 1.0,
        landmarks=tf.ensure_shape(lmk, [spec.num_points, 2]),
        matrix=tf.ensure_shape(matrix, [3, 3]),
        landmarks_px=tf.ensure_shape(landmarks_px, [spec.num_points, 2]),
        problem=tf.ensure_shape(problem, []),
        position=position,
        index=tf.cast(record["index"], tf.int64),
        tags=tf.cast(record["tags"], tf.int32),
        path=record["path"],
        mask=mask)

  ds = elements.map(load, num_parallel_calls=_parallel(config, num_threads), deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(max(1, int(config.data.prefetch)))
  return ds.with_options(_options(num_threads))
