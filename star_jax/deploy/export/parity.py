"""Running an export in its own engine, and the JAX references it is compared with.

`exported_landmarks(path, images)` runs any of the four formats (ONNX Runtime, LiteRT,
TensorFlow, `jax.export`); `jax_landmarks(...)` runs the JAX model in float32 (what
`star_jax.deploy.predict` computes) or float64 (the network's exact value, up to float64 rounding).

Why a float64 reference: every stack after the first switches CoordConv boundary channels on
where the previous stack's heatmap exceeds 0.05 (strictly). Two correct float32
implementations round differently, and a pixel within ~1e-5 of 0.05 can fall on either side;
the next stack then moves a little. On the random-weight official fixture this makes jitted
JAX float32 itself differ from float64 by up to ~3 px, while the ONNX graph stays within 0.02
px of float64: comparing two float32 implementations with each other measures which side of
the switch each one's rounding lands on, not whether an export is right. The parity tests
therefore compare every export with the float64 model, and report the float32 JAX model's own
distance to it (the float32 noise floor of that model) beside it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from star_jax.deploy.runtime import contract


def exported_landmarks(path: str, images: np.ndarray, *, threads: int | None = None
                       ) -> np.ndarray:
  """`(B, S, S, 3)` 0-255 images -> `(B, N, 2)` crop pixels from the export at `path`."""
  images = np.asarray(images, np.float32)
  fmt = contract.read_sidecar(path).format
  if fmt in contract.RUNTIME_FORMATS:
    from star_jax.deploy.runtime import backends
    return backends.load_model(path, threads=threads)(images)
  if fmt == "savedmodel":
    import tensorflow as tf
    serve = tf.saved_model.load(path).signatures["serving_default"]
    out = serve(**{contract.INPUT_NAME: tf.constant(images)})[contract.LANDMARKS_NAME]
    return out.numpy()
  if fmt == "stablehlo":
    from jax import export
    with open(path, "rb") as f:
      exported = export.deserialize(bytearray(f.read()))
    return np.asarray(exported.call(images)[0])
  raise ValueError(f"unknown format {fmt!r} in {contract.sidecar_path(path)}")


def jax_landmarks(model: Any, variables: Any, images: np.ndarray, image_size: int, *,
                  float64: bool = False) -> np.ndarray:
  """The JAX model's landmarks in crop pixels for 0-255 images (the export contract).

  float32: the evaluation path (`eval_lib.normalize_crops`, the jitted network,
  `transforms.denormalize_landmarks`). float64: the same network and weights in float64.
  """
  import jax
  import jax.numpy as jnp
  from star_jax.training import eval_lib
  from star_jax.data import transforms
  from star_jax.deploy.export.exporter import inference_model
  if not float64:
    model32 = inference_model(model, "float32")
    normalised = eval_lib.normalize_crops(images)
    landmarks = eval_lib.make_landmark_fn(model32)(variables, normalised)
    return transforms.denormalize_landmarks(np.asarray(landmarks), image_size)
  with jax.enable_x64(True):
    model64 = inference_model(model, "float64")
    wide = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), variables)
    x = np.asarray(images, np.float64) / 255.0 * 2.0 - 1.0
    out = jax.jit(lambda v, x: model64.apply(v, x, train=False).landmarks[-1])(wide, x)
    return (np.asarray(out, np.float64) + 1) * image_size / 2 - 0.5


def difference(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
  """Mean and max Euclidean distance (pixels) between two `(B, N, 2)` landmark sets."""
  d = np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64), axis=-1)
  return {"mean_px": float(d.mean()), "max_px": float(d.max())}


def random_crops(count: int, image_size: int, seed: int = 0) -> np.ndarray:
  """Uniform 0-255 float32 crops (random input for checks without data)."""
  return np.random.default_rng(seed).uniform(0, 255, (count, image_size, image_size, 3)
                                             ).astype(np.float32)

