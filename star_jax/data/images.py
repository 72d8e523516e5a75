"""Image decoding in tf.data: JPEG through TensorFlow (whole or a window), other formats through
OpenCV/Pillow.

All decoders return uint8 RGB `(H, W, 3)`. JPEGs decode with libjpeg's accurate integer DCT and
fancy upsampling, which is bit-identical to `cv2.imread` (what the official loader uses). Decoding
only a window of a JPEG (`tf.image.decode_and_crop_jpeg`) is bit-identical to decoding the whole
image and slicing, except in a window's first and last column where the window does not touch
the image border (chroma upsampling there lacks its neighbour): callers keep a margin.

Known difference: `cv2.imread` applies a JPEG's EXIF orientation tag, TensorFlow does not. The
public face datasets (WFLW, 300W, COFW) carry no rotating orientation tags.
"""

from __future__ import annotations

import io

import numpy as np
import tensorflow as tf

from star_jax.deploy import image_io

JPEG_DCT_METHOD = "INTEGER_ACCURATE"
_JPEG_MAGIC = b"\xff\xd8\xff"


def _as_bytes(value) -> bytes:
  """A scalar string handed over by tf.numpy_function (bytes or a 0-d object array)."""
  if isinstance(value, np.ndarray):
    value = value.item()
  return bytes(value)


def is_jpeg_tensor(data: tf.Tensor) -> tf.Tensor:
  """Whether encoded bytes (a scalar string tensor) start with the JPEG magic number."""
  return tf.equal(tf.strings.substr(data, 0, 3), _JPEG_MAGIC)


def decode_bytes_numpy(data: bytes) -> np.ndarray:
  """Any image OpenCV or Pillow reads (JPEG, PNG, BMP, PPM/PGM, TIFF, WebP, GIF...) -> RGB uint8."""
  return image_io.decode_image(data)


def read_image(path: str) -> np.ndarray:
  """Decodes the file at `path` to RGB uint8 (used outside tf.data, e.g. for visualisation)."""
  try:
    return image_io.load_image(path)
  except image_io.ImageError as e:
    raise ValueError(str(e)) from None


def image_size_numpy(data: bytes) -> np.ndarray:
  """(height, width) int32 of encoded bytes, reading only the header where Pillow can."""
  from PIL import Image
  try:
    with Image.open(io.BytesIO(data)) as pil:
      w, h = pil.size
      return np.asarray([h, w], np.int32)
  except Exception:
    return np.asarray(decode_bytes_numpy(data).shape[:2], np.int32)


def image_size_file(path: str) -> np.ndarray:
  """(height, width) int32 of the image file at `path`, reading only its header where Pillow
  can (as `image_size_numpy` of the file's bytes, without reading the whole file)."""
  from PIL import Image
  try:
    with Image.open(path) as pil:
      w, h = pil.size
      return np.asarray([h, w], np.int32)
  except Exception:
    with open(path, "rb") as f:
      return image_size_numpy(f.read())


def image_size_tensor(data: tf.Tensor) -> tf.Tensor:
  """(height, width) int32 of encoded bytes, in the graph for JPEG."""
  def jpeg():
    return tf.cast(tf.image.extract_jpeg_shape(data)[:2], tf.int32)

  def other():
    hw = tf.numpy_function(lambda d: image_size_numpy(_as_bytes(d)), [data], tf.int32,
                           stateful=False)
    return tf.ensure_shape(hw, [2])
  return tf.cond(is_jpeg_tensor(data), jpeg, other)


def decode_tensor(data: tf.Tensor) -> tf.Tensor:
  """Encoded bytes -> the whole image, uint8 RGB (H, W, 3)."""
  def jpeg():
    return tf.image.decode_jpeg(data, channels=3, dct_method=JPEG_DCT_METHOD)

  def other():
    image = tf.numpy_function(lambda d: decode_bytes_numpy(_as_bytes(d)), [data], tf.uint8,
                              stateful=False)
    return tf.ensure_shape(image, [None, None, 3])
  return tf.cond(is_jpeg_tensor(data), jpeg, other)


def decode_window_tensor(data: tf.Tensor, window: tf.Tensor, *,
                         dct_method: str = JPEG_DCT_METHOD) -> tf.Tensor:
  """Encoded bytes -> the pixels `window = (y, x, h, w)` of the image (inside it), uint8 RGB.

  `dct_method` is libjpeg's inverse DCT for JPEGs: the default matches `cv2.imread`; ""
  is TensorFlow's own default (the integer fast one), which TFDS's image decoder uses.
  """
  def jpeg():
    return tf.image.decode_and_crop_jpeg(data, window, channels=3, dct_method=dct_method)

  def other():
    def crop(d, win):
      y, x, h, w = (int(v) for v in win)
      return np.ascontiguousarray(decode_bytes_numpy(_as_bytes(d))[y:y + h, x:x + w])
    image = tf.numpy_function(crop, [data, window], tf.uint8, stateful=False)
    return tf.ensure_shape(image, [None, None, 3])
  return tf.cond(is_jpeg_tensor(data), jpeg, other)
