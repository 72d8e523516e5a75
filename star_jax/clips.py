"""`python -m star_jax.clips`: a synthetic clip for the demo.

The command's name only; its arguments are star_jax.commands.clips.
"""

from star_jax.commands.clips import main

if __name__ == "__main__":
  raise SystemExit(main())
