"""The learning-rate schedule, the optimiser and the EMA against the official formulas.

References are written independently here: torch's MultiStepLR stepped once per epoch (as the
official trainer does), torch's Adam update with L2 weight decay, and the official
`accumulate_net` EMA.
"""

import bisect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from star_jax.training import train_lib


def _torch_multistep_lrs(lr0, milestones, gamma, num_epochs, steps_per_epoch):
  """Per-step learning rates of the official loop: train an epoch, then scheduler.step()."""
  lrs = []
  lr = lr0
  last_epoch = 0
  for _ in range(num_epochs):
    lrs += [lr] * steps_per_epoch
    last_epoch += 1  # scheduler.step(): multiply by gamma when the new epoch is a milestone
    lr = lr * gamma ** list(milestones).count(last_epoch)
  return np.asarray(lrs)


@pytest.mark.parametrize("milestones,epochs,spe", [
    ((200, 350, 450), 500, 3),   # the official recipe (steps per epoch shrunk)
    ((2, 2, 5), 7, 4),           # a repeated milestone multiplies twice (torch Counter semantics)
    ((1,), 3, 1),
])
def test_lr_schedule_matches_torch_multisteplr(milestones, epochs, spe):
  config = base.get_base_config("wflw")
  config.optim.milestones = milestones
  schedule = train_lib.lr_schedule(config, spe)
  expected = _torch_multistep_lrs(1e-3, milestones, 0.1, epochs, spe)
  got = np.asarray([schedule(k) for k in range(epochs * spe)])
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  # Closed form of the same rule: epoch e uses lr * gamma ** #{m <= e}.
  closed = [1e-3 * 0.1 ** bisect.bisect_right(sorted(milestones), k // spe)
            for k in range(epochs * spe)]
  np.testing.assert_allclose(got, closed, rtol=1e-6)


def test_steps_and_override():
  config = base.get_base_config("wflw")
  # WFLW train: 7500 images at global batch 128 -> 58 full batches (drop remainder).
  assert train_lib.steps_per_epoch(7500, 128) == 58
  assert train_lib.total_train_steps(config, 58) == 500 * 58
  config.num_train_steps = 1234
  assert train_lib.total_train_steps(config, 58) == 1234
  with pytest.raises(ValueError, match="batch_size"):
    train_lib.steps_per_epoch(100, 128)
  # With the validation split as the official full training set: 7500 // 128 = 58 steps per
  # epoch; the default 5 % carve leaves 7125 images, 55 steps.
  assert train_lib.steps_per_epoch(7500 - round(7500 * 0.05), 128) == 55


def test_stack_weights():
  assert train_lib.stack_weights(4) == [1 / 8, 2 / 8, 4 / 8, 1.0]
  assert train_lib.stack_weights(1) == [1.0]


def _torch_adam(params, grads_seq, lrs, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0):
  """torch.optim.Adam (amsgrad=False), written from its documented update rule."""
  p = params.astype(np.float64)
  m = np.zeros_like(p)
  v = np.zeros_like(p)
  for t, (g, lr) in enumerate(zip(grads_seq, lrs), start=1):
    g = g + weight_decay * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1 ** t)
    v_hat = v / (1 - b2 ** t)
    p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
  return p


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_optimizer_is_torch_adam_with_l2(weight_decay):
  config = base.get_base_config("wflw")
  config.optim.milestones = (1,)
  config.optim.weight_decay = weight_decay
  spe = 3
  tx = train_lib.make_optimizer(config, spe)
  rng = np.random.default_rng(0)
  p0 = rng.normal(size=(5,)).astype(np.float32)
  grads = [rng.normal(size=(5,)).astype(np.float32) for _ in range(6)]
  params = jnp.asarray(p0)
  opt_state = tx.init(params)
  for g in grads:
    updates, opt_state = tx.update(jnp.asarray(g), opt_state, params)
    params = params + updates
  lrs = [1e-3] * spe + [1e-4] * spe
  expected = _torch_adam(p0, grads, lrs, weight_decay=weight_decay)
  np.testing.assert_allclose(np.asarray(params), expected, rtol=1e-5, atol=1e-7)


def test_ema_decay_formula():
  config = base.get_base_config("wflw")
  assert train_lib.ema_decay(config) == pytest.approx(0.5 ** (128 / 10000.0))
  config.batch_size = 16
  config.ema.half_life_examples = 2000.0
  assert train_lib.ema_decay(config) == pytest.approx(0.5 ** (16 / 2000.0))
  config.ema.enabled = False
  assert train_lib.ema_decay(config) == 0.0


def test_ema_update_is_official_accumulate():
  rng = np.random.default_rng(1)
  ema = {"w": rng.normal(size=(3, 2)).astype(np.float32),
         "b": rng.normal(size=(4,)).astype(np.float64)}
  new = {"w": rng.normal(size=(3, 2)).astype(np.float32),
         "b": rng.normal(size=(4,)).astype(np.float64)}
  d = 0.5 ** (128 / 10000.0)
  out = jax.jit(lambda e, n: train_lib.ema_update(e, n, d))(ema, new)
  # The official accumulate_net: model1 = model1 * decay + model2 * (1 - decay).
  np.testing.assert_allclose(out["w"], ema["w"] * d + new["w"] * (1 - d), rtol=1e-6)
  assert out["w"].dtype == np.float32
  chex.assert_trees_all_close(train_lib.ema_update(new, new, d), new)


def test_train_step_applies_the_ema_to_parameters_and_batch_statistics():
  """One `train_step` of a tiny network: the new EMA is d * old EMA + (1 - d) * new weights,
  for the parameters and the BatchNorm statistics alike, with the EMA starting as a copy."""
  import functools
  from star_jax.core import schemes as datasets
  from star_jax import models
  from star_jax.training import parallel
  config = base.get_base_config("wflw")
  config.model.num_stacks, config.model.num_levels, config.model.channels = 1, 1, 8
  spec = datasets.get_spec("wflw")
  model = models.create_model(config.model, spec, bn_axis_name=parallel.AXIS_NAME)
  variables = models.init_variables(models.create_model(config.model, spec), 0, 32)
  tx = train_lib.make_optimizer(config, 10)
  state = train_lib.create_train_state(variables, tx)
  chex.assert_trees_all_equal(state.ema_params, state.params)
  # Make the EMA differ from the weights, so that the update's two inputs can be told apart.
  state = state.replace(ema_params=jax.tree.map(lambda x: x + 0.5, state.params),
                        ema_batch_stats=jax.tree.map(lambda x: x + 0.25, state.batch_stats))
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(-1, 1, (1, 2, 32, 32, 3)).astype(np.float32),
           "landmarks": rng.uniform(-0.8, 0.8, (1, 2, 98, 2)).astype(np.float32),
           "pointmaps": rng.uniform(0, 1, (1, 2, 8, 8, 98)).astype(np.float32),
           "edgemaps": rng.uniform(0, 1, (1, 2, 8, 8, 9)).astype(np.float32)}
  d = 0.9
  step = jax.pmap(functools.partial(train_lib.train_step, model=model, tx=tx, decay=d,
                                    loss_fn=functools.partial(train_lib.compute_loss, config)),
                  axis_name=parallel.AXIS_NAME)
  new, _ = step(jax.tree.map(lambda x: np.asarray(x)[None], state), batch)
  new = jax.tree.map(lambda x: np.asarray(x)[0], new)
  assert not np.allclose(new.params["heatmap_head0"]["kernel"],
                         state.params["heatmap_head0"]["kernel"])
  for ema_old, fresh, ema_new in ((state.ema_params, new.params, new.ema_params),
                                  (state.ema_batch_stats, new.batch_stats,
                                   new.ema_batch_stats)):
    expected = jax.tree.map(lambda e, n: d * e + (1 - d) * n, ema_old, fresh)
    chex.assert_trees_all_close(ema_new, expected, rtol=1e-5, atol=1e-6)


def test_best_model_rules():
  result = {"val_nme": 0.05, "val_nme_raw": 0.04}
  assert train_lib.best_candidate(result, "ema") == (0.05, "ema")
  assert train_lib.best_candidate(result, "better") == (0.04, "raw")
  assert train_lib.best_candidate({"val_nme": 0.03, "val_nme_raw": 0.04}, "better") == (
      0.03, "ema")
