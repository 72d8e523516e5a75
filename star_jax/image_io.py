"""Reading user images for inference: any format OpenCV or Pillow decodes, as RGB uint8.

Kept free of TensorFlow so that prediction starts quickly.
"""

from __future__ import annotations

import io
import os

import cv2
import numpy as np

from star_jax.errors import DataError


class ImageError(DataError):
  """An input image that could not be used; the message names the file and why."""


def decode_image(data: bytes) -> np.ndarray:
  """Encoded bytes of any format OpenCV or Pillow reads -> RGB uint8 `(H, W, 3)`.

  OpenCV first (JPEG, PNG, PPM/PGM/PBM, BMP, TIFF, WebP, ...; EXIF orientation applied, as the
  official `cv2.imread` does), then Pillow (GIF and others: first frame). Gray, palette, 16-bit
  and alpha images become 8-bit RGB. Raises ValueError when neither can decode the bytes.
  """
  buf = np.frombuffer(data, np.uint8)
  image = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
  if image is not None:
    return np.ascontiguousarray(image[..., ::-1])
  try:
    from PIL import Image, ImageOps
    with Image.open(io.BytesIO(data)) as pil:
      pil = ImageOps.exif_transpose(pil)
      return np.asarray(pil.convert("RGB"), np.uint8).copy()
  except Exception as e:  # Pillow raises many exception types for undecodable data
    reason = "empty file" if not buf.size else f"{type(e).__name__}: {e}"
    raise ValueError(f"not a readable image ({reason})") from None


def load_image(path: str) -> np.ndarray:
  """Reads an image file -> RGB uint8 `(H, W, 3)` (see `decode_image`).

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
    return decode_image(data)
  except ValueError as e:
    raise ImageError(f"{path}: {e}") from None
