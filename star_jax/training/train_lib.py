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
- Loss per stack i of S: `2^i / 2^(S-1) * sum_t weight_t * term_t`, the terms named in
  `config.loss.terms` (star_jax.core.losses registry). The official recipe is STAR (fused heatmaps)
  + 10 AWing (point maps) + 10 AWing (edge maps), landmarks in the normalised [-1, 1] crop
  frame. Without the AAM heads the terms that need them are left out (the official code indexes
  its label list wrongly in that mode; we do not mirror it).
- Validation uses a split carved from the training set (or `data.val_tsv`), never the test set
  (the official trainer picked its best epoch on the test set). The best model is chosen by the
  NME of the EMA weights, or (`best_weights='better'`) by the better of raw and EMA, the
  official rule.
- No anomaly detection; instead a non-finite loss stops the run with the step number and the
  offending batch saved to `<workdir>/nan_batch_step<N>.npz`.
- Data parallel: the per-device step names its axis (`parallel.AXIS_NAME`) and averages
  gradients and BatchNorm statistics across all devices (SyncBatchNorm semantics); the global
  batch is fixed whatever the device count.
- Resume: the state, the logging accumulators and the best NME are checkpointed; the data
  stream restarts at the checkpointed step (augmentation draws derive from the seed and the
  example position), so a resumed run continues exactly. A stop request (SIGTERM / Ctrl-C,
  through `should_stop`) ends the current step, saves a checkpoint at it and returns.
- Fine-tuning (`init_from`): every variable whose path and shape match the checkpoint's is
  loaded, the rest keeps its fresh initialisation (star_jax.training.finetune).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Protocol

from absl import logging
import flax
from flax import struct
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax

from star_jax.training import checkpointing, model_store
from star_jax.core import schemes as datasets
from star_jax.core import losses
from star_jax.core import metrics as metrics_lib
from star_jax import models
from star_jax.training import parallel
from star_jax.training import workdir as workdir_lib
from star_jax.errors import StarJaxError, UsageError

if TYPE_CHECKING:  # configs are ml_collections.ConfigDicts; the GPU check runs without it
  import ml_collections

PyTree = Any
Batch = Mapping[str, np.ndarray]


class TrainingDiverged(StarJaxError, FloatingPointError):
  """Raised when the training loss becomes NaN or infinite (exit 1 from train.py)."""


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


def create_train_state(variables: Mapping[str, PyTree], tx: optax.GradientTransformation
                       ) -> TrainState:
  """Initial state on the host from initial variables; EMA = a copy of them (as the official)."""
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
    raise UsageError(f"the training set has {train_size} examples, fewer than one batch of "
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


def make_optimizer(config: ml_collections.ConfigDict, epoch_steps: int,
                   frozen: Callable[[PyTree], PyTree] | None = None
                   ) -> optax.GradientTransformation:
  """Adam with torch semantics (L2 weight decay in the gradient when enabled).

  `frozen`, when given, maps the parameters to a tree of booleans: True leaves get no update
  (fine-tuning with `config.freeze`).
  """
  parts = []
  if config.optim.weight_decay and config.optim.weight_decay > 0:
    parts.append(optax.add_decayed_weights(float(config.optim.weight_decay)))
  parts.append(optax.scale_by_adam(b1=float(config.optim.b1), b2=float(config.optim.b2),
                                   eps=1e-8))
  parts.append(optax.scale_by_learning_rate(lr_schedule(config, epoch_steps)))
  tx = optax.chain(*parts)
  if frozen is None:
    return tx
  labels = lambda params: jax.tree.map(lambda f: "frozen" if f else "train", frozen(params))
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def ema_decay(config: ml_collections.ConfigDict) -> float:
  """Per-step EMA decay `0.5 ** (batch_size / half_life_examples)`; 0 (EMA = raw) if disabled."""
  if not config.ema.enabled:
    return 0.0
  return 0.5 ** (float(config.batch_size) / float(config.ema.half_life_examples))


def ema_update(ema: PyTree, new: PyTree, decay: float) -> PyTree:
  """`decay * ema + (1 - decay) * new` leafwise (optax.incremental_update), dtypes kept."""
  mixed = optax.incremental_update(new, ema, step_size=1.0 - decay)
  return jax.tree.map(lambda m, n: m.astype(n.dtype), mixed, new)


# ---------------------------------------------------------------------------------------------
# Loss.

def stack_weights(num_stacks: int) -> list[float]:
  """`2^i / 2^(S-1)`: later stacks weigh more, the last one 1."""
  return [2.0 ** i / 2.0 ** (num_stacks - 1) for i in range(num_stacks)]


def loss_terms(config: ml_collections.ConfigDict, *, use_aam: bool = True
               ) -> list[tuple[str, float, Callable, dict]]:
  """(name, weight, term function, options) of every term with a non-zero weight."""
  active = []
  for name, weight in sorted(config.loss.terms.items()):
    weight = float(weight)
    if weight == 0.0:
      continue
    term = losses.get_term(name)
    if term.needs_aam and not use_aam:
      continue
    options = config.loss.get(name, None)
    active.append((name, weight, term.fn, dict(options) if options is not None else {}))
  if not active:
    raise UsageError("config.loss.terms: every term has weight 0; nothing to train")
  return active


def compute_loss(config: ml_collections.ConfigDict, outputs, batch: Batch
                 ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """Total loss (float32, or float64 for a float64 model) and its weighted parts per term
  (summed over stacks). `outputs` is a `ModelOutput`; `batch` holds `landmarks` (normalised),
  and `pointmaps` / `edgemaps` targets for the AAM terms."""
  num_stacks = len(outputs.heatmaps)
  use_aam = len(outputs.pointmaps) > 0
  # float32 for float32/bfloat16 compute (mixed precision keeps the loss in float32); float64
  # stays float64.
  dtype = jnp.promote_types(outputs.heatmaps[-1].dtype, jnp.float32)
  terms = loss_terms(config, use_aam=use_aam)
  parts = {name: jnp.zeros((), dtype) for name, _, _, _ in terms}
  for i, stack_weight in enumerate(stack_weights(num_stacks)):
    prediction = losses.StackPrediction(
        landmarks=outputs.landmarks[i].astype(dtype), heatmaps=outputs.heatmaps[i].astype(dtype),
        pointmaps=outputs.pointmaps[i].astype(dtype) if use_aam else None,
        edgemaps=outputs.edgemaps[i].astype(dtype) if use_aam else None)
    for name, weight, fn, options in terms:
      parts[name] += stack_weight * weight * fn(prediction, batch, options)
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
  """Landmarks (normalised crop frame) of every stack, `(S, B, N, 2)`, EMA and raw weights."""
  ema = model.apply(state.variables(ema=True), images, train=False).landmarks
  raw = model.apply(state.variables(ema=False), images, train=False).landmarks
  stack = lambda out: jnp.stack([lm.astype(jnp.float32) for lm in out], axis=1)
  return {"ema": stack(ema), "raw": stack(raw)}


# ---------------------------------------------------------------------------------------------
# Validation.

def evaluate(p_eval_step, state_r: TrainState, batches: Iterable[Batch],
             spec: datasets.DatasetSpec, norm: str) -> dict[str, float]:
  """Mean NME of the EMA and raw weights (final stack, and EMA per stack) over `batches`."""
  nmes: dict[str, list] = {"ema": [], "raw": []}
  for batch in batches:
    preds = parallel.unshard(p_eval_step(state_r, parallel.shard(
        np.asarray(batch["image"], np.float32))))
    mask = (np.asarray(batch["mask"], bool) if "mask" in batch
            else np.ones(len(preds["ema"]), bool))
    gt = np.asarray(batch["landmarks"], np.float64)[mask]
    for name in nmes:
      per_stack = preds[name][mask]                            # (b, S, N, 2)
      nmes[name].append(np.stack([metrics_lib.nme(per_stack[:, s], gt, spec, norm)
                                  for s in range(per_stack.shape[1])], axis=1))
  if not nmes["ema"]:
    raise UsageError("the validation split is empty")
  ema, raw = (np.concatenate(nmes[k]) for k in ("ema", "raw"))  # (M, S)
  result = {"val_nme": float(ema[:, -1].mean()), "val_nme_raw": float(raw[:, -1].mean()),
            "val_images": int(ema.shape[0])}
  if ema.shape[1] > 1:
    result.update({f"val_nme_stack{s}": float(ema[:, s].mean()) for s in range(ema.shape[1])})
  return result


def best_candidate(result: Mapping[str, float], rule: str) -> tuple[float, str]:
  """(NME, 'ema' or 'raw'): what a validation result offers for the best model under `rule`.

  'ema': the EMA weights' NME; 'better': the better of raw and EMA (the official rule; EMA on
  a tie).
  """
  if rule == "better" and result["val_nme_raw"] < result["val_nme"]:
    return result["val_nme_raw"], "raw"
  return result["val_nme"], "ema"


# ---------------------------------------------------------------------------------------------
# Data.

class TrainingData(Protocol):
  """What the loop reads: the training stream, validation batches and the epoch size."""

  def num_train_examples(self) -> int: ...

  def train_batches(self, *, start_step: int, process_index: int, process_count: int
                    ) -> Iterator[Batch]: ...

  def val_batches(self, *, batch_size: int) -> Iterable[Batch]: ...


class PipelineData:
  """`TrainingData` from the tf.data pipelines over `config.data` (star_jax.data)."""

  def __init__(self, config: ml_collections.ConfigDict):
    from star_jax.data import sources
    self.config = config
    self.source = sources.source_for(config)

  def num_train_examples(self) -> int:
    return self.source.num_examples("train")

  def check_images(self) -> None:
    from star_jax.data import sources
    for split in ("train", "val"):
      sources.check_images(self.source, split, log=lambda line: logging.warning("%s", line))

  def train_batches(self, *, start_step, process_index, process_count):
    from star_jax.data import pipeline
    return pipeline.train_dataset(self.config, start_step=start_step,
                                  process_index=process_index, process_count=process_count,
                                  source=self.source)

  def val_batches(self, *, batch_size):
    from star_jax.data import pipeline
    # Every process evaluates the whole (small) validation split, so all agree on the NME and
    # the best model without a cross-process reduction.
    return pipeline.eval_dataset(self.config, "val", batch_size=batch_size, process_index=0,
                                 process_count=1, source=self.source)


# ---------------------------------------------------------------------------------------------
# The loop.

@dataclasses.dataclass
class TrainResult:
  state: TrainState
  step: int
  stopped: bool               # True when `should_stop` ended the run before its last step


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


def _cadence(value: int, epoch_steps: int) -> int:
  return epoch_steps if value is None or value < 0 else max(int(value), 1)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Usage errors that can be found before any work."""
  positive = {"batch_size": config.batch_size, "eval_batch_size": config.eval_batch_size,
              "data.image_size": config.data.image_size}
  for name, value in positive.items():
    if int(value) <= 0:
      raise UsageError(f"config.{name} must be positive, got {value}")
  if config.data.image_size % 4:
    raise UsageError(f"config.data.image_size={config.data.image_size} must divide by 4")
  if config.eval_batch_size % jax.local_device_count():
    raise UsageError(f"config.eval_batch_size={config.eval_batch_size} must be divisible by the "
                     f"{jax.local_device_count()} local devices")
  if config.best_weights not in ("ema", "better"):
    raise UsageError(f"config.best_weights={config.best_weights!r}: use 'ema' or 'better'")
  if not 0 <= float(config.data.val_fraction) < 1:
    raise UsageError(f"config.data.val_fraction={config.data.val_fraction} must be in [0, 1)")


def _save_nan_batch(workdir: str, step: int, batch: Batch) -> str:
  suffix = "" if jax.process_index() == 0 else f"_process{jax.process_index()}"
  path = os.path.join(workdir, f"nan_batch_step{step}{suffix}.npz")
  np.savez(path, **{k: np.asarray(v) for k, v in batch.items()})
  return path


@dataclasses.dataclass
class _Run:
  """What the loop's parts share: the setup of one training run."""

  config: Any
  workdir: str
  spec: datasets.DatasetSpec
  eval_model: Any
  data: TrainingData
  epoch_steps: int
  num_steps: int
  schedule: optax.Schedule
  writer: Any
  checkpoints: checkpointing.TrainCheckpoints
  best: model_store.BestCheckpoints | None
  p_train_step: Callable
  p_eval_step: Callable
  train_size: int
  is_primary: bool
  accumulator: _Accumulator = dataclasses.field(default_factory=_Accumulator)
  best_nme: float = math.inf
  window_start: float = dataclasses.field(default_factory=time.time)
  window_steps: int = 0
  step: int = 0                       # optimiser steps taken
  state_r: Any = None                 # the replicated train state
  pending: tuple | None = None        # (step, host batch, device metrics) not yet checked

  def check_pending(self) -> None:
    """Adds the pending step's metrics to the window; stops the run if its loss is not finite."""
    if self.pending is None:
      return
    step, batch, device_metrics = self.pending
    self.pending = None
    scalars = {k: float(v) for k, v in parallel.unreplicate(device_metrics).items()}
    if not math.isfinite(scalars["loss"]):
      path = _save_nan_batch(self.workdir, step, batch)
      self.writer.write_scalars(step, {"train_loss": scalars["loss"], "diverged": True})
      self.writer.flush()
      raise TrainingDiverged(
          f"training loss is {scalars['loss']} at step {step} (the update that produced step "
          f"{step}); the offending batch is saved in {path}. Lower config.optim.lr or inspect "
          "the data.")
    self.accumulator.add(scalars)

  def log(self, bar) -> None:
    self.check_pending()
    step = self.step
    elapsed = time.time() - self.window_start
    means = self.accumulator.means()
    record = {"train_" + k: v for k, v in means.items()}
    record["lr"] = float(self.schedule(step - 1))
    record["epoch"] = (step - 1) // self.epoch_steps
    record["examples_per_sec"] = (self.window_steps * int(self.config.batch_size)
                                  / max(elapsed, 1e-9))
    self.writer.write_scalars(step, record)
    bar.set_postfix(loss=f"{means.get('loss', float('nan')):.4f}", lr=f"{record['lr']:.2e}")
    self.accumulator.reset()
    self.restart_window()

  def validate(self, step: int | None = None) -> None:
    self.check_pending()
    step, state_r = self.step if step is None else step, self.state_r
    start = time.time()
    batches = self.data.val_batches(batch_size=int(self.config.eval_batch_size))
    result = evaluate(self.p_eval_step, state_r, batches, self.spec,
                      str(self.config.nme_norm))
    result["val_seconds"] = time.time() - start
    self.writer.write_scalars(step, result)
    self.writer.flush()
    from star_jax.training import logging_utils
    with logging_utils.above_bars():
      logging.info("%s", logging_utils.format_validation(step, result))
    nme, weights = best_candidate(result, str(self.config.best_weights))
    use_raw = weights == "raw"
    if nme < self.best_nme:
      self.best_nme = nme
      if self.best is not None:
        host = parallel.unreplicate(state_r)
        self.best.save(step, nme, self.eval_model, host.variables(ema=not use_raw),
                       spec=self.spec, image_size=int(self.config.data.image_size),
                       config=self.config, raw_variables=host.variables(ema=False),
                       extra={"val_nme_ema": result["val_nme"],
                              "val_nme_raw": result["val_nme_raw"],
                              "weights": "raw" if use_raw else "ema"})
    self.restart_window()

  def save(self) -> None:
    self.check_pending()
    step = self.step
    host = parallel.unreplicate(self.state_r)
    meta = {"config": checkpointing.config_to_json(self.config),
            "model": models.describe(self.eval_model,
                                     trained_on=models.training_data(self.config)),
            "scheme": self.spec.to_dict(),
            "log_sums": self.accumulator.sums, "log_count": self.accumulator.count,
            "best_nme": self.best_nme, "train_size": self.train_size,
            "saved_at": time.time()}
    self.checkpoints.save(step, flax.serialization.to_state_dict(host), meta)
    self.restart_window()

  def restart_window(self) -> None:
    self.writer.flush()
    self.window_start = time.time()
    self.window_steps = 0


def _initial_state(config, eval_model, tx, spec) -> TrainState:
  from star_jax.training import finetune
  variables = models.init_variables(eval_model, jax.random.PRNGKey(int(config.seed)),
                                    int(config.data.image_size))
  if config.init_from:
    variables = finetune.load_initial_variables(config, eval_model, spec, variables)
  return create_train_state(variables, tx)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       data: TrainingData | None = None,
                       should_stop: Callable[[], bool] | None = None) -> TrainResult:
  """Trains (resuming from `<workdir>/checkpoints` when present); returns the final state.

  `data` defaults to the tf.data pipelines over `config.data` (`PipelineData`); tests pass
  synthetic batches. `should_stop` is polled after every step: when it returns True the run
  saves a checkpoint at that step and returns with `stopped=True` (the same call resumes it).
  Raises `TrainingDiverged` when the loss becomes NaN or infinite, UsageError / WorkdirError /
  DataError for problems with the command (before any work).
  """
  from star_jax.training import finetune
  # CLU's writers import TensorFlow: only the loop needs them.
  from star_jax.training import logging_utils
  check_config(config)
  workdir = os.path.abspath(workdir)
  is_primary = jax.process_index() == 0
  spec = datasets.get_spec(config.dataset)
  config = finetune.resolve_model_config(config)
  if is_primary:
    workdir_lib.lock(workdir)
    workdir_lib.prepare(workdir, config)
  data = data or PipelineData(config)
  if is_primary and bool(config.data.check_images) and hasattr(data, "check_images"):
    data.check_images()

  train_model = models.create_model(config.model, spec, bn_axis_name=parallel.AXIS_NAME)
  eval_model = models.create_model(config.model, spec)
  global_batch = int(config.batch_size)
  parallel.per_device_batch_size(global_batch)  # validates divisibility
  train_size = data.num_train_examples()
  epoch_steps = steps_per_epoch(train_size, global_batch)
  num_steps = total_train_steps(config, epoch_steps)
  tx = make_optimizer(config, epoch_steps, finetune.frozen_mask(config, eval_model))
  state = _initial_state(config, eval_model, tx, spec)

  parallel.sync_processes("checkpoint_manager")  # its creation runs a cross-process broadcast
  run = _Run(config=config, workdir=workdir, spec=spec, eval_model=eval_model, data=data,
             epoch_steps=epoch_steps, num_steps=num_steps,
             schedule=lr_schedule(config, epoch_steps),
             writer=None, checkpoints=checkpointing.TrainCheckpoints(
                 workdir, keep=int(config.keep_checkpoints)),
             best=model_store.BestCheckpoints(workdir) if is_primary else None,
             p_train_step=parallel.map_over_devices(
                 functools.partial(train_step, model=train_model, tx=tx,
                                   decay=ema_decay(config),
                                   loss_fn=functools.partial(compute_loss, config)),
                 donate_argnums=(0,)),
             p_eval_step=parallel.map_over_devices(functools.partial(eval_step,
                                                                     model=eval_model)),
             train_size=train_size, is_primary=is_primary)
  restored = run.checkpoints.restore_latest(flax.serialization.to_state_dict(state))
  if restored is not None:
    state_dict, meta = restored
    state = flax.serialization.from_state_dict(state, state_dict)
    run.accumulator = _Accumulator(meta.get("log_sums"), meta.get("log_count", 0))
    run.best_nme = float(meta.get("best_nme", math.inf))
  start_step = run.step = int(state.step)
  if is_primary:
    # Records after the checkpoint are re-logged by the resumed run (a fresh run drops all).
    logging_utils.truncate_metrics(workdir, start_step if start_step > 0 else -1)
  run.writer = logging_utils.create_writer(workdir, enabled=is_primary)
  logging.info("%s", parallel.describe_devices())
  logging.info("train examples %d, global batch %d (%d per device), %d steps per epoch, "
               "%d steps in all; %s at step %d", train_size, global_batch,
               parallel.per_device_batch_size(global_batch), epoch_steps, num_steps,
               "resuming" if start_step else "starting", start_step)
  try:
    return _loop(run, state, start_step, should_stop or (lambda: False))
  finally:
    run.checkpoints.close()
    if run.best is not None:
      run.best.close()
    run.writer.close()


def _loop(run: _Run, state: TrainState, start_step: int, should_stop: Callable[[], bool]
          ) -> TrainResult:
  """Steps from `start_step` to the end; logging, validation and checkpoints as CLU periodic
  actions. Each step's metrics are read back while the next step runs."""
  from clu import periodic_actions
  from star_jax.training import logging_utils
  config, num_steps = run.config, run.num_steps
  train_iter = iter(run.data.train_batches(start_step=start_step,
                                           process_index=jax.process_index(),
                                           process_count=jax.process_count()))
  run.state_r = parallel.replicate(state)
  del state
  if start_step == 0:
    run.validate(0)  # the untrained network's NME, the reference the run improves on
  bar = logging_utils.progress_bar(num_steps, start_step, enabled=run.is_primary)
  every = lambda value, fn: periodic_actions.PeriodicCallback(
      every_steps=value, on_steps=[num_steps], callback_fn=fn, pass_step_and_time=False)
  # In this order: a step's log record, then its validation, then its checkpoint (which stores
  # the best NME so far).
  log = every(max(int(config.log_every_steps), 1), lambda: run.log(bar))
  validate = every(_cadence(config.eval_every_steps, run.epoch_steps), run.validate)
  save = every(_cadence(config.checkpoint_every_steps, run.epoch_steps), run.save)
  stopped = False
  parallel.sync_processes("first_step")
  try:
    for step in range(start_step, num_steps):
      batch = next(train_iter)
      run.state_r, metrics = run.p_train_step(run.state_r, parallel.shard(batch))
      run.check_pending()  # the previous step: overlaps with the one just dispatched
      run.step, run.pending = step + 1, (step + 1, batch, metrics)
      run.window_steps += 1
      bar.update(1)
      log(run.step)
      validate(run.step)
      saved = save(run.step)
      if should_stop() and run.step < num_steps:
        if not saved:
          run.save()
        stopped = True
        logging.info("stop requested: checkpoint saved at step %d; run the same command to "
                     "resume", run.step)
        break
  finally:
    bar.close()
  run.check_pending()
  return TrainResult(parallel.unreplicate(run.state_r), run.step, stopped)
