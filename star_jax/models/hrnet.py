"""HRNetV2-W18 for face alignment (HRNet/HRNet-Facial-Landmark-Detection) in flax.linen.

This module owns the architecture of the official face configuration
(`experiments/*/face_alignment_*_hrnet_w18.yaml`) and its inference rules:

- Stem: two 3x3 stride-2 convolutions (64 channels) with BatchNorm + ReLU, then four
  bottlenecks (64 -> 256 channels) at 1/4 resolution.
- Stages 2-4 (1, 4 and 3 modules of 2, 3 and 4 branches; widths 18, 36, 72, 144): per branch
  four basic blocks, then the fuse layers: branch j enters branch i through a 1x1 convolution +
  BatchNorm and bilinear upsampling (`align_corners=False`) when j > i, through i - j strided
  3x3 convolutions + BatchNorm (ReLU between them) when j < i; the sum goes through a ReLU.
  Transitions add each new branch with a 3x3 stride-2 convolution of the last one.
- Head: branches 1-3 upsampled bilinearly to branch 0's size (1/4 of the input), concatenated
  (270 channels), 1x1 convolution (with bias) + BatchNorm + ReLU, 1x1 convolution (with bias) to
  the N heatmaps, which are returned raw (no activation), as the official network does.

Convolutions other than the head's have no bias; BatchNorm uses torch's momentum 0.01 (flax
0.99) and eps 1e-5. Parameter names are the official state-dict module paths with '.' written
'_' (`stage2_0_fuse_layers_1_0_0_0`), so conversion (`star_jax.foreign.hrnet_layout`) is a
rename.

Inference rules (official `lib/datasets/*.py`, `lib/core/evaluation.py`), carried by the model's
fields so that its description travels with them:
- `input_normalisation="imagenet"`: the network is given the project's RGB in [-1, 1] and turns
  it into the official input `(rgb / 255 - mean) / std` with ImageNet mean and std; "none" feeds
  the input unchanged (already normalised).
- `decode`: "official" (argmax, a quarter pixel toward the higher neighbour, +0.5: see
  `official_decode`) or "soft_argmax" (the expectation of the ReLU'd maps, the decode STAR's
  losses see). `landmarks` use it; the heatmaps are the same either way.
- The official crop is the square of side `scale * 200` pixels around the centre with the
  test-time factor `CROP_SCALE_FACTOR` (1.25); `official_to_image` maps decoded heatmap
  coordinates back to the image as the official `transform_preds` does.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from star_jax.core import decoder
from star_jax.models import registry
from star_jax.models.base import ModelOutput
from star_jax.models.batch_norm import BatchNorm
from star_jax.models.hourglass import Conv

BN_MOMENTUM = 0.99  # torch's 0.01 in the flax convention
BN_EPSILON = 1e-5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The dataset readers multiply the annotated scale by this at test (and train) time; the crop is
# a square of side scale * CROP_SIZE_PER_SCALE pixels.
CROP_SCALE_FACTOR = 1.25
CROP_SIZE_PER_SCALE = 200.0
DECODES = ("official", "soft_argmax")
INPUT_NORMALISATIONS = ("imagenet", "none")

STEM_CHANNELS = 64
LAYER1_BLOCKS = 4
BOTTLENECK_EXPANSION = 4
# Modules of stages 2, 3 and 4 and basic blocks per branch in each (official face configuration);
# branch widths are width * 2**k.
OFFICIAL_STAGE_MODULES = (1, 4, 3)
OFFICIAL_BLOCKS = 4
MAX_MODULES = 16

Dtype = Any


def upsample_bilinear(x: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
  """torch's `F.interpolate(x, size, mode='bilinear', align_corners=False)` on NHWC `x`.

  Source coordinates `(dst + 0.5) * in / out - 0.5`, clamped at 0, with the two neighbours'
  weights computed in float32 as torch does; applied along W, then H (torch's order of the
  products), as gathers of constant indices.
  """
  def axis_weights(n_in: int, n_out: int):
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.maximum((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale
                     - np.float32(0.5), np.float32(0))
    low = np.floor(src).astype(np.int32)
    high = np.minimum(low + 1, n_in - 1)
    frac = (src - low).astype(np.float32)
    return low, high, (np.float32(1) - frac), frac

  def along(x, axis, n_out):
    low, high, w_low, w_high = axis_weights(x.shape[axis], n_out)
    shape = [1] * x.ndim
    shape[axis] = n_out
    w_low = jnp.asarray(w_low.reshape(shape), x.dtype)
    w_high = jnp.asarray(w_high.reshape(shape), x.dtype)
    return w_low * jnp.take(x, low, axis=axis) + w_high * jnp.take(x, high, axis=axis)

  if x.shape[1:3] == (height, width):
    return x
  return along(along(x, 2, width), 1, height)


def official_decode(heatmaps: jnp.ndarray) -> jnp.ndarray:
  """`(..., H, W, N)` raw maps -> `(..., N, 2)` official heatmap coordinates (x, y).

  The official `get_preds` + `decode_preds` before `transform_preds`: the argmax, 1-based
  (x = col + 1, y = row + 1), (0, 0) for a map whose maximum is <= 0; away from the border
  (1 < x < W, 1 < y < H) a quarter pixel toward the higher neighbour in x and in y; then + 0.5.
  Coordinate u corresponds to the heatmap's continuous position u - 1 with pixel c covering
  [c, c + 1].
  """
  h, w, n = heatmaps.shape[-3:]
  flat = jnp.moveaxis(heatmaps.reshape(*heatmaps.shape[:-3], h * w, n), -2, -1)  # (..., N, HW)
  index = jnp.argmax(flat, axis=-1)
  peak = jnp.max(flat, axis=-1)
  row, col = index // w, index % w
  x = (col + 1).astype(heatmaps.dtype)
  y = (row + 1).astype(heatmaps.dtype)
  positive = peak > 0
  x = jnp.where(positive, x, 0)
  y = jnp.where(positive, y, 0)

  cells = jnp.arange(h * w)

  def at(r, c):
    # The value at (r, c) as a one-hot sum (exact: one term is not zero), which every export
    # route translates; a gather of computed indices is not.
    wanted = (jnp.clip(r, 0, h - 1) * w + jnp.clip(c, 0, w - 1))[..., None] == cells
    return jnp.sum(jnp.where(wanted, flat, 0), axis=-1)

  inside = positive & (col > 0) & (col < w - 1) & (row > 0) & (row < h - 1)
  dx = jnp.sign(at(row, col + 1) - at(row, col - 1))
  dy = jnp.sign(at(row + 1, col) - at(row - 1, col))
  x = x + jnp.where(inside, 0.25 * dx, 0)
  y = y + jnp.where(inside, 0.25 * dy, 0)
  return jnp.stack([x, y], axis=-1) + 0.5


def official_to_normalised(coords: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
  """Official heatmap coordinates -> star-jax's [-1, 1] (-1 and +1 the crop's outer edges)."""
  size = jnp.asarray([width, height], coords.dtype)
  return 2 * (coords - 1) / size - 1


def official_to_image(coords: np.ndarray, center: np.ndarray, scale: np.ndarray,
                      heatmap_size: int) -> np.ndarray:
  """The official `transform_preds`: heatmap coordinates `(B, N, 2)` -> image pixels.

  `center` (B, 2) and `scale` (B,) (already multiplied by `CROP_SCALE_FACTOR`); the square of
  side `scale * 200` maps onto the heatmap; results are truncated to integers and 1 added, as
  the official `transform_pixel(..., invert=1)` does.
  """
  coords = np.asarray(coords, np.float64)
  side = CROP_SIZE_PER_SCALE * np.asarray(scale, np.float64)[:, None, None]
  centre = np.asarray(center, np.float64)[:, None, :]
  image = (coords - 1) * side / heatmap_size + centre - side / 2
  return image.astype(np.int64).astype(np.float64) + 1


def _name(*parts: Any) -> str:
  return "_".join(str(p) for p in parts)


@registry.register("hrnet_w18")
class HRNetW18(nn.Module):
  """HRNetV2-W18 (official face configuration) for `(B, H, W, 3)` RGB input.

  Attributes:
    num_points: landmarks (heatmaps).
    width: channels of the highest-resolution branch (18; branches have width * 2**k).
    stage_modules: modules of stages 2, 3 and 4 (official (1, 4, 3)).
    blocks: basic blocks per branch in every module (official 4). Fewer modules and blocks make
      a smaller network of the same structure (tests use (1, 1, 1) and 1: the same code paths at
      a fraction of the compile time); released checkpoints have the official values.
    decode: "official" or "soft_argmax" (see the module docstring).
    input_normalisation: "imagenet" (input in [-1, 1]) or "none".
    dtype: compute dtype; parameters, BatchNorm statistics and the decode stay float32 (or
      wider).
    bn_axis_name: mapped axis name for cross-device BatchNorm statistics.
    precision: `jax.lax.Precision` name for the convolutions, or None (backend default).
  """

  num_points: int = 98
  width: int = 18
  stage_modules: tuple[int, int, int] = OFFICIAL_STAGE_MODULES
  blocks: int = OFFICIAL_BLOCKS
  decode: str = "official"
  input_normalisation: str = "imagenet"
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  precision: str | None = None

  # The backbone contract (star_jax.models.base).
  architecture_defaults = {"width": 18, "stage_modules": OFFICIAL_STAGE_MODULES,
                           "blocks": OFFICIAL_BLOCKS}
  onnx_graph = None  # no hand-written graph: the traced export formats only

  @classmethod
  def from_config(cls, model_config: Any, spec: Any, *, bn_axis_name: str | None = None
                  ) -> "HRNetW18":
    def get(key, default):
      value = model_config.get(key, None)
      return default if value is None or value == "" else value
    return cls(num_points=spec.num_points, width=int(get("width", 18)),
               stage_modules=tuple(int(m) for m in get("stage_modules", OFFICIAL_STAGE_MODULES)),
               blocks=int(get("blocks", OFFICIAL_BLOCKS)),
               decode=str(get("decode", "official")),
               input_normalisation=str(get("input_normalisation", "imagenet")),
               dtype=jnp.dtype(get("dtype", "float32")), bn_axis_name=bn_axis_name,
               precision=get("precision", None) or None)

  @classmethod
  def is_scheme_dependent(cls, module: str) -> bool:
    """Only the last convolution's channels are landmarks."""
    return module == "head_3"

  def freeze_groups(self) -> tuple[str, ...]:
    return ("stem", "stage2", "stage3", "stage4", "head")

  def freeze_group(self, module: str) -> str | None:
    """stem: conv1, bn1, conv2, bn2, layer1; stage<k>: its modules and the transition into it."""
    if module.startswith(("conv", "bn", "layer1")):
      return "stem"
    if module.startswith("transition"):
      return f"stage{int(module[len('transition')]) + 1}"
    return module.split("_")[0] if module.startswith(("stage", "head")) else None

  @property
  def min_image_size(self) -> int:
    return 32

  def _check(self, images: jnp.ndarray) -> None:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"HRNetW18 expects images of shape (B, H, W, 3) (RGB, NHWC); got "
                       f"{images.shape}")
    h, w = images.shape[1:3]
    if h % 32 or w % 32:
      raise ValueError(f"image size {h}x{w} is not divisible by 32; resize or pad the input")
    modules = tuple(self.stage_modules)
    if len(modules) != 3 or not all(isinstance(m, int) and 1 <= m <= MAX_MODULES
                                    for m in modules):
      raise ValueError(f"stage_modules must be three integers in [1, {MAX_MODULES}] (stages "
                       f"2-4), got {self.stage_modules!r}")
    if self.decode not in DECODES:
      raise ValueError(f"decode={self.decode!r} is not one of {', '.join(DECODES)}")
    if self.input_normalisation not in INPUT_NORMALISATIONS:
      raise ValueError(f"input_normalisation={self.input_normalisation!r} is not one of "
                       f"{', '.join(INPUT_NORMALISATIONS)}")

  def normalise(self, images: jnp.ndarray) -> jnp.ndarray:
    """The official input from star-jax's RGB in [-1, 1] (or unchanged with "none")."""
    if self.input_normalisation == "none":
      return images
    wide = jnp.promote_types(images.dtype, jnp.float32)
    mean = jnp.asarray(IMAGENET_MEAN, wide)
    std = jnp.asarray(IMAGENET_STD, wide)
    return ((images.astype(wide) + 1) / 2 - mean) / std

  @nn.compact
  def __call__(self, images: jnp.ndarray, train: bool = False) -> ModelOutput:
    self._check(images)
    conv = functools.partial(Conv, dtype=self.dtype, precision=self.precision, use_bias=False)
    norm = functools.partial(BatchNorm, use_running_average=not train, momentum=BN_MOMENTUM,
                             epsilon=BN_EPSILON, axis_name=self.bn_axis_name, dtype=self.dtype)

    def conv_bn(x, features, kernel, stride, conv_name, bn_name, relu):
      x = conv(features, kernel, stride=stride, name=conv_name)(x)
      return norm(relu=relu, name=bn_name)(x)

    def basic(x, features, prefix):
      out = conv_bn(x, features, 3, 1, _name(prefix, "conv1"), _name(prefix, "bn1"), True)
      out = conv_bn(out, features, 3, 1, _name(prefix, "conv2"), _name(prefix, "bn2"), False)
      return jax.nn.relu(out + x)

    def bottleneck(x, planes, prefix):
      out = conv_bn(x, planes, 1, 1, _name(prefix, "conv1"), _name(prefix, "bn1"), True)
      out = conv_bn(out, planes, 3, 1, _name(prefix, "conv2"), _name(prefix, "bn2"), True)
      features = planes * BOTTLENECK_EXPANSION
      out = conv_bn(out, features, 1, 1, _name(prefix, "conv3"), _name(prefix, "bn3"), False)
      residual = x
      if x.shape[-1] != features:
        residual = conv_bn(x, features, 1, 1, _name(prefix, "downsample_0"),
                           _name(prefix, "downsample_1"), False)
      return jax.nn.relu(out + residual)

    x = self.normalise(images).astype(self.dtype)
    x = conv_bn(x, STEM_CHANNELS, 3, 2, "conv1", "bn1", True)
    x = conv_bn(x, STEM_CHANNELS, 3, 2, "conv2", "bn2", True)
    for k in range(LAYER1_BLOCKS):
      x = bottleneck(x, STEM_CHANNELS, _name("layer1", k))

    branches = [x]
    for stage, num_modules in enumerate(self.stage_modules, start=2):
      widths = [self.width * 2 ** k for k in range(stage)]
      transition = f"transition{stage - 1}"
      new = []
      for i, features in enumerate(widths):
        if i < len(branches):
          new.append(branches[i] if branches[i].shape[-1] == features else
                     conv_bn(branches[i], features, 3, 1, _name(transition, i, 0),
                             _name(transition, i, 1), True))
        else:
          new.append(conv_bn(branches[-1], features, 3, 2, _name(transition, i, 0, 0),
                             _name(transition, i, 0, 1), True))
      branches = new
      for m in range(num_modules):
        prefix = _name(f"stage{stage}", m)
        for i, features in enumerate(widths):
          for b in range(self.blocks):
            branches[i] = basic(branches[i], features, _name(prefix, "branches", i, b))
        branches = self._fuse(branches, widths, _name(prefix, "fuse_layers"), conv_bn)

    height, width = branches[0].shape[1:3]
    x = jnp.concatenate([branches[0]] + [upsample_bilinear(b, height, width)
                                         for b in branches[1:]], axis=-1)
    channels = x.shape[-1]
    head_conv = functools.partial(Conv, dtype=self.dtype, precision=self.precision)
    x = head_conv(channels, 1, name="head_0")(x)
    x = norm(relu=True, name="head_1")(x)
    heatmaps = head_conv(self.num_points, 1, name="head_3")(x)

    wide = jnp.promote_types(self.dtype, jnp.float32)
    maps = heatmaps.astype(wide)
    if self.decode == "official":
      landmarks = official_to_normalised(official_decode(maps), height, width)
    else:
      landmarks = decoder.soft_argmax(jax.nn.relu(maps))
    return ModelOutput(landmarks=(landmarks,), heatmaps=(heatmaps,), pointmaps=(), edgemaps=())

  @staticmethod
  def _fuse(branches, widths, prefix, conv_bn):
    """The exchange between branches at the end of a module (see the module docstring)."""
    out = []
    for i, features in enumerate(widths):
      height, width = branches[i].shape[1:3]
      total = branches[i]
      for j, source in enumerate(branches):
        if j > i:
          y = conv_bn(source, features, 1, 1, _name(prefix, i, j, 0), _name(prefix, i, j, 1),
                      False)
          total = total + upsample_bilinear(y, height, width)
        elif j < i:
          y = source
          for k in range(i - j):
            last = k == i - j - 1
            y = conv_bn(y, features if last else widths[j], 3, 2, _name(prefix, i, j, k, 0),
                        _name(prefix, i, j, k, 1), not last)
          total = total + y
      out.append(jax.nn.relu(total))
    return out
