"""`python -m star_jax.convert OFFICIAL.pkl --out DIR [--ema]`: an official checkpoint as a
star-jax inference checkpoint directory, which evaluation, prediction and export read.

The official file is read as data by `star_jax.foreign.official` (through
`model_store.load_model`,
the loader every command shares); the directory holds the model description, the landmark
scheme (a built-in dataset when the E2H edges match one) and the weights. --out is replaced as
a whole, so it must be new, empty, or a folder this command wrote (`check_out_dir`).
"""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Sequence

from star_jax.commands import cli
from star_jax.core import outputs
from star_jax.errors import DataError, UsageError

if TYPE_CHECKING:  # imported where used: the inference-only install lacks JAX and orbax
  from star_jax.training import model_store


def convert(checkpoint: str, out_dir: str, *, ema: bool = False) -> model_store.LoadedModel:
  """Reads `checkpoint` (`"net"`, or `"net_ema"` with `ema`) and writes it to `out_dir`."""
  from star_jax.training import model_store
  if not os.path.exists(checkpoint):
    raise DataError(f"{checkpoint}: no such file")
  check_out_dir(checkpoint, out_dir)
  if not model_store.is_official_checkpoint(checkpoint):
    raise UsageError(f"{checkpoint}: not an official STAR checkpoint file "
                     f"({', '.join(model_store.OFFICIAL_SUFFIXES)})")
  loaded = model_store.load_model(checkpoint, weights="ema" if ema else "default")
  model_store.save_for_inference(
      out_dir, loaded.model, loaded.variables, spec=loaded.spec, image_size=loaded.image_size,
      extra={"converted_from": os.path.abspath(checkpoint), "weights": loaded.weights},
      trained_on=loaded.trained_on)
  return loaded


def _converted_here(path: str) -> bool:
  """Whether `path` is a checkpoint folder this command wrote (its model record says what it
  was converted from): the only folder `convert` replaces, besides an empty one."""
  from star_jax.training import model_store
  model_dir = os.path.join(path, model_store.MODEL_ITEM)
  if not os.path.isdir(model_dir) or not os.path.isdir(
      os.path.join(path, model_store.VARIABLES_ITEM)):
    return False
  for name in os.listdir(model_dir):
    try:
      with open(os.path.join(model_dir, name), encoding="utf-8") as f:
        record = json.load(f)
    except (OSError, ValueError):
      continue
    if isinstance(record, dict) and "converted_from" in (record.get("extra") or {}):
      return True
  return False


def check_out_dir(checkpoint: str, out_dir: str) -> None:
  """Refuses, before any work, an --out that is or holds the input, that is a file or a folder
  `convert` did not write (it is replaced as a whole), or that cannot be written."""
  outputs.check_outputs("--out", [out_dir], inputs=[checkpoint], is_own=_converted_here)
  outputs.check_folder("--out", out_dir)


def _main(argv: Sequence[str] | None) -> int:
  parser = cli.ArgumentParser(
      prog="python -m star_jax.convert",
      description="Convert an official STAR (PyTorch) checkpoint into a star-jax checkpoint.")
  parser.add_argument("checkpoint", help="official .pkl (torch.save zip) file")
  parser.add_argument("--out", required=True, help="output checkpoint directory")
  parser.add_argument("--ema", action="store_true",
                      help="convert 'net_ema' instead of 'net' (the official tester uses 'net')")
  args = parser.parse_args(argv)
  cli.require_training_install("python -m star_jax.convert")
  check_out_dir(args.checkpoint, args.out)
  from star_jax.commands import host
  host.configure_process()
  loaded = convert(args.checkpoint, args.out, ema=args.ema)
  model = loaded.model
  print(f"converted {args.checkpoint} ({loaded.weights}) -> {os.path.abspath(args.out)}: "
        f"scheme={loaded.spec.name}, stacks={model.num_stacks}, levels={model.num_levels}, "
        f"channels={model.channels}, points={loaded.num_points}, edges={loaded.spec.num_edges}")
  return 0


main = cli.main_wrapper(_main)


if __name__ == "__main__":
  sys.exit(main())
