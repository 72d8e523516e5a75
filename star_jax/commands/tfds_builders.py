"""`python -m star_jax.data.tfds_builders DATASET --manual_dir DIR`: builds a star-jax TFDS
dataset (star_jax.data.tfds_builders).
"""

from __future__ import annotations

import os
from typing import Sequence

import tensorflow_datasets as tfds

from star_jax.commands import cli
from star_jax.errors import DataError, UsageError
from star_jax.data.tfds_builders import BUILDERS, _CONFIGS, builder_for


def _main(argv: Sequence[str] | None = None) -> int:
  parser = cli.ArgumentParser(prog="python -m star_jax.data.tfds_builders",
                                   description="Builds a star-jax TFDS dataset from a manual dir "
                                               "(train.tsv, test.tsv, optional val.tsv, images/).")
  parser.add_argument("dataset", choices=sorted(BUILDERS))
  parser.add_argument("--manual_dir", "--manual-dir", required=True,
                      help="folder with train.tsv, test.tsv (val.tsv) and images/")
  parser.add_argument("--data_dir", "--data-dir", default=None,
                      help="TFDS data_dir (default: $TFDS_DATA_DIR, else ~/tensorflow_datasets); "
                           "training reads it as --config.data.tfds_data_dir")
  parser.add_argument("--config", default="jpeg", choices=[c.name for c in _CONFIGS])
  args = parser.parse_args(argv)
  if not os.path.isdir(args.manual_dir):
    raise UsageError(f"--manual_dir {args.manual_dir}: no such directory")
  for required in ("train.tsv", "test.tsv"):
    if not os.path.isfile(os.path.join(args.manual_dir, required)):
      raise DataError(f"{os.path.join(args.manual_dir, required)} is missing; the manual dir "
                      "needs train.tsv and test.tsv (val.tsv optional) and the images under "
                      "images/ (README, 'TFDS')")
  builder = builder_for(args.dataset, data_dir=args.data_dir, config=args.config)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=args.manual_dir))
  for name, info in builder.info.splits.items():
    print(f"{builder.name}/{args.config} {name}: {info.num_examples} examples")
  print(f"written to {builder.data_dir}")
  return 0


main = cli.main_wrapper(_main)
