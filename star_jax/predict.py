"""`python -m star_jax.predict`: landmarks on photos, folders, videos and cameras.

The command's name only; its arguments are star_jax.commands.predict.
"""

from star_jax.commands.predict import main

if __name__ == "__main__":
  raise SystemExit(main())
