"""A tiny training run on synthetic batches, runnable as a subprocess by the training tests.

It runs train_and_evaluate as train.py does (error contract, SIGTERM / Ctrl-C handling).

Usage: python tests/train_harness.py WORKDIR OUT.npz [--steps N] [--every K]
       [--coordinator HOST:PORT --num_processes P --process_id I]
Environment: STAR_TEST_NAN_AT_STEP=k puts a NaN in the image of step k's batch;
STAR_TEST_SLOW_FROM_STEP=k makes every batch from step k on take a second, and wait while the
file STAR_TEST_PAUSE_FILE exists.

The batches are a pure function of (seed, global example index), like the real pipeline, so a
resumed run and runs on different device or process counts see the same global batches.
XLA_FLAGS (e.g. forcing 2 CPU devices) must be set in the environment before this starts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

IMAGE_SIZE = 32
GLOBAL_BATCH = 4
NUM_TRAIN = 24          # 6 steps per epoch at batch 4
NUM_VAL = 6             # two eval batches of 4, the second padded


def tiny_config(steps: int = 6):
  from configs import base
  c = base.get_base_config("wflw")
  c.data.image_size = IMAGE_SIZE
  c.model.num_stacks = 1
  c.model.num_levels = 1
  c.model.channels = 8
  # Float64 compute (parameters stay float32): with float32 compute, runs that only differ in
  # reduction order drift apart within a few Adam steps (Adam normalises rounding noise in the
  # gradients of near-null directions, e.g. biases followed by BatchNorm, into steps of ~lr),
  # which would hide what the device-count comparison is meant to see.
  c.model.dtype = "float64"
  c.batch_size = GLOBAL_BATCH
  c.eval_batch_size = 4
  c.num_train_steps = steps
  c.optim.milestones = (1,)       # epoch 1 starts at step 6: lr drops within longer runs
  c.ema.half_life_examples = 20.0  # a visible EMA over a few steps
  c.log_every_steps = 2
  c.eval_every_steps = 3
  c.checkpoint_every_steps = 3
  c.keep_checkpoints = 2
  return c


def _example(seed: int, index: int, num_points: int, num_edges: int, split: str,
             ocular: tuple[int, int] = (60, 72)):
  rng = np.random.default_rng([seed, index, 0 if split == "train" else 1])
  hm = IMAGE_SIZE // 4
  image = rng.uniform(-1, 1, (IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  landmarks = rng.uniform(-0.8, 0.8, (num_points, 2)).astype(np.float32)
  # Make the eyes far enough apart for a well-defined NME (the scheme's ocular points: 60 and
  # 72 for WFLW, 36 and 45 for 300W).
  landmarks[ocular[0]] = (-0.5, -0.2)
  landmarks[ocular[1]] = (0.5, -0.2)
  pointmaps = (rng.uniform(0, 1, (hm, hm, num_points)) ** 6).astype(np.float32)
  edgemaps = (rng.uniform(0, 1, (hm, hm, num_edges)) ** 6).astype(np.float32)
  return image, landmarks, pointmaps, edgemaps


class FakeData:
  """`train_lib.TrainingData` of synthetic batches: the global stream is a pure function of
  (seed, global example index); process p takes its slice of every batch."""

  def __init__(self, config):
    from star_jax.core import schemes as datasets
    self.config = config
    self.spec = datasets.get_spec(config.dataset)
    self.ocular = self.spec.ocular or (0, 1)

  def num_train_examples(self):
    return NUM_TRAIN

  def train_batches(self, *, start_step, process_index, process_count):
    config, spec = self.config, self.spec
    local = config.batch_size // process_count
    step = start_step
    while True:
      first = step * config.batch_size + process_index * local
      parts = [_example(config.seed, (first + j) % NUM_TRAIN + (first + j) // NUM_TRAIN * 1000,
                        spec.num_points, spec.num_edges, "train", self.ocular)
               for j in range(local)]
      image, landmarks, pointmaps, edgemaps = (np.stack(x) for x in zip(*parts))
      if os.environ.get("STAR_TEST_NAN_AT_STEP") == str(step):
        image[0, 0, 0, 0] = np.nan
      if step >= int(os.environ.get("STAR_TEST_SLOW_FROM_STEP", 1 << 30)):
        time.sleep(1.0)  # leaves time to kill the run between checkpoints
        # ... or holds it here while the pause file exists (signals are handled meanwhile).
        while os.path.exists(os.environ.get("STAR_TEST_PAUSE_FILE", "/nonexistent")):
          time.sleep(0.05)
      yield {"image": image, "landmarks": landmarks, "pointmaps": pointmaps,
             "edgemaps": edgemaps, "index": np.arange(first, first + local, dtype=np.int64)}
      step += 1

  def val_batches(self, *, batch_size):
    spec = self.spec
    for start in range(0, NUM_VAL, batch_size):
      idx = [min(i, NUM_VAL - 1) for i in range(start, start + batch_size)]
      parts = [_example(self.config.seed, i, spec.num_points, spec.num_edges, "val",
                        self.ocular) for i in idx]
      image, landmarks, _, _ = (np.stack(x) for x in zip(*parts))
      yield {"image": image, "landmarks": landmarks,
             "mask": np.asarray([start + j < NUM_VAL for j in range(batch_size)]),
             "index": np.asarray(idx, np.int64)}


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("workdir")
  parser.add_argument("out")
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--lr", type=float, default=None)
  parser.add_argument("--dtype", default=None, help="override the compute dtype")
  parser.add_argument("--channels", type=int, default=None, help="override the model width")
  parser.add_argument("--every", type=int, default=None,
                      help="log, validate and checkpoint every this many steps")
  parser.add_argument("--coordinator", default=None)
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  args = parser.parse_args(argv)

  from absl import logging
  logging.set_verbosity(logging.INFO)
  import jax
  jax.config.update("jax_enable_x64", True)  # for the float64 compute of tiny_config
  if args.coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)
  from star_jax.commands import cli
  from star_jax.training import train_lib
  config = tiny_config(args.steps)
  if args.lr is not None:
    config.optim.lr = args.lr
  if args.dtype is not None:
    config.model.dtype = args.dtype
  if args.channels is not None:
    config.model.channels = args.channels
  if args.every is not None:
    config.log_every_steps = config.eval_every_steps = args.every
    config.checkpoint_every_steps = args.every

  def train():
    with cli.graceful_stop() as stop:
      result = train_lib.train_and_evaluate(config, args.workdir, data=FakeData(config),
                                            should_stop=stop)
    state = result.state
    flat = {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(
                {"params": state.params, "batch_stats": state.batch_stats,
                 "ema_params": state.ema_params, "ema_batch_stats": state.ema_batch_stats})}
    if jax.process_index() == 0 and not result.stopped:
      np.savez(args.out, step=np.asarray(state.step), **flat)
    return stop.exit_code

  # The entry points' error contract, except for divergence (its traceback is what the NaN
  # test reads).
  if os.environ.get("STAR_TEST_NAN_AT_STEP"):
    return train()
  return cli.run(train)


if __name__ == "__main__":
  sys.exit(main())
