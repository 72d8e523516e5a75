"""`python -m star_jax.data.embedded`: generates the embedded synthetic dataset
(star_jax.data.embedded) and an optional preview grid.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

from star_jax.commands import cli
from star_jax.data.embedded import (DEFAULT_COUNTS, DEFAULT_SEED, ensure_embedded_dataset,
                                    write_preview)


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.ArgumentParser(
      prog="python -m star_jax.data.embedded",
      description="Generates the embedded synthetic WFLW-style dataset (cached).")
  parser.add_argument("--out", default=None,
                      help="dataset folder (default: $STAR_JAX_CACHE/embedded or "
                           "~/.cache/star_jax/embedded)")
  parser.add_argument("--counts", type=int, nargs=3, default=list(DEFAULT_COUNTS),
                      metavar=("TRAIN", "VAL", "TEST"))
  parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
  parser.add_argument("--preview", default=None, metavar="PNG",
                      help="also write a grid of annotated training samples here")
  parser.add_argument("--preview-count", type=int, default=16)
  args = parser.parse_args(argv)
  start = time.perf_counter()
  files = ensure_embedded_dataset(args.out, counts=tuple(args.counts), seed=args.seed)
  print(f"embedded dataset ready in {time.perf_counter() - start:.1f} s")
  for field in dataclasses.fields(files):
    print(f"  {field.name}: {getattr(files, field.name)}")
  if args.preview:
    write_preview(files, args.preview, count=args.preview_count)
    print(f"  preview: {args.preview}")
