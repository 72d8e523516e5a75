"""Training: state, optimiser, learning-rate schedule, EMA, loss assembly, steps and the loop.

What follows the official STAR trainer (ADNet lineage) and what deliberately differs:
- Adam (b1, b2 from the config, eps 1e-8 as torch), learning rate multiplied by `gamma` at each
  milestone epoch (torch MultiStepLR). Training step k (0-based) belongs to epoch
  `k // steps_per_epoch` and uses `lr * gamma ** #{milestones <= epoch}`.
- Weight decay, when `optim.weight_decay > 0`, is torch-style L2 (added to the gradient before
  Adam). It is off by default: the official config names 1e-5 but never passes it to Adam.
- EMA: initialised as a copy of the network, then after every optimiser step
  `ema = d * ema + (1 - d) * new` with `d = 0.5 ** (batch_size / half_life_examples)`, no
  warm-up, applied to the parameters and the BatchNorm statistics (the official float buffers).
- Loss per stack i of S: `2^i / 2^(S-1) * (star_weight * STAR(fused heatmaps, landmarks) +
  pointmap_weight * AWing(point maps) + edgemap_weight * AWing(edge maps))`, landmarks in the
  normalised [-1, 1] crop frame. With `use_aam=False` only the STAR term remains, applied to the
  heatmaps (the official code indexes its label list wrongly in that mode; we do not mirror it).
- Validation uses a split carved from the training set (or `data.val_tsv`), never the test set
  (the official trainer picked its best epoch on the test set). The best model is selected by
  the NME of the EMA weights; the raw weights are evaluated and stored beside them.
- No anomaly detection; instead a non-finite loss stops the run with the step number and the
  offending batch saved to `<workdir>/nan_batch_step<N>.npz`.
- Data parallel: the per-device step names its axis (`parallel.AXIS_NAME`) and averages
  gradients and BatchNorm statistics across all devices (SyncBatchNorm semantics); the global
  batch is fixed whatever the device count.
- Resume: the state, the logging accumulators and the best NME are checkpointed; the data
  stream restarts at the checkpointed step (augmentation draws derive from the seed and the
  example position), so a resumed run continues exactly.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

from absl import logging
import flax
from flax import struct
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax

from star_jax import checkpointing
from star_jax import datasets
from star_jax import models
from star_jax import host
from star_jax import logging_utils
from star_jax import metrics as metrics_lib
from star_jax import parallel

if TYPE_CHECKING:  # configs are ml_collections.ConfigDicts; the GPU check runs without it
  import ml_collections

PyTree = Any
Batch = Mapping[str, np.ndarray]


class TrainingDiverged(FloatingPointError):
  """Raised when the training loss becomes NaN or infinite."""


# ---------------------------------------------------------------------------------------------
# State.

@struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data position (which is `step`)."""

  step: jnp.ndarray            # int32 scalar: optimiser steps taken
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  ema_params: PyTree
  ema_batch_stats: PyTree

  def variables(self, *, ema: bool = True) -> dict[str, PyTree]:
    if ema:
      return {"params": self.ema_params, "batch_stats": self.ema_batch_stats}
    return {"params": self.params, "batch_stats": self.batch_stats}


def create_train_state(model, tx: optax.GradientTransformation, rng: jax.Array,
                       image_size: int) -> TrainState:
  """Initial state on the host: fresh parameters, EMA = a copy of them (as the official code).

  The parameters are drawn on the host by `star_jax.models.init_variables` (torch's default
  initialisation, deterministic in `rng`), which avoids compiling the initialisers.
  """
  variables = models.init_variables(model, rng, image_size)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                     opt_state=tx.init(params), ema_params=params, ema_batch_stats=batch_stats)
  return jax.tree.map(np.asarray, state)


# ---------------------------------------------------------------------------------------------
# Schedule, optimiser, EMA.

def steps_per_epoch(train_size: int, batch_size: int) -> int:
  """Full batches per epoch (the last partial batch is dropped, as the multi-GPU official run)."""
  steps = train_size // batch_size
  if steps < 1:
    raise ValueError(f"the training set has {train_size} examples, fewer than one batch of "
                     f"config.batch_size={batch_size}")
  return steps


def total_train_steps(config: ml_collections.ConfigDict, epoch_steps: int) -> int:
  """`config.num_train_steps` when > 0, else `num_epochs * steps_per_epoch`."""
  if config.num_train_steps and config.num_train_steps > 0:
    return int(config.num_train_steps)
  return int(config.num_epochs) * epoch_steps


def lr_schedule(config: ml_collections.ConfigDict, epoch_steps: int) -> optax.Schedule:
  """torch MultiStepLR stepped once per epoch, expressed per optimiser step."""
  boundaries: dict[int, float] = {}
  for milestone in config.optim.milestones:
    boundary = int(milestone) * epoch_steps
    boundaries[boundary] = boundaries.get(boundary, 1.0) * float(config.optim.gamma)
  return optax.piecewise_constant_schedule(float(config.optim.lr), boundaries)


def make_optimizer(config: ml_collections.ConfigDict, epoch_steps: int
                   ) -> optax.GradientTransformation:
  """Adam with torch semantics (L2 weight decay in the gradient when enabled)."""
  parts = []
  if config.optim.weight_decay and config.optim.weight_decay > 0:
    parts.append(optax.add_decayed_weights(float(config.optim.weight_decay)))
  parts.append(optax.scale_by_adam(b1=float(config.optim.b1), b2=float(config.optim.b2),
                                   eps=1e-8))
  parts.append(optax.scale_by_learning_rate(lr_schedule(config, epoch_steps)))
  return optax.chain(*parts)


def ema_decay(config: ml_collections.ConfigDict) -> float:
  """Per-step EMA decay `0.5 ** (batch_size / half_life_examples)`; 0 (EMA = raw) if disabled."""
  if not config.ema.enabled:
    return 0.0
  return 0.5 ** (float(config.batch_size) / float(config.ema.half_life_examples))


def ema_update(ema: PyTree, new: PyTree, decay: float) -> PyTree:
  """`decay * ema + (1 - decay) * new` leafwise (float leaves; others take the new value)."""
  def mix(e, n):
    if not jnp.issubdtype(jnp.asarray(n).dtype, jnp.floating):
      return n
    return (decay * e + (1.0 - decay) * n).astype(n.dtype)

  return jax.tree.map(mix, ema, new)


# ---------------------------------------------------------------------------------------------
# Loss.

def stack_weights(num_stacks: int) -> list[float]:
  """`2^i / 2^(S-1)`: later stacks weigh more, the last one 1."""
  return [2.0 ** i / 2.0 ** (num_stacks - 1) for i in range(num_stacks)]


def compute_loss(config: ml_collections.ConfigDict, outputs, batch: Batch
                 ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """Total loss (float32, or float64 for a float64 model) and its weighted parts (`star`, `pointmap`, `edgemap`, summed over stacks).

  `outputs` is a `ModelOutput`; `batch` holds `landmarks` (normalised), `pointmaps`, `edgemaps`.
  """
  from star_jax import losses  # imported here so the module loads without the loss code

  loss_cfg = config.loss
  num_stacks = len(outputs.heatmaps)
  use_aam = len(outputs.pointmaps) > 0
  # float32 for float32/bfloat16 compute (mixed precision keeps the loss in float32); float64
  # stays float64.
  dtype = jnp.promote_types(outputs.heatmaps[-1].dtype, jnp.float32)
  landmarks = jnp.asarray(batch["landmarks"], dtype)
  parts = {"star": jnp.zeros((), dtype)}
  if use_aam:
    parts["pointmap"] = jnp.zeros((), dtype)
    parts["edgemap"] = jnp.zeros((), dtype)
  for i, weight in enumerate(stack_weights(num_stacks)):
    star = losses.star_loss(outputs.heatmaps[i].astype(dtype), landmarks,
                            w=float(loss_cfg.star_w), dist=str(loss_cfg.star_dist),
                            eps=float(loss_cfg.star_eps), version=str(loss_cfg.star_version))
    parts["star"] += weight * float(loss_cfg.star_weight) * star
    if use_aam:
      parts["pointmap"] += weight * float(loss_cfg.pointmap_weight) * losses.awing_loss(
          outputs.pointmaps[i].astype(dtype), jnp.asarray(batch["pointmaps"], dtype))
      parts["edgemap"] += weight * float(loss_cfg.edgemap_weight) * losses.awing_loss(
          outputs.edgemaps[i].astype(dtype), jnp.asarray(batch["edgemaps"], dtype))
  total = sum(parts.values())
  return total, parts


# ---------------------------------------------------------------------------------------------
# Steps (per device; mapped by parallel.map_over_devices).

def train_step(state: TrainState, batch: Batch, *, model, tx: optax.GradientTransformation,
               loss_fn: Callable[[Any, Batch], tuple[jnp.ndarray, dict]], decay: float,
               axis_name: str = parallel.AXIS_NAME) -> tuple[TrainState, dict[str, jnp.ndarray]]:
  """One optimiser step on this device's share of the batch.

  Gradients, losses and (through BatchNorm's `axis_name`) batch statistics are averaged over
  `axis_name`, so every device ends with the same state. `model` must be built with
  `bn_axis_name=axis_name`. Returns the new state and scalar metrics.
  """
  def objective(params):
    outputs, updates = model.apply({"params": params, "batch_stats": state.batch_stats},
                                   batch["image"], train=True, mutable=["batch_stats"])
    loss, parts = loss_fn(outputs, batch)
    return loss, (parts, updates.get("batch_stats", state.batch_stats))

  (loss, (parts, batch_stats)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  # Keep the state's dtypes fixed (statistics of a float64 model would otherwise change them,
  # forcing a recompilation and breaking checkpoint restores into the initial structure).
  batch_stats = jax.tree.map(lambda new, old: new.astype(old.dtype), batch_stats,
                             state.batch_stats)
  grads = lax.pmean(grads, axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(
      step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
      ema_params=ema_update(state.ema_params, params, decay),
      ema_batch_stats=ema_update(state.ema_batch_stats, batch_stats, decay))
  metrics = {"loss": loss, **{f"loss_{k}": v for k, v in parts.items()},
             "grad_norm": optax.global_norm(grads)}
  metrics = lax.pmean(metrics, axis_name)
  return new_state, metrics


def eval_step(state: TrainState, images: jnp.ndarray, *, model) -> dict[str, jnp.ndarray]:
  """Final-stack landmarks (normalised crop frame) of the EMA and the raw weights."""
  ema = model.apply(state.variables(ema=True), images, train=False).landmarks[-1]
  raw = model.apply(state.variables(ema=False), images, train=False).landmarks[-1]
  return {"ema": ema.astype(jnp.float32), "raw": raw.astype(jnp.float32)}


# ---------------------------------------------------------------------------------------------
# Validation.

def evaluate(p_eval_step, state_r: TrainState, batches: Iterable[Batch], spec,
             norm: str) -> dict[str, float]:
  """Mean NME of the EMA and raw weights over `batches` (padding masked out)."""
  nmes = {"ema": [], "raw": []}
  for batch in batches:
    preds = parallel.unshard(p_eval_step(state_r, parallel.shard(
        np.asarray(batch["image"], np.float32))))
    mask = np.asarray(batch["mask"], bool) if "mask" in batch else np.ones(len(preds["ema"]), bool)
    gt = np.asarray(batch["landmarks"], np.float64)[mask]
    for name in nmes:
      nmes[name].append(metrics_lib.nme(preds[name][mask], gt, spec, norm))
  if not nmes["ema"]:
    raise ValueError("the validation split is empty")
  ema = np.concatenate(nmes["ema"])
  return {"val_nme": float(ema.mean()), "val_nme_raw": float(np.concatenate(nmes["raw"]).mean()),
          "val_images": int(ema.size)}


# ---------------------------------------------------------------------------------------------
# Data hooks.

def _default_train_data(config, *, start_step, process_index, process_count):
  from star_jax.data import pipeline
  return pipeline.train_dataset(config, start_step=start_step, process_index=process_index,
                                process_count=process_count)


def _default_eval_data(config, split, *, batch_size):
  from star_jax.data import pipeline
  # Every process evaluates the whole (small) validation split, so all agree on the NME and
  # the best model without a cross-process reduction.
  return pipeline.eval_dataset(config, split, batch_size=batch_size, process_index=0,
                               process_count=1)


def _default_train_size(config) -> int:
  """Examples in the training split (after carving the validation rows)."""
  from star_jax.data import pipeline
  return pipeline.num_examples(config, "train")


# ---------------------------------------------------------------------------------------------
# The loop.

def _cadence(value: int, epoch_steps: int) -> int:
  return epoch_steps if value is None or value < 0 else int(value)


def _check_config(config: ml_collections.ConfigDict) -> None:
  if config.batch_size <= 0:
    raise ValueError(f"config.batch_size must be positive, got {config.batch_size}")
  if config.data.image_size % 4:
    raise ValueError(f"config.data.image_size={config.data.image_size} must divide by 4")
  if config.eval_batch_size % jax.local_device_count():
    raise ValueError(f"config.eval_batch_size={config.eval_batch_size} must be divisible by the "
                     f"{jax.local_device_count()} local devices")


def _save_nan_batch(workdir: str, step: int, batch: Batch) -> str:
  suffix = "" if jax.process_index() == 0 else f"_process{jax.process_index()}"
  path = os.path.join(workdir, f"nan_batch_step{step}{suffix}.npz")
  np.savez(path, **{k: np.asarray(v) for k, v in batch.items()})
  return path


class _Accumulator:
  """Host sums of per-step scalars over a logging window (checkpointed for exact resume)."""

  def __init__(self, sums: Mapping[str, float] | None = None, count: int = 0):
    self.sums = dict(sums or {})
    self.count = int(count)

  def add(self, scalars: Mapping[str, float]) -> None:
    for k, v in scalars.items():
      self.sums[k] = self.sums.get(k, 0.0) + float(v)
    self.count += 1

  def means(self) -> dict[str, float]:
    return {k: v / max(self.count, 1) for k, v in self.sums.items()}

  def reset(self) -> None:
    self.sums, self.count = {}, 0


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       train_data_fn: Callable[..., Iterator[Batch]] | None = None,
                       eval_data_fn: Callable[..., Iterable[Batch]] | None = None,
                       train_size: int | None = None) -> TrainState:
  """Trains (resuming from `<workdir>/checkpoints` when present) and returns the final state.

  The data hooks default to `star_jax.data.pipeline`: `train_data_fn(config, *, start_step,
  process_index, process_count)` like `train_dataset`, `eval_data_fn(config, split, *,
  batch_size)` like `eval_dataset`, and `train_size` (examples per epoch) from the training
  split's annotations. They are parameters so that other sources can be plugged in.
  Raises `TrainingDiverged` when the loss becomes NaN or infinite.
  """
  host.tune_process()
  logging_utils.quiet_library_logs()
  parallel.initialize_distributed(bool(config.get("distributed", False)))
  _check_config(config)
  train_data_fn = train_data_fn or _default_train_data
  eval_data_fn = eval_data_fn or _default_eval_data
  workdir = os.path.abspath(workdir)
  is_primary = jax.process_index() == 0
  if is_primary:
    os.makedirs(workdir, exist_ok=True)
    checkpointing.write_config(workdir, config)

  spec = datasets.get_spec(config.dataset)
  from star_jax.models import create_model
  train_model = create_model(config.model, spec, bn_axis_name=parallel.AXIS_NAME)
  eval_model = create_model(config.model, spec)

  global_batch = int(config.batch_size)
  parallel.per_device_batch_size(global_batch)  # validates divisibility
  if train_size is None:
    train_size = _default_train_size(config)
  epoch_steps = steps_per_epoch(train_size, global_batch)
  num_steps = total_train_steps(config, epoch_steps)
  eval_every = _cadence(config.eval_every_steps, epoch_steps)
  ckpt_every = _cadence(config.checkpoint_every_steps, epoch_steps)
  log_every = max(int(config.log_every_steps), 1)
  schedule = lr_schedule(config, epoch_steps)
  tx = make_optimizer(config, epoch_steps)
  decay = ema_decay(config)

  state = create_train_state(eval_model, tx, jax.random.PRNGKey(int(config.seed)),
                             int(config.data.image_size))
  parallel.sync_processes("checkpoint_manager")  # its creation runs a cross-process broadcast
  checkpoints = checkpointing.TrainCheckpoints(workdir, keep=int(config.keep_checkpoints))
  accumulator = _Accumulator()
  best_nme = math.inf
  restored = checkpoints.restore_latest(flax.serialization.to_state_dict(state))
  if restored is not None:
    state_dict, meta = restored
    state = flax.serialization.from_state_dict(state, state_dict)
    accumulator = _Accumulator(meta.get("log_sums"), meta.get("log_count", 0))
    best_nme = float(meta.get("best_nme", math.inf))
  start_step = int(state.step)

  if is_primary:
    # Records after the checkpoint are re-logged by the resumed run (a fresh run drops all).
    logging_utils.truncate_metrics(workdir, start_step if start_step > 0 else -1)
  writer = logging_utils.MetricWriter(workdir, enabled=is_primary)
  logging.info("%s", parallel.describe_devices())
  logging.info("train examples %d, global batch %d (%d per device), %d steps per epoch, "
               "%d steps in all; %s at step %d", train_size, global_batch,
               parallel.per_device_batch_size(global_batch), epoch_steps, num_steps,
               "resuming" if start_step else "starting", start_step)

  p_train_step = parallel.map_over_devices(
      functools.partial(train_step, model=train_model, tx=tx, decay=decay,
                        loss_fn=functools.partial(compute_loss, config)),
      donate_argnums=(0,))
  p_eval_step = parallel.map_over_devices(functools.partial(eval_step, model=eval_model))

  def run_validation(step: int) -> None:
    nonlocal best_nme
    batches = eval_data_fn(config, "val", batch_size=int(config.eval_batch_size))
    t0 = time.time()
    result = evaluate(p_eval_step, state_r, batches, spec, str(config.nme_norm))
    result["val_seconds"] = time.time() - t0
    writer.write(step, result)
    writer.flush()
    logging.info("step %d: val NME %.5f (EMA), %.5f (raw) on %d images", step,
                 result["val_nme"], result["val_nme_raw"], result["val_images"])
    if result["val_nme"] < best_nme:
      best_nme = result["val_nme"]
      if is_primary:
        host = parallel.unreplicate(state_r)
        checkpointing.save_for_inference(
            os.path.join(workdir, checkpointing.BEST_DIR), eval_model,
            host.variables(ema=True), config, raw_variables=host.variables(ema=False),
            extra={"step": step, "val_nme": result["val_nme"],
                   "val_nme_raw": result["val_nme_raw"]})

  def save_checkpoint(step: int) -> None:
    host = parallel.unreplicate(state_r)
    meta = {"config": checkpointing.config_to_json(config), "log_sums": accumulator.sums,
            "log_count": accumulator.count, "best_nme": best_nme,
            "train_size": train_size, "saved_at": time.time()}
    checkpoints.save(step, flax.serialization.to_state_dict(host), meta)

  train_iter = iter(train_data_fn(config, start_step=start_step,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count()))
  state_r = parallel.replicate(state)
  del state
  if start_step == 0:
    run_validation(0)  # the untrained network's NME, the reference the run improves on

  bar = logging_utils.progress_bar(num_steps, start_step, enabled=is_primary)
  pending = None  # (step, host batch, device metrics) of the step not yet checked
  window_start = time.time()
  window_steps = 0

  def resolve(entry) -> None:
    step, batch, metrics = entry
    scalars = {k: float(v) for k, v in parallel.unreplicate(metrics).items()}
    if not math.isfinite(scalars["loss"]):
      path = _save_nan_batch(workdir, step, batch)
      writer.write(step, {"train_loss": scalars["loss"], "diverged": True})
      writer.flush()
      raise TrainingDiverged(
          f"training loss is {scalars['loss']} at step {step} (the update that produced step "
          f"{step}); the offending batch is saved in {path}. Lower config.optim.lr or inspect "
          "the data.")
    accumulator.add(scalars)

  parallel.sync_processes("first_step")
  try:
    for step in range(start_step, num_steps):
      batch = next(train_iter)
      state_r, metrics = p_train_step(state_r, parallel.shard(batch))
      done = step + 1
      if pending is not None:
        resolve(pending)  # the previous step: overlaps with the one just dispatched
      pending = (done, batch, metrics)
      window_steps += 1
      bar.update(1)
      is_last = done == num_steps
      log_now = done % log_every == 0 or is_last
      eval_now = done % eval_every == 0 or is_last
      ckpt_now = done % ckpt_every == 0 or is_last
      if not (log_now or eval_now or ckpt_now):
        continue
      resolve(pending)
      pending = None
      if log_now:
        elapsed = time.time() - window_start
        means = accumulator.means()
        record = {"train_" + k: v for k, v in means.items()}
        record["lr"] = float(schedule(done - 1))
        record["epoch"] = (done - 1) // epoch_steps
        record["examples_per_sec"] = window_steps * global_batch / max(elapsed, 1e-9)
        writer.write(done, record)
        bar.set_postfix(loss=f"{means.get('loss', float('nan')):.4f}", lr=f"{record['lr']:.2e}")
        accumulator.reset()
      if eval_now:
        run_validation(done)
      if ckpt_now:
        save_checkpoint(done)
      if log_now or eval_now or ckpt_now:
        writer.flush()
        window_start = time.time()
        window_steps = 0
  finally:
    bar.close()
    checkpoints.close()
    writer.close()
  return parallel.unreplicate(state_r)
