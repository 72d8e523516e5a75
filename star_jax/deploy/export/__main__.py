"""`python -m star_jax.export`: see `star_jax.deploy.export.cli`."""

import sys

from star_jax.deploy.export.cli import main

if __name__ == "__main__":
  sys.exit(main())
