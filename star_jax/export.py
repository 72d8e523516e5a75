"""`python -m star_jax.export`: a trained model to ONNX, TFLite, SavedModel or StableHLO.

The command's name only; its arguments are star_jax.commands.export.
"""

from star_jax.commands.export import main

if __name__ == "__main__":
  raise SystemExit(main())
