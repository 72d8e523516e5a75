"""User images for inference, as RGB uint8: files of any format OpenCV or Pillow decodes, and
the pictures a Python caller hands the predictors (`as_rgb_image`).

Kept free of JAX and TensorFlow so that prediction starts quickly (the runtime shares it).
"""

from __future__ import annotations

import io
import os
import sys

import cv2
import numpy as np

from star_jax.errors import DataError, UsageError

COLOR_ORDERS = ("rgb", "bgr")


class ImageError(DataError):
  """An input image that could not be used; the message names the file and why."""


def decode_image(data: bytes, *, bgr: bool = False) -> np.ndarray:
  """Encoded bytes of any format OpenCV or Pillow reads -> RGB uint8 `(H, W, 3)`.

  OpenCV first (JPEG, PNG, PPM/PGM/PBM, BMP, TIFF, WebP, ...; EXIF orientation applied, as the
  official `cv2.imread` does), then Pillow (GIF and others: first frame). Gray, palette, 16-bit
  and alpha images become 8-bit RGB. Raises ValueError when neither can decode the bytes.
  `bgr=True` returns OpenCV's channel order instead, without the copy that reorders a whole
  photograph (for callers that only keep a small crop of it and reorder that).
  """
  buf = np.frombuffer(data, np.uint8)
  image = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
  if image is not None:
    return image if bgr else np.ascontiguousarray(image[..., ::-1])
  try:
    from PIL import Image, ImageOps
    with Image.open(io.BytesIO(data)) as pil:
      pil = ImageOps.exif_transpose(pil)
      rgb = np.asarray(pil.convert("RGB"), np.uint8)
      return np.ascontiguousarray(rgb[..., ::-1]) if bgr else rgb.copy()
  except Exception as e:  # Pillow raises many exception types for undecodable data
    reason = "empty file" if not buf.size else f"{type(e).__name__}: {e}"
    raise ValueError(f"not a readable image ({reason})") from None


def load_image(path: str, *, bgr: bool = False) -> np.ndarray:
  """Reads an image file -> RGB (or with `bgr`, BGR) uint8 `(H, W, 3)` (see `decode_image`).

  Raises `ImageError` naming the file when it is missing or undecodable.
  """
  if not os.path.exists(path):
    raise ImageError(f"{path}: no such file")
  if not os.path.isfile(path):
    raise ImageError(f"{path}: not a file")
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise ImageError(f"{path}: cannot be read ({e.strerror or e})") from None
  try:
    return decode_image(data, bgr=bgr)
  except ValueError as e:
    raise ImageError(f"{path}: {e}") from None


def _is_pil_image(image) -> bool:
  # Without importing Pillow: an object can only be a PIL image once PIL.Image is loaded.
  pil = sys.modules.get("PIL.Image")
  return pil is not None and isinstance(image, pil.Image)


def as_rgb_image(image, *, color: str = "rgb") -> np.ndarray:
  """A picture given to a predictor -> RGB uint8 `(H, W, 3)`.

  Accepts an `(H, W, 3)` array (RGB, or BGR as OpenCV reads it with `color="bgr"`), an
  `(H, W, 4)` one (alpha dropped), a grey `(H, W)` or `(H, W, 1)` array, a PIL image, or the
  path of an image file (str or `os.PathLike`, read by `load_image`). Arrays are uint8, or
  integers within 0-255. Anything else is a one-line `UsageError` saying what was given.
  """
  if color not in COLOR_ORDERS:
    raise UsageError(f"color={color!r}: use one of {', '.join(map(repr, COLOR_ORDERS))}")
  if isinstance(image, (str, os.PathLike)):
    if color != "rgb":
      raise UsageError(f"color={color!r} applies to arrays; the file {os.fspath(image)} is read "
                       "in its own colours")
    return load_image(os.fspath(image))
  if _is_pil_image(image):
    if color != "rgb":
      raise UsageError(f"color={color!r} applies to arrays; a PIL image is read in its own "
                       "colours")
    return np.asarray(image.convert("RGB"), np.uint8).copy()
  if isinstance(image, (bytes, bytearray)):
    raise UsageError("image: got bytes; give a path, an array or a PIL image (encoded bytes: "
                     "star_jax.deploy.image_io.decode_image)")
  try:
    array = np.asarray(image)
  except Exception:  # array-likes raise many exception types
    array = None
  if array is None or array.dtype == object or array.ndim == 0:
    given = (f"a 0-d {array.dtype} array" if isinstance(image, np.ndarray) and array is not None
             else type(image).__name__)
    raise UsageError(f"image: got {given}; give an (H, W, 3) RGB uint8 array, a "
                     "grey (H, W) array, a PIL image or a file path")
  shape = tuple(array.shape)
  if not (array.ndim == 2 or (array.ndim == 3 and shape[2] in (1, 3, 4))) or 0 in shape[:2]:
    raise UsageError(f"image: got an array of shape {shape}; give (H, W, 3) RGB, (H, W, 4) "
                     "RGBA, or grey (H, W) or (H, W, 1)")
  if array.dtype != np.uint8:
    if not np.issubdtype(array.dtype, np.integer):
      raise UsageError(f"image: got a {array.dtype} array; give uint8 values 0-255 (e.g. "
                       "(image * 255).round().astype(np.uint8) for floats in [0, 1])")
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > 255:
      raise UsageError(f"image: a {array.dtype} array with values {low}..{high}; give uint8 "
                       "values 0-255")
    array = array.astype(np.uint8)
  if array.ndim == 2:
    array = array[:, :, None]
  if array.shape[2] == 1:
    return np.ascontiguousarray(np.repeat(array, 3, axis=2))
  array = array[:, :, :3]
  if color == "bgr":
    array = array[:, :, ::-1]
  return np.ascontiguousarray(array)
