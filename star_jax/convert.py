"""`python -m star_jax.convert OFFICIAL.pkl --out DIR [--ema]`: an official checkpoint as a
star-jax inference checkpoint directory, which evaluation, prediction and export read.

The official file is read as data by `star_jax.official` (through `checkpointing.load_model`,
the loader every command shares); the directory holds the model description, the landmark
scheme (a built-in dataset when the E2H edges match one) and the weights.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from star_jax import checkpointing
from star_jax import cli
from star_jax.errors import UsageError


def convert(checkpoint: str, out_dir: str, *, ema: bool = False) -> checkpointing.LoadedModel:
  """Reads `checkpoint` (`"net"`, or `"net_ema"` with `ema`) and writes it to `out_dir`."""
  if not checkpointing.is_official_checkpoint(checkpoint):
    raise UsageError(f"{checkpoint}: not an official STAR checkpoint file "
                     f"({', '.join(checkpointing.OFFICIAL_SUFFIXES)})")
  loaded = checkpointing.load_model(checkpoint, weights="ema" if ema else "default")
  checkpointing.save_for_inference(
      out_dir, loaded.model, loaded.variables, spec=loaded.spec, image_size=loaded.image_size,
      extra={"converted_from": os.path.abspath(checkpoint), "weights": loaded.weights},
      trained_on=loaded.trained_on)
  return loaded


def _check_out_dir(out_dir: str) -> None:
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise UsageError(f"--out {out_dir}: exists and is not a directory")
  parent = os.path.dirname(os.path.abspath(out_dir))
  if os.path.isdir(parent) and not os.access(parent, os.W_OK):
    raise UsageError(f"--out {out_dir}: {parent} is not writable")


def _main(argv: Sequence[str] | None) -> int:
  parser = cli.ArgumentParser(
      prog="python -m star_jax.convert",
      description="Convert an official STAR (PyTorch) checkpoint into a star-jax checkpoint.")
  parser.add_argument("checkpoint", help="official .pkl (torch.save zip) file")
  parser.add_argument("--out", required=True, help="output checkpoint directory")
  parser.add_argument("--ema", action="store_true",
                      help="convert 'net_ema' instead of 'net' (the official tester uses 'net')")
  args = parser.parse_args(argv)
  _check_out_dir(args.out)
  from star_jax import host
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
