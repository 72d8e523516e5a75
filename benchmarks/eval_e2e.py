"""Evaluation end to end, images/s: TSV -> crops -> jitted network -> original pixels -> metrics.

Images of the real datasets' size (1000x800 JPEG, face a third of the width), written by the
generator of `benchmarks/input_pipeline.py`. Two paths are timed, each for a model size:
- `eval_lib`: `star_jax.training.eval_lib.predict_split` + `compute_metrics`, what `eval.py` runs
on TSV
  data (OpenCV crops in a thread pool, batches overlapped with the network);
- `tf.data`: `star_jax.data.pipeline.eval_dataset` (the pipeline training's validation uses) feeding
  the same jitted landmark function, `transforms.landmarks_to_original` and `metrics.nme`.
The full WFLW network (256 channels) is slow on a small CPU, so a 32-channel network (same
architecture and data path) is timed too, and `channels=0` replaces the network by zeros to
time the data path alone (crops, map back, metrics); all are reported. The stem (64 and 128
channels at 128x128) does not shrink with `channels`, so on a CPU the network dominates.
Weights are random: the figures are throughput, not accuracy. The first pass (compile + warm
caches) is not timed.

A second table holds `eval.py`'s time against its floor: decoding every image once
(`cv2.imread`, the whole image, one thread: what the official evaluate.py does) plus the network
alone on as many crops already in memory (the same batches, the same jitted function), both
timed in the same run. The issue's target is at most 1.1x (`eval_lib` wall time / (decode +
network) wall time); eval_lib overlaps the two on a thread pool, so it can be below 1.

Run from the repository root:
  python -m benchmarks.eval_e2e [--images 64] [--channels 0,32,256] [--record]
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # `python benchmarks/eval_e2e.py`: import as `python -m` does
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import functools
import tempfile
import time

import numpy as np

from benchmarks import common
from benchmarks import input_pipeline

# The target: eval.py at most this many times decoding once plus the network.
TARGET_RATIO = 1.1


def _config(root: str, tsv: str, batch: int, channels: int):
  from configs import base
  c = base.get_base_config("wflw")
  c.data.image_dir = os.path.join(root, input_pipeline.IMAGES)
  c.data.train_tsv = tsv
  c.data.test_tsv = tsv
  c.data.val_fraction = 0.0
  c.eval_batch_size = batch
  c.model.channels = channels
  return c


def _loaded(config):
  """(LoadedModel, landmark function): random weights, or no network at all (channels 0)."""
  import jax
  from star_jax.core import schemes as datasets
  from star_jax.training import eval_lib
  from star_jax.training.model_store import LoadedModel
  from star_jax.models import create_model, init_variables
  spec = datasets.get_spec("wflw")
  size = int(config.data.image_size)
  if int(config.model.channels) == 0:
    none = lambda variables, images: np.zeros((len(images), spec.num_points, 2), np.float32)
    return LoadedModel(None, None, spec, size, config, "none"), none
  model = create_model(config.model, spec)
  loaded = LoadedModel(model, init_variables(model, jax.random.PRNGKey(0)), spec, size, config,
                       "random")
  return loaded, eval_lib.landmark_fn_for(loaded)


def run_eval_lib(config, loaded) -> int:
  from star_jax.core import schemes as datasets
  from star_jax.training import eval_lib
  loaded, landmark_fn = loaded
  out = eval_lib.predict_split(config, loaded, split="test", progress=False,
                               landmark_fn=landmark_fn)
  eval_lib.compute_metrics(out["landmarks"], out["landmarks_gt"], datasets.get_spec("wflw"),
                           image_paths=out["image_paths"], tags=out["tags"],
                           image_dir=out["image_dir"])
  return len(out["landmarks"])


def run_tf_data(config, loaded) -> int:
  from star_jax.core import schemes as datasets, metrics
  from star_jax.data import transforms
  from star_jax.data import pipeline
  loaded, fn = loaded
  preds, gts = [], []
  pending = None
  for batch in pipeline.eval_dataset(config, "test", batch_size=int(config.eval_batch_size)):
    lm = fn(loaded.variables, batch["image"])  # dispatched; read back one batch later
    if pending is not None:
      preds.append(pending[0]), gts.append(pending[1])
    pending = (lm, batch)
  if pending is not None:
    preds.append(pending[0]), gts.append(pending[1])
  out_pred, out_gt = [], []
  for lm, batch in zip(preds, gts):
    mask = np.asarray(batch["mask"], bool)
    px = transforms.landmarks_to_original(np.asarray(lm), np.asarray(batch["matrix"]),
                                         batch["image"].shape[1])
    out_pred.append(px[mask])
    out_gt.append(np.asarray(batch["landmarks_px"])[mask])
  pred, gt = np.concatenate(out_pred), np.concatenate(out_gt)
  metrics.nme(pred, gt, datasets.get_spec("wflw"))
  return len(pred)


def decode_once(config) -> int:
  """Every image of the TSV decoded once, whole, by cv2.imread (no crop, no network)."""
  import cv2
  from star_jax.core import schemes as datasets
  from star_jax.data.annotations import read_tsv
  table = read_tsv(config.data.test_tsv, datasets.get_spec("wflw"),
                   image_dir=config.data.image_dir)
  for path in table.image_paths:   # absolute
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    assert image is not None, path
  return len(table.image_paths)


def network_only(config, loaded, count: int) -> int:
  """The jitted landmark function on `count` crops already in memory, in eval batches."""
  from star_jax.training import eval_lib
  loaded, fn = loaded
  size, batch = int(config.data.image_size), int(config.eval_batch_size)
  rng = np.random.default_rng(0)
  crops = eval_lib.normalize_crops(rng.integers(0, 256, (batch, size, size, 3), np.uint8))
  for _ in range(-(-count // batch)):
    np.asarray(fn(loaded.variables, crops))
  return count


def _wall(fn, repeats: int) -> float:
  """Median wall seconds of `repeats` calls after one (compile, warm the file cache)."""
  return common.median(common.time_fn(fn, warmup=1, repeats=repeats))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--images", type=int, default=64)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--channels", default="0,32,256", help="0: no network (data path only)")
  parser.add_argument("--paths", default="eval_lib,tf.data")
  parser.add_argument("--repeats", type=int, default=2)
  common.add_common_flags(parser)
  args = parser.parse_args(argv)
  settings = common.apply_process_settings(args.process_settings)
  runners = {"eval_lib": run_eval_lib, "tf.data": run_tf_data}
  rows, floor_rows = [], []
  with tempfile.TemporaryDirectory() as root:
    tsv, kb = input_pipeline.make_dataset(root, args.images)
    for channels in (int(c) for c in args.channels.split(",")):
      config = _config(root, tsv, args.batch_size, channels)
      loaded = _loaded(config)
      if "eval_lib" in args.paths.split(","):
        whole = _wall(functools.partial(run_eval_lib, config, loaded), args.repeats)
        decode = _wall(functools.partial(decode_once, config), args.repeats)
        network = _wall(functools.partial(network_only, config, loaded, args.images),
                        args.repeats)
        ratio = whole / (decode + network)
        floor_rows.append([channels, args.images, f"{whole:.2f}", f"{decode:.2f}",
                           f"{network:.2f}", f"{ratio:.2f}x",
                           "met" if ratio <= TARGET_RATIO else "not met"])
        print(floor_rows[-1], flush=True)
      for path in args.paths.split(","):
        runners[path](config, loaded)  # compile, warm the file cache
        walls, cpus = [], []
        for _ in range(args.repeats):
          cpu0, t0 = time.process_time(), time.perf_counter()
          count = runners[path](config, loaded)
          walls.append(time.perf_counter() - t0)
          cpus.append(time.process_time() - cpu0)
        wall, cpu = common.median(walls), common.median(cpus)
        rows.append([path, channels, count, args.batch_size, f"{count / wall:.1f}",
                     f"{count / cpu:.1f}"])
        print(rows[-1], flush=True)
  common.record(
      "Evaluation end to end (TSV -> crops -> jitted network -> original pixels -> metrics)",
      ["path", "channels", "images", "batch", "images/s (wall)", "images per CPU-second"],
      rows,
      notes=(f"{args.images} generated 1000x800 JPEGs (mean {kb:.0f} KB, face ~1/3 width), "
             f"WFLW 4 stacks x 4 levels, 256x256 crops, random weights, float32; median of "
             f"{args.repeats} passes after a warm-up pass; target: the train-pipeline rate per "
             f"core (RESULTS.md, input pipeline); {settings}; {common.load_average()} at the "
             "end (other work shares the machine)."),
      write=args.record)
  if floor_rows:
    common.record(
        "eval.py against decoding every image once plus the network",
        ["channels", "images", "eval_lib s (wall)", "decode once s", "network alone s",
         "eval_lib / (decode + network)", f"target <= {TARGET_RATIO:g}x"], floor_rows,
        notes=(f"the images above; decode: cv2.imread of each whole image, one thread; "
               f"network: the jitted function on {args.batch_size}-crop batches in memory; "
               f"channels 0: no network (zeros); medians of {args.repeats} after a warm-up "
               f"pass; {settings}; {common.load_average()} at the end"),
        write=args.record)


if __name__ == "__main__":
  main()
