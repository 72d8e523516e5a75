"""`python -m star_jax.convert OFFICIAL.pkl --out DIR [--ema]`: an official checkpoint as a
star-jax inference checkpoint directory (`star_jax.checkpointing.save_for_inference`), which
evaluation and prediction read. The reading itself is `star_jax.official`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Mapping

import jax.numpy as jnp

from star_jax import datasets
from star_jax.errors import CheckpointError
from star_jax.models.hourglass import StackedHourglass
from star_jax.official import load_official_checkpoint


def model_config_from_model(model: StackedHourglass) -> dict[str, Any]:
  """JSON-ready fields that rebuild `model` with `model_from_config(...)`."""
  return {
      "num_stacks": model.num_stacks,
      "num_levels": model.num_levels,
      "channels": model.channels,
      "num_points": model.num_points,
      "edge_points": [list(points) for points in model.edge_points],
      "use_aam": model.use_aam,
      "dtype": jnp.dtype(model.dtype).name,
      "keep_unused_skip": model.keep_unused_skip,
      "precision": model.precision,
  }


def model_from_config(fields: Mapping[str, Any]) -> StackedHourglass:
  """Inverse of `model_config_from_model`."""
  return StackedHourglass(
      num_stacks=int(fields["num_stacks"]), num_levels=int(fields["num_levels"]),
      channels=int(fields["channels"]), num_points=int(fields["num_points"]),
      edge_points=tuple(tuple(int(p) for p in e) for e in fields["edge_points"]),
      use_aam=bool(fields["use_aam"]), dtype=jnp.dtype(fields.get("dtype", "float32")),
      keep_unused_skip=bool(fields.get("keep_unused_skip", True)),
      precision=fields.get("precision"))


def dataset_of_model(model: StackedHourglass) -> str | None:
  """The known dataset whose points and edges the model uses, if any."""
  for spec in datasets.SPECS.values():
    if (spec.num_points == model.num_points
        and (not model.use_aam
             or tuple(tuple(e.points) for e in spec.edges) == tuple(model.edge_points))):
      return spec.name
  return None


def config_for_model(model: StackedHourglass):
  """The base config of the model's dataset with `config.model` set from the model."""
  from configs import base  # configs/ ships with the package

  config = base.get_base_config(dataset_of_model(model) or "custom")
  config.model.num_stacks = model.num_stacks
  config.model.num_levels = model.num_levels
  config.model.channels = model.channels
  config.model.use_aam = model.use_aam
  config.model.dtype = jnp.dtype(model.dtype).name
  return config


def write_converted(out_dir: str, model: StackedHourglass, variables: Mapping[str, Any]) -> str:
  """Writes an inference checkpoint directory that `checkpointing.load_for_inference` reads."""
  from star_jax import checkpointing

  return checkpointing.save_for_inference(out_dir, model, variables, config_for_model(model))


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m star_jax.convert",
      description="Convert an official STAR (PyTorch) checkpoint into a star-jax checkpoint.")
  parser.add_argument("checkpoint", help="official .pkl (torch.save zip) file")
  parser.add_argument("--out", required=True, help="output checkpoint directory")
  parser.add_argument("--ema", action="store_true",
                      help="convert 'net_ema' instead of 'net' (the official tester uses 'net')")
  args = parser.parse_args(argv)
  try:
    model, variables = load_official_checkpoint(args.checkpoint, ema=args.ema)
  except CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  out_dir = write_converted(args.out, model, variables)
  fields = model_config_from_model(model)
  print(f"converted {args.checkpoint} ({'net_ema' if args.ema else 'net'}) -> {out_dir}: dataset={dataset_of_model(model) or 'custom'}, "
        f"stacks={fields['num_stacks']}, levels={fields['num_levels']}, "
        f"channels={fields['channels']}, points={fields['num_points']}, "
        f"edges={len(fields['edge_points'])}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
