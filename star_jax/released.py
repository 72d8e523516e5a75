"""`python -m star_jax.released`: the released official models (list, download, register).

The command's name only; its arguments are star_jax.commands.released.
"""

from star_jax.commands.released import main

if __name__ == "__main__":
  raise SystemExit(main())
