"""`python -m star_jax.export`: see `star_jax.export.cli`."""

import sys

from star_jax.export.cli import main

if __name__ == "__main__":
  sys.exit(main())
