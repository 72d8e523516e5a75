"""`python -m star_jax.convert`: an official STAR .pkl to a star-jax checkpoint.

The command's name only; its arguments are star_jax.commands.convert.
"""

from star_jax.commands.convert import main

if __name__ == "__main__":
  raise SystemExit(main())
