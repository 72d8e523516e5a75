"""Full training step throughput (images/s): the project's `train_step`, step only.

What is timed is exactly what `star_jax.training.train_lib.train_and_evaluate` runs per step: the
per-device `train_lib.train_step` (forward of the full WFLW network, STAR + AWing losses on
every stack, backward, Adam, EMA of parameters and BatchNorm statistics) mapped over the local
devices by `parallel.map_over_devices` with the state donated. The batch is synthetic and
already on the device, so no input pipeline or host transfer is in the measurement.

Variants (each a flag, so before/after rows can be recorded side by side):
- `--dtype bfloat16`: bf16 compute, float32 master weights, optimiser state and EMA.
- `--no_donate`: the state is not donated (XLA must keep the old state alive: a copy).
- `--sync_every_step`: the host reads the metrics after every step (what an unpipelined loop
  does); by default steps are dispatched back to back as the training loop does.
- `--star_impl dense`: the STAR loss written as a direct translation of the official formula
  (per-pixel grids, covariances by full-tensor products) instead of `star_jax.core.losses`' fused
  marginals, to measure what the fused reductions buy inside the whole step.

Run from the repository root:
  python -m benchmarks.train_step [--batch_size 4] [--dtypes float32] [--repeats 3] [--record]

The official PyTorch step, timed beside this one under the same process settings, is
`benchmarks/official_step.py`'s table; this script gives no ratio against a figure measured
elsewhere. This module also provides the builders `benchmarks/gpu_check.py` uses; it imports
neither TensorFlow nor (when missing) ml_collections, and JAX only when a function runs.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # `python benchmarks/train_step.py`: import as `python -m` does
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import functools
import time
import types
from typing import Any, Callable

import numpy as np

from benchmarks import common
# Forward FLOPs of the WFLW network per 256x256 image (multiply and add counted separately);
# a training step (forward + backward for activations and weights) is about 3x that.
FORWARD_GFLOP_PER_IMAGE = 34.7
TRAIN_FLOP_FACTOR = 3.0


def import_train_lib():
  """`star_jax.training.train_lib` (imports neither TensorFlow nor ml_collections at module
  level)."""
  from star_jax.training import train_lib
  return train_lib


def _namespace(**fields) -> types.SimpleNamespace:
  ns = types.SimpleNamespace(**fields)
  ns.get = lambda key, default=None: getattr(ns, key, default)
  return ns


def recipe_config(*, dtype: str = "float32", batch_size: int = 128, channels: int = 256,
                  num_stacks: int = 4, num_levels: int = 4, image_size: int = 256) -> Any:
  """The official WFLW recipe (configs/base.py) with the given overrides.

  Uses `configs.base` when ml_collections is installed, else an attribute tree with the same
  fields and values (the step reads `model`, `loss`, `optim`, `ema`, `batch_size`).
  """
  try:
    from configs import base
    config = base.get_base_config("wflw")
  except ImportError:
    config = _namespace(
        dataset="wflw", seed=0, batch_size=128,
        data=_namespace(image_size=256),
        model=_namespace(num_stacks=4, num_levels=4, channels=256, use_aam=True,
                         dtype="float32"),
        loss=_namespace(star_weight=1.0, star_w=1.0, star_dist="smoothl1", star_eps=1e-5,
                        star_version="v2", pointmap_weight=10.0, edgemap_weight=10.0),
        optim=_namespace(lr=1e-3, b1=0.9, b2=0.999, weight_decay=0.0,
                         milestones=(200, 350, 450), gamma=0.1),
        ema=_namespace(enabled=True, half_life_examples=10000.0))
  config.batch_size = batch_size
  config.data.image_size = image_size
  config.model.dtype = dtype
  config.model.channels = channels
  config.model.num_stacks = num_stacks
  config.model.num_levels = num_levels
  return config


def dense_star_loss(heatmaps, landmarks, *, w=1.0, dist="smoothl1", eps=1e-5, version="v2"):
  """STAR v2 (smooth-L1) as the official code computes it, on full (B, H, W, N) tensors.

  Per-pixel coordinate grids, means and covariances by products over the whole map, then the
  same closed-form eigendecomposition as `star_jax.core.losses` (the official code leaves the device
  for `eigh`; that part is not what is compared here).
  """
  del dist, version
  import jax.numpy as jnp
  from star_jax.core import losses
  from star_jax.core import moments
  h = heatmaps.astype(jnp.float32)
  _, height, width, _ = h.shape
  gy = jnp.linspace(-1.0, 1.0, height)[None, :, None, None]
  gx = jnp.linspace(-1.0, 1.0, width)[None, None, :, None]
  p = h / jnp.maximum(h.sum(axis=(1, 2), keepdims=True), 1e-6)
  mean_x = (p * gx).sum(axis=(1, 2))
  mean_y = (p * gy).sum(axis=(1, 2))
  dx = gx - mean_x[:, None, None]
  dy = gy - mean_y[:, None, None]
  v1 = p.sum(axis=(1, 2)) + eps
  v2 = (p * p).sum(axis=(1, 2)) + eps
  denominator = v1 - v2 / v1
  cxx = (p * dx * dx).sum(axis=(1, 2)) / denominator
  cxy = (p * dx * dy).sum(axis=(1, 2)) / denominator
  cyy = (p * dy * dy).sum(axis=(1, 2)) / denominator
  l0, l1, cos_t, sin_t = moments.eigh_2x2(cxx, cxy, cyy)
  ex, ey = landmarks[..., 0] - mean_x, landmarks[..., 1] - mean_y
  normal = -sin_t * ex + cos_t * ey
  tangent = cos_t * ex + sin_t * ey
  loss = (losses._huber(normal) / jnp.sqrt(l0 + eps) + losses._huber(tangent) / jnp.sqrt(l1 + eps)
          + w * (jnp.abs(l0) + jnp.abs(l1)))
  return loss.mean()


def _patched_star(impl: str):
  """Context for `--star_impl`: swaps `losses.star_loss` while the step is traced."""
  import contextlib
  from star_jax.core import losses

  @contextlib.contextmanager
  def swap():
    original = losses.star_loss
    if impl == "dense":
      losses.star_loss = dense_star_loss
    try:
      yield
    finally:
      losses.star_loss = original

  return swap()


def shard_to_devices(tree: Any) -> Any:
  """Host arrays (leading axis = global batch) -> per-device shards `(devices, b/devices, ...)`
  placed on the local devices, as the mapped step expects (no transfer at call time)."""
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  from star_jax.training import parallel
  devices = jax.local_devices()
  sharding = NamedSharding(Mesh(np.array(devices), (parallel.AXIS_NAME,)),
                           PartitionSpec(parallel.AXIS_NAME))

  def put(x):
    x = np.asarray(x)
    x = x.reshape((len(devices), x.shape[0] // len(devices)) + x.shape[1:])
    return jax.make_array_from_single_device_arrays(
        x.shape, sharding, [jax.device_put(x[i:i + 1], d) for i, d in enumerate(devices)])

  return jax.tree.map(put, tree)


def synthetic_batch(batch_size: int, image_size: int, num_points: int, num_edges: int,
                    seed: int = 0) -> dict[str, np.ndarray]:
  """A training batch with the pipeline's shapes and value ranges (host numpy)."""
  rng = np.random.default_rng(seed)
  s = image_size // 4
  return {
      "image": rng.uniform(-1, 1, (batch_size, image_size, image_size, 3)).astype(np.float32),
      "landmarks": rng.uniform(-0.8, 0.8, (batch_size, num_points, 2)).astype(np.float32),
      "pointmaps": (rng.uniform(0, 1, (batch_size, s, s, num_points)) ** 8).astype(np.float32),
      "edgemaps": (rng.uniform(0, 1, (batch_size, s, s, num_edges)) ** 8).astype(np.float32),
  }


def initial_state(train_lib, model, tx, image_size: int, seed: int = 0):
  """A fresh `train_lib.TrainState`, as training starts: host-drawn weights
  (`models.init_variables`, no compilation), EMA a copy of them."""
  from star_jax import models
  return train_lib.create_train_state(models.init_variables(model, seed, image_size), tx)


def build_train_step(config, *, donate: bool = True, star_impl: str = "fused"
                     ) -> tuple[Callable, Any, dict]:
  """(mapped step, replicated state, device batch) for `config`, as train_and_evaluate builds
  them (same model, optimiser, EMA decay, loss assembly, device mapping)."""
  train_lib = import_train_lib()
  from star_jax.core import schemes as datasets
  from star_jax.training import parallel
  from star_jax.models import create_model
  spec = datasets.get_spec(str(config.dataset))
  train_model = create_model(config.model, spec, bn_axis_name=parallel.AXIS_NAME)
  eval_model = create_model(config.model, spec)
  image_size = int(config.data.image_size)
  epoch_steps = 7500 // int(config.batch_size)  # WFLW train size; only the schedule uses it
  tx = train_lib.make_optimizer(config, max(epoch_steps, 1))
  step = functools.partial(train_lib.train_step, model=train_model, tx=tx,
                           decay=train_lib.ema_decay(config),
                           loss_fn=functools.partial(train_lib.compute_loss, config))
  mapped = parallel.map_over_devices(step, donate_argnums=(0,) if donate else ())

  def traced_step(state, batch):
    with _patched_star(star_impl):
      return mapped(state, batch)

  state = parallel.replicate(initial_state(train_lib, eval_model, tx, image_size))
  batch = shard_to_devices(synthetic_batch(int(config.batch_size), image_size, spec.num_points,
                                           spec.num_edges))
  return traced_step, state, batch


def time_train_step(config, *, steps_per_window: int = 2, windows: int = 3, warmup: int = 1,
                    donate: bool = True, sync_every_step: bool = False,
                    star_impl: str = "fused", profile_dir: str | None = None
                    ) -> dict[str, float]:
  """Seconds per step (median over `windows` windows of `steps_per_window` steps after warm-up)
  and the first call's seconds (compile + one step). With `profile_dir`, three more steps are
  traced there (`jax.profiler`, viewable in TensorBoard/Perfetto)."""
  import jax
  step, state, batch = build_train_step(config, donate=donate, star_impl=star_impl)
  t0 = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - t0
  loss = float(np.asarray(metrics["loss"])[0])
  for _ in range(max(warmup - 1, 0)):
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))

  def run_window():
    nonlocal state, metrics
    for _ in range(steps_per_window):
      state, metrics = step(state, batch)
      if sync_every_step:
        float(np.asarray(metrics["loss"])[0])
    jax.block_until_ready((state, metrics))

  per_step, cpu_per_step = common.time_windows(run_window, windows=windows,
                                               steps_per_window=steps_per_window)
  if profile_dir:
    try:
      with jax.profiler.trace(profile_dir):
        for _ in range(3):
          state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
    except Exception as e:  # noqa: BLE001 - a missing profiler plugin must not lose the timing
      print(f"profiling into {profile_dir} failed: {e!r}", flush=True)
  del state
  return {"seconds": common.median(per_step), "first_call_seconds": first, "loss": loss,
          "all": per_step, "cpu_seconds": common.median(cpu_per_step)}


def train_flops(batch_size: int, image_size: int = 256) -> float:
  return TRAIN_FLOP_FACTOR * FORWARD_GFLOP_PER_IMAGE * 1e9 * batch_size * (image_size / 256) ** 2


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch_size", type=int, default=4)
  parser.add_argument("--dtypes", default="float32", help="comma list: float32,bfloat16")
  parser.add_argument("--repeats", type=int, default=3, help="timed windows (median)")
  parser.add_argument("--steps_per_window", type=int, default=2)
  parser.add_argument("--variants", default="default",
                      help="comma list of default,no_donate,sync_every_step,dense_star")
  parser.add_argument("--channels", type=int, default=256)
  parser.add_argument("--image_size", type=int, default=256)
  common.add_common_flags(parser)
  args = parser.parse_args(argv)
  settings = common.apply_process_settings(args.process_settings)

  variants = {
      "default": {},
      "no_donate": {"donate": False},
      "sync_every_step": {"sync_every_step": True},
      "dense_star": {"star_impl": "dense"},
  }
  for name in args.variants.split(","):
    if name not in variants:
      parser.error(f"--variants: {name!r} is not one of {sorted(variants)}")
  rows = []
  cores = os.cpu_count() or 1
  for dtype in args.dtypes.split(","):
    for name in args.variants.split(","):
      config = recipe_config(dtype=dtype, batch_size=args.batch_size, channels=args.channels,
                             image_size=args.image_size)
      result = time_train_step(config, steps_per_window=args.steps_per_window,
                               windows=args.repeats, **variants[name])
      seconds = result["seconds"]
      gflops = train_flops(args.batch_size, args.image_size) / seconds / 1e9
      rows.append([name, dtype, args.batch_size, f"{seconds:.3f}",
                   f"{result['cpu_seconds']:.2f} ({result['cpu_seconds'] / cores:.2f})",
                   f"{args.batch_size / seconds:.2f}", f"{gflops:.0f}",
                   f"{result['first_call_seconds']:.1f}", f"{result['loss']:.4f}"])
      print(rows[-1], "windows:", [f"{t:.3f}" for t in result["all"]], flush=True)
  common.record(
      f"Train step (WFLW, {args.channels} channels, 4 stacks, {args.image_size}x{args.image_size},"
      " STAR + AWing, Adam, EMA; step only)",
      ["variant", "dtype", "batch", "s / step (median)", "CPU-s / step (/ cores)", "images/s",
       "GFLOP/s (3x34.7/img)", "first call s (compile)", "loss"],
      rows,
      notes=(f"star_jax.training.train_lib.train_step via parallel.map_over_devices (state "
             f"donated unless "
             f"no_donate), synthetic on-device batch; median of {args.repeats} windows of "
             f"{args.steps_per_window} steps after warm-up; {settings}; the official step under "
             "the same settings: benchmarks/official_step.py. 'CPU-s / step' is process CPU "
             "time (divided by the core count: the step time with the cores to itself, if it "
             f"scaled perfectly), given beside wall time; {common.load_average()} at the end"),
      write=args.record)


if __name__ == "__main__":
  main()
