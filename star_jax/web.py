"""`python -m star_jax.web`: the in-browser demo, served locally.

The command's name only; its arguments are star_jax.commands.web.
"""

from star_jax.commands.web import main

if __name__ == "__main__":
  raise SystemExit(main())
