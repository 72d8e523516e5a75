"""star-jax: STAR loss facial landmark detection (Zhou et al., CVPR 2023) in JAX/Flax."""

__version__ = "0.1.0"
