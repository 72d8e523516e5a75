"""star-jax: STAR loss facial landmark detection (Zhou et al., CVPR 2023) in JAX/Flax.

    from star_jax import Predictor
    faces = Predictor("runs/wflw").predict("photo.jpg")     # list of (N, 2) arrays, pixels

The names below are loaded on first use (module `__getattr__`), so `import star_jax` imports
neither JAX nor TensorFlow; `Predictor` loads JAX only when it opens a checkpoint, and
`RuntimePredictor` (exported models) never does.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> the module that owns it.
_LAZY = {
    "Predictor": "star_jax.deploy.inference",
    "Face": "star_jax.deploy.inference",
    "RuntimePredictor": "star_jax.deploy.runtime",
    "UsageError": "star_jax.errors",
    "DataError": "star_jax.errors",
    "CheckpointError": "star_jax.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
  module = _LAZY.get(name)
  if module is None:
    raise AttributeError(f"module 'star_jax' has no attribute {name!r}")
  value = getattr(importlib.import_module(module), name)
  globals()[name] = value  # later look-ups skip this function
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_LAZY))
