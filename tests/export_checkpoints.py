"""Small star-jax inference checkpoints for the export and runtime tests (random weights)."""

from __future__ import annotations

import numpy as np

from configs import demo
from star_jax.training import model_store
from star_jax.core import schemes as datasets
from star_jax.models import create_model, init_variables


def _randomise_batch_stats(variables, seed):
  """Running statistics away from (0, 1), so folding BatchNorm into convolutions is tested."""
  import jax
  rng = np.random.default_rng(seed)
  stats = jax.tree_util.tree_map_with_path(
      lambda path, a: (rng.uniform(-0.2, 0.2, a.shape) if path[-1].key == "mean"
                       else rng.uniform(0.5, 2.0, a.shape)).astype(np.float32),
      variables["batch_stats"])
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: (rng.uniform(0.7, 1.3, a.shape).astype(np.float32)
                       if path[-1].key == "scale" else np.asarray(a)), variables["params"])
  return {"params": params, "batch_stats": stats}


def save_star_jax_checkpoint(directory: str, *, num_stacks: int = 2, seed: int = 0) -> str:
  """An inference checkpoint of the demo architecture (random weights)."""
  config = demo.get_config()
  config.model.num_stacks = num_stacks
  model = create_model(config.model, datasets.get_spec(config.dataset))
  variables = _randomise_batch_stats(init_variables(model, seed, config.data.image_size), seed)
  return model_store.save_for_inference(directory, model, variables,
                                          spec=datasets.get_spec(config.dataset),
                                          image_size=config.data.image_size, config=config)
