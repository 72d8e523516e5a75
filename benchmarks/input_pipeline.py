"""Training input pipeline throughput: augmented samples with point and edge maps, per CPU core.

Images of the real datasets' size: 1000x800 JPEGs (quality 90, photo-like texture) with a face
box about a third of the image width (`--face_fraction`), as WFLW photos. They are written as a
converter writes a dataset: OUT/train.tsv, OUT/test.tsv and OUT/images/, which is both a TSV
dataset folder and a TFDS manual dir. Two sources are timed on the same images:
- `tsv`: the photos themselves; each image's header is read once (the source keeps the size)
  and per sample only the window the crop needs is decoded (`tf.image.decode_and_crop_jpeg`);
- `tfds`: the pre-cropped records of `star_jax.data.tfds_builders` (margin-padded face crops,
  JPEG quality 95), built once from that folder (build time reported, not counted); per sample
  only the window the crop needs is decoded from the stored JPEG, as the `tsv` source does from
  the photo (the stored crop decoded whole, what this source did before, is timed beside it).
Each runs with a private tf.data thread pool of 1, then 2 threads; samples/s/core is reported
both per thread of wall time and per second of process CPU time (all threads, TensorFlow's
included), and the lower CPU rate of a source is its headline. A per-stage breakdown (single
thread, in-process, CPU time) says where the time of the `tsv` source goes, and what decoding
a stored crop costs in its place.

With `--official_repo` (or STAR_OFFICIAL_REPO) a checkout of the official STAR code, its
`AlignmentDataset` (training augmentation, aug_prob 1, default encoder: point and edge maps) is
timed on the same images in the same run, one thread as in a DataLoader worker, and each
source's headline is also given as a ratio to it per CPU-second.

Run: `python -m benchmarks.input_pipeline [--images 48] [--batches 12] [--sources tsv,tfds]
[--official_repo PATH] [--record]`.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # `python benchmarks/input_pipeline.py`: import as `python -m` does
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import shutil
import tempfile
import time

import numpy as np

from benchmarks import common

FIXTURE_TSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                           "fixtures", "official_wflw_data", "test.tsv")
IMAGES = "images"
TEST_ROWS = 8


def _photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """A photo-like BGR image: smooth shading, shapes and fine noise (realistic JPEG sizes)."""
  import cv2
  small = rng.uniform(0, 255, (h // 40 + 2, w // 40 + 2, 3)).astype(np.float32)
  image = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
  for _ in range(40):
    c = tuple(int(v) for v in rng.integers(0, 255, 3))
    cv2.circle(image, (int(rng.integers(0, w)), int(rng.integers(0, h))),
               int(rng.integers(5, 120)), c, -1, cv2.LINE_AA)
  image += rng.normal(0, 12, image.shape).astype(np.float32)
  return np.clip(image, 0, 255).astype(np.uint8)


def make_dataset(root: str, count: int, seed: int = 0,
                 face_fraction: float = 1 / 3) -> tuple[str, float]:
  """Writes `count` 1000x800 JPEGs to root/images with root/train.tsv and root/test.tsv (its
  first rows), paths relative to root/images; returns (train TSV path, mean JPEG size in KB)."""
  import cv2
  from star_jax.data.annotations import read_tsv
  from star_jax.core.schemes import get_spec
  template = read_tsv(FIXTURE_TSV, get_spec("wflw")).landmarks[0]
  template = template - template.mean(axis=0)
  template /= np.ptp(template[:, 0])
  rng = np.random.default_rng(seed)
  rows, sizes = [], []
  os.makedirs(os.path.join(root, IMAGES), exist_ok=True)
  for i in range(count):
    h, w = 800, 1000
    image = _photo(rng, h, w)
    face_w = w * face_fraction * rng.uniform(0.85, 1.15)
    centre = np.array([rng.uniform(0.35, 0.65) * w, rng.uniform(0.4, 0.6) * h])
    pts = (template * face_w + centre).astype(np.float32)
    cv2.fillPoly(image, [pts[:33].astype(np.int32)], (150, 170, 200), cv2.LINE_AA)
    for j in range(0, 98):
      cv2.circle(image, (int(pts[j, 0]), int(pts[j, 1])), 3, (40, 40, 40), -1)
    name = f"{i:04d}.jpg"
    cv2.imwrite(os.path.join(root, IMAGES, name), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    sizes.append(os.path.getsize(os.path.join(root, IMAGES, name)))
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    scale = float((hi - lo).max()) / 200 * 1.05
    cw, ch = (lo + hi) / 2
    five = pts[[96, 97, 54, 76, 82]].ravel()
    rows.append("\t".join([name, ",".join(f"{v:.3f}" for v in five),
                           ",".join(f"{v:.3f}" for v in pts.ravel()), f"{scale:.6f}",
                           f"{cw:.4f}", f"{ch:.4f}", "0,0,0,0,0,0"]))
  head = "image_path\tlandmarks_5pts\tlandmarks_98\tscale\tcenter_w\tcenter_h\ttags\n"
  for name, subset in (("train.tsv", rows), ("test.tsv", rows[:TEST_ROWS])):
    with open(os.path.join(root, name), "w") as f:
      f.write(head + "\n".join(subset) + "\n")
  return os.path.join(root, "train.tsv"), float(np.mean(sizes)) / 1024


def build_tfds(root: str) -> tuple[str, float]:
  """Builds the TFDS WFLW records (jpeg config) from the manual dir `root`; returns (data dir,
  build seconds)."""
  import tensorflow_datasets as tfds
  from star_jax.data import tfds_builders
  tfds.disable_progress_bar()
  data_dir = os.path.join(root, "tfds")
  t0 = time.perf_counter()
  builder = tfds_builders.builder_for("wflw", data_dir=data_dir, config="jpeg")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))
  return data_dir, time.perf_counter() - t0


def _config(root: str, batch: int, source: str = "tsv", tfds_data_dir: str = ""):
  from configs import base
  c = base.get_base_config("wflw")
  c.data.source = source
  c.data.image_dir = os.path.join(root, IMAGES)
  c.data.train_tsv = os.path.join(root, "train.tsv")
  c.data.test_tsv = os.path.join(root, "test.tsv")
  c.data.tfds_data_dir = tfds_data_dir
  c.data.val_fraction = 0.0
  c.batch_size = batch
  return c


def measure(config, threads: int, batches: int) -> tuple[float, float]:
  """(samples/s per thread of wall time, samples per CPU-second) after one warm-up batch."""
  from star_jax.data import pipeline
  it = pipeline.train_dataset(config, process_index=0, process_count=1, num_threads=threads)
  next(it)
  next(it)
  cpu0, t0 = time.process_time(), time.perf_counter()
  for _ in range(batches):
    next(it)
  wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
  samples = batches * config.batch_size
  return samples / wall / threads, samples / cpu


def stage_breakdown(config, count: int) -> dict[str, float]:
  """CPU milliseconds per sample of each stage, single-threaded, outside tf.data.

  Process CPU time, not wall time: the numbers stay meaningful on a machine shared with other
  work. The eager TensorFlow calls here carry some dispatch overhead that tf.data does not.
  """
  import tensorflow as tf
  from star_jax.data import annotations, images, targets, transforms
  from star_jax.core.schemes import get_spec
  spec = get_spec("wflw")
  ann = annotations.read_tsv(config.data.train_tsv, spec, image_dir=config.data.image_dir)
  aug = dict(config.data.augment)
  times = dict(header_once=0.0, plan=0.0, decode_full=0.0, decode_window=0.0, warp=0.0,
               texture=0.0, pointmaps=0.0, edgemaps=0.0)
  n = min(count, len(ann))
  images.decode_tensor(tf.io.read_file(ann.image_paths[0])).numpy()   # warm the eager ops
  for i in range(n):
    t = time.process_time()
    # What the TSV source does the first time it sees an image (later epochs: a lookup).
    hw = images.image_size_file(ann.image_paths[i])
    times["header_once"] += time.process_time() - t
    t = time.process_time()
    params = transforms.sample_params(transforms.example_rng(0, i), aug, 1.0, 256)
    plan = transforms.plan_crop(ann.landmarks[i], ann.scale[i], ann.center[i], hw, params,
                                spec, 256)
    window = transforms.source_window(plan.matrix, hw, 256)
    times["plan"] += time.process_time() - t
    t = time.process_time()
    images.decode_tensor(tf.io.read_file(ann.image_paths[i])).numpy()
    times["decode_full"] += time.process_time() - t
    t = time.process_time()
    y, x, h, w = window
    if plan.flip:
      x = int(hw[1]) - x - w
    data = tf.io.read_file(ann.image_paths[i])
    pixels = images.decode_window_tensor(data, tf.constant([y, x, h, w])).numpy()
    times["decode_window"] += time.process_time() - t
    t = time.process_time()
    if plan.flip:
      pixels = pixels[:, ::-1]
    crop = transforms.warp(np.ascontiguousarray(pixels),
                           plan.matrix.astype(np.float64) @ transforms.translation(
                               int(hw[1]) - x - w if plan.flip else x, y), 256)
    times["warp"] += time.process_time() - t
    t = time.process_time()
    transforms.apply_texture(crop, params)
    times["texture"] += time.process_time() - t
    t = time.process_time()
    targets.point_maps(plan.landmarks_px, 256)
    times["pointmaps"] += time.process_time() - t
    t = time.process_time()
    targets.edge_maps(plan.landmarks_px, spec, 256)
    times["edgemaps"] += time.process_time() - t
  return {k: v / n * 1e3 for k, v in times.items()}


# WFLW's training split (the official list_98pt_rect_attr_train.txt rows).
WFLW_TRAIN_FACES = 7500


def stored_crops(config, count: int) -> dict[str, float]:
  """What the `tfds` source stores: CPU ms to decode a stored crop whole, the stored crop's
  share of the original image's pixels, and its mean encoded and decoded bytes (what a
  shuffle buffer of records holds now, and what one of decoded crops held)."""
  import tensorflow as tf
  from star_jax.data import tfds_builders
  builder = tfds_builders.prepared_builder(config)
  records = list(tfds_builders.load_records(builder, "train", decode_image=False).take(count))
  tf.io.decode_jpeg(records[0]["pixels"]).numpy()   # warm the eager op
  cpu, area, encoded, decoded = 0.0, 0.0, 0, 0
  for rec in records:
    t = time.process_time()
    pixels = tf.io.decode_jpeg(rec["pixels"], channels=3).numpy()
    cpu += time.process_time() - t
    area += pixels.shape[0] * pixels.shape[1] / (800 * 1000)
    encoded += len(rec["pixels"].numpy())
    decoded += pixels.nbytes
  n = len(records)
  return {"decode_stored_crop": cpu / n * 1e3, "area": area / n, "encoded_kb": encoded / n / 1e3,
          "decoded_kb": decoded / n / 1e3}


class _Table:
  """The part of a pandas DataFrame the official loader uses (`len`, `.iloc[row, col]`,
  `len(.iloc[row])`), for runs without pandas: the TSV's first line is its header, as
  `pandas.read_csv(path, sep="\\t")` reads it."""

  def __init__(self, path: str, sep: str = "\t"):
    with open(path) as f:
      self._rows = [line.rstrip("\n").split(sep) for line in f.readlines()[1:] if line.strip()]
    self.iloc = self

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, key):
    if isinstance(key, tuple):
      return self._rows[key[0]][key[1]]
    return self._rows[key]


def _official_dataset(repo: str, train_tsv: str, image_dir: str):
  """The official `AlignmentDataset` (WFLW, training augmentation with aug_prob 1, default
  encoder: point and edge maps) on `train_tsv`, imported from the checkout at `repo`."""
  import importlib
  import types
  from star_jax.core.schemes import get_spec
  repo = os.path.abspath(repo)
  if repo not in sys.path:
    sys.path.insert(0, repo)
  # Empty packages stand in for `lib` and `lib.dataset` (their __init__ files import the
  # whole official code base); pandas only reads the TSV, a stand-in does that without it.
  for name in ("lib", "lib.dataset"):
    package = types.ModuleType(name)
    package.__path__ = [os.path.join(repo, *name.split("."))]
    sys.modules[name] = package
  try:
    import pandas  # noqa: F401
  except ImportError:
    sys.modules["pandas"] = types.SimpleNamespace(read_csv=_Table)
  module = importlib.import_module("lib.dataset.alignmentDataset")
  spec = get_spec("wflw")
  return module.AlignmentDataset(
      train_tsv, image_dir, None, 256, 256, 3, (127.5, 127.5, 127.5), 1 / 127.5,
      [spec.num_points, spec.num_edges, spec.num_points], True, 1.0,
      [(e.closed, list(e.points)) for e in spec.edges], [list(p) for p in spec.flip_pairs],
      True, encoder_type="default")


def measure_official(repo: str, train_tsv: str, image_dir: str,
                     samples: int) -> tuple[float, float]:
  """(samples/s of wall time, samples per CPU-second) of the official dataset's `__getitem__`
  (image read, augmentation, targets), one thread as a DataLoader worker runs it."""
  import random
  import torch
  torch.set_num_threads(1)        # what a DataLoader worker process sets
  dataset = _official_dataset(repo, train_tsv, image_dir)
  random.seed(0)
  np.random.seed(0)
  for i in range(2):
    dataset[i]
  cpu0, t0 = time.process_time(), time.perf_counter()
  for i in range(samples):
    dataset[i % len(dataset)]
  wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
  return samples / wall, samples / cpu


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--images", type=int, default=48)
  parser.add_argument("--batches", type=int, default=12)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--sources", default="tsv,tfds", help="comma list of tsv,tfds")
  parser.add_argument("--face_fraction", type=float, default=1 / 3,
                      help="face box width / image width (WFLW photos: about 1/3 and less)")
  parser.add_argument("--official_repo", default=os.environ.get("STAR_OFFICIAL_REPO", ""),
                      help="checkout of github.com/ZhenglinZhou/STAR: its AlignmentDataset is "
                           "timed on the same images (default $STAR_OFFICIAL_REPO; skipped "
                           "when empty)")
  parser.add_argument("--official_samples", type=int, default=96)
  common.add_common_flags(parser)
  args = parser.parse_args(argv)
  if args.official_repo and not os.path.isfile(
      os.path.join(args.official_repo, "lib", "dataset", "alignmentDataset.py")):
    parser.error(f"--official_repo {args.official_repo}: lib/dataset/alignmentDataset.py not "
                 "found (a checkout of github.com/ZhenglinZhou/STAR is needed)")
  sources = [s for s in args.sources.split(",") if s]
  for source in sources:
    if source not in ("tsv", "tfds"):
      parser.error(f"--sources: {source!r} is not 'tsv' or 'tfds'")
  settings = common.apply_process_settings(args.process_settings)

  root = tempfile.mkdtemp(prefix="star_jax_bench_")
  try:
    _, kb = make_dataset(root, args.images, face_fraction=args.face_fraction)
    configs = {"tsv": _config(root, args.batch_size)}
    stage_text = ", ".join(f"{k} {v:.2f}"
                           for k, v in stage_breakdown(configs["tsv"], args.images).items())
    tfds_text = ""
    if "tfds" in sources:
      data_dir, build_s = build_tfds(root)
      configs["tfds"] = _config(root, args.batch_size, "tfds", data_dir)
      crops = stored_crops(configs["tfds"], args.images)
      wflw_mb = WFLW_TRAIN_FACES / 1e3   # KB per record -> MB for the whole split
      tfds_text = (f"; tfds source: records built once in {build_s:.1f} s "
                   f"({build_s / args.images * 1e3:.0f} ms per image, not counted), stored crops "
                   f"hold {crops['area'] * 100:.0f} % of the original pixels on average and "
                   f"decode whole in {crops['decode_stored_crop']:.2f} CPU ms (per sample only the "
                   "window is decoded); the training shuffle holds encoded records, "
                   f"{crops['encoded_kb']:.0f} KB each here (decoded: "
                   f"{crops['decoded_kb']:.0f} KB): for WFLW's {WFLW_TRAIN_FACES} training "
                   f"faces a full buffer is about {crops['encoded_kb'] * wflw_mb:.0f} MB "
                   f"(decoded crops: {crops['decoded_kb'] * wflw_mb:.0f} MB)")
    rows, headline = [], {}
    load = common.load_average()
    for source in sources:
      for threads in (1, 2):
        wall_rate, cpu_rate = measure(configs[source], threads, args.batches)
        rows.append([source, f"tf.data, {threads} thread(s)", f"{wall_rate:.0f}",
                     f"{cpu_rate:.0f}"])
        print(rows[-1], flush=True)
        headline[source] = min(headline.get(source, cpu_rate), cpu_rate)
    official = None
    if args.official_repo:
      # Last: the official module sets process-wide Pillow options when imported.
      official = measure_official(args.official_repo, configs["tsv"].data.train_tsv,
                                  configs["tsv"].data.image_dir, args.official_samples)
      rows.append(["official AlignmentDataset", "1 thread (a DataLoader worker)",
                   f"{official[0]:.0f}", f"{official[1]:.0f}"])
      print(rows[-1], flush=True)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  notes = (f"{args.images} generated 1000x800 JPEG q90 (mean {kb:.0f} KB), face box "
           f"~{args.face_fraction:.2f} of the width, S=256, batch {args.batch_size}, WFLW targets "
           f"(98 point maps + 9 edge maps at 64x64); {args.batches} batches after 2 warm-up "
           "batches. Headline: samples per CPU-second of the whole process (all threads), the "
           "lower of the two thread settings: "
           + ", ".join(f"{s} {r:.0f}" for s, r in headline.items())
           + (". Against the official AlignmentDataset (same images, aug_prob 1, point and "
              f"edge maps; {args.official_samples} samples, per CPU-second): "
              + ", ".join(f"{s} {r / official[1]:.1f}x" for s, r in headline.items())
              if official else ". Official dataset not timed (no --official_repo)")
           + f". {settings}; {load} at the start of the timing. Per-sample "
           f"CPU ms by stage (tsv source): {stage_text}{tfds_text}")
  common.record("Training input pipeline (augmentation + AAM targets), TSV and TFDS sources",
                ["source", "setting", "samples/s/thread (wall)", "samples/s per CPU-second"],
                rows, notes=notes, write=args.record)
  for source, rate in headline.items():
    versus = f" ({rate / official[1]:.1f}x the official dataset)" if official else ""
    print(f"{source}: {rate:.0f} samples per CPU-second{versus}")


if __name__ == "__main__":
  main()
