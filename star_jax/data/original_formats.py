"""`python -m star_jax.data.original_formats`: the original annotation files -> star-jax TSVs.

The command's name only; its arguments are star_jax.commands.original_formats, the readers
star_jax.foreign.original_formats.
"""

from star_jax.commands.original_formats import main

if __name__ == "__main__":
  raise SystemExit(main())
