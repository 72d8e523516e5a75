"""The stacked hourglass network of STAR (StackedHGNetV1 with AAM) in flax.linen.

This module owns the architecture: the CoordConv stem, the pre-activation bottleneck block, the
recursive hourglass, the per-stack heads (heatmaps, point maps, edge maps), the fixed
edge-to-point transform, the fusion of the three maps, soft-argmax landmarks per stack and the
merge of each stack's outputs into the next one.

Layout is NHWC throughout. The network reads RGB images in [-1, 1]; `star_jax.commands.convert`
reorders
the first convolution of official (BGR) checkpoints so the two agree.

Faithful details (see docs/official-semantics.md, "Architecture"):
- CoordConv channels are `[input, xx, yy, rr, (xx * mask, yy * mask)]` where "xx" varies along
  the rows (H) and "yy" along the columns (W), both in [-1, 1] with align_corners=True, and
  `rr = sqrt(xx^2 + yy^2) / max`. Unlike the official code, the maps are sized from the actual
  feature shape, so any input whose side is divisible by `4 * 2**num_levels` works.
- Stacks after the first mask the boundary channels with the previous stack's activated
  heatmap (instance norm + ReLU, before fusion), *last landmark channel*, `> 0.05` (strict).
- Every official bottleneck block owns a 1x1 "skip" convolution, even when the skip is the
  identity and the convolution is never applied. Those weights are trainable parameters of the
  official model and are part of its published parameter count (17,177,332 for WFLW), so by
  default (`keep_unused_skip=True`) they are declared here too: parameter trees and counts match
  the official model one-to-one, and they cost no compute (they receive zero gradient and Adam
  leaves them untouched). `keep_unused_skip=False` drops them (3.75 M fewer parameters at 256
  channels).
- The E2H transform is a constant built from `edge_points` (a buffer in the official model,
  not a parameter, so it is not counted).
- BatchNorm (`star_jax.models.batch_norm`) mirrors torch's SyncBatchNorm: momentum 0.1 (flax
  convention 0.9), eps 1e-5, biased variance to normalise, unbiased variance of the global batch
  in the running average.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from star_jax.core import decoder
from star_jax.models import registry
from star_jax.models.base import (ModelOutput, count_parameters, init_variables,  # noqa: F401
                                  parameter_shapes)
from star_jax.models.batch_norm import BatchNorm

# The official CoordConv switches the boundary channels on where the previous stack's heatmap
# exceeds this value (strictly).
BOUNDARY_THRESHOLD = 0.05
# torch.nn.BatchNorm2d / F.instance_norm defaults.
BN_MOMENTUM = 0.9  # flax convention: new = momentum * old + (1 - momentum) * batch (torch 0.1)
BN_EPSILON = 1e-5
IN_EPSILON = 1e-5
# Channels produced by the stem convolution and its first bottleneck (fixed in the official net).
STEM_CHANNELS = 64
STEM_BLOCK_CHANNELS = 128

Dtype = Any
# Top-level modules whose weights depend on the landmark scheme (their index is the stack).
_SCHEME_MODULES = re.compile(r"^(heatmap_head|pointmap_head|edgemap_head|merge_heatmaps|"
                             r"merge_pointmaps|merge_edgemaps)\d+$")
_STACK_INDEX = re.compile(r"^[a-z_]*?(\d+)$")


def torch_default_kernel_init():
  """torch's Conv2d default (kaiming_uniform, a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int):
  """torch's Conv2d default bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _float_dtype_at_least_f32(dtype: Dtype) -> Dtype:
  """float32 for bf16/f16/f32 compute, float64 when the model runs in float64."""
  return jnp.promote_types(dtype, jnp.float32)


def coordinate_maps(height: int, width: int, dtype: Dtype = jnp.float32) -> np.ndarray:
  """The CoordConv channels `(H, W, 3)`: xx (varies along H), yy (along W), rr.

  A trace-time numpy constant computed in float32 exactly as the official code does
  (`i / (n - 1) * 2 - 1`, then `rr = sqrt(xx^2 + yy^2) / max`), also when the model runs in
  float64: the official maps are float32 whatever the input dtype. (XLA may rewrite a division
  by a constant into a multiplication, which is why this is not written with jnp.)
  """
  def axis(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float32) / np.float32(n - 1) * np.float32(2) - np.float32(1)

  xx = np.broadcast_to(axis(height)[:, None], (height, width))
  yy = np.broadcast_to(axis(width)[None, :], (height, width))
  rr = np.sqrt(xx * xx + yy * yy)
  rr = rr / rr.max()
  return np.stack([xx, yy, rr], axis=-1).astype(dtype)


def add_coords(x: jnp.ndarray, boundary: jnp.ndarray | None = None) -> jnp.ndarray:
  """Appends CoordConv channels to `x` (B, H, W, C).

  `boundary` (B, H, W, 1) bool, when given, appends `xx * boundary` and `yy * boundary`.
  """
  b, h, w, _ = x.shape
  coords = coordinate_maps(h, w, x.dtype)
  parts = [x, jnp.broadcast_to(coords, (b, h, w, 3))]
  if boundary is not None:
    xy = jnp.broadcast_to(coords[..., :2], (b, h, w, 2))
    parts.append(jnp.where(boundary, xy, jnp.zeros((), x.dtype)))
  return jnp.concatenate(parts, axis=-1)


def instance_norm_relu(x: jnp.ndarray) -> jnp.ndarray:
  """ReLU(instance norm without affine): per sample and channel over H, W; biased variance.

  Statistics are computed in (at least) float32 whatever the compute dtype.
  """
  x = x.astype(_float_dtype_at_least_f32(x.dtype))
  mean = jnp.mean(x, axis=(-3, -2), keepdims=True)
  centred = x - mean
  var = jnp.mean(centred * centred, axis=(-3, -2), keepdims=True)
  return jax.nn.relu(centred * jax.lax.rsqrt(var + IN_EPSILON))


def _pool_windows(x: jnp.ndarray) -> jnp.ndarray:
  """(B, H, W, C) -> (B, H/2, 2, W/2, 2, C): each 2x2 window on axes 2 and 4 (a free reshape)."""
  b, h, w, c = x.shape
  if h % 2 or w % 2:
    raise ValueError(f"max_pool_2x2 needs even height and width, got {h}x{w}")
  return x.reshape(b, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
  """2x2 max-pool, stride 2 (torch's `F.max_pool2d(x, 2, 2)`) on (B, H, W, C).

  The gradient goes to the first maximum of each window in row-major order, the element
  torch's max_pool2d selects, also when a window holds ties. It is written as elementwise
  compares on the window view because the generic gradient of `lax.reduce_window` lowers, on
  XLA:CPU, to a variadic reduce-window over four int32 index maps of the input's size: about
  12 % of the full CPU training step for the two pools of the stem and the hourglasses.
  """
  return jnp.max(_pool_windows(x), axis=(2, 4))


def _max_pool_2x2_fwd(x):
  y = max_pool_2x2(x)
  return y, (x, y)


def _max_pool_2x2_bwd(residuals, g):
  x, y = residuals
  windows = _pool_windows(x)
  hit = windows == y[:, :, None, :, None, :]
  # Route to the first hit in the order (0, 0), (0, 1), (1, 0), (1, 1).
  first00 = hit[:, :, 0, :, 0]
  first01 = hit[:, :, 0, :, 1] & ~first00
  first10 = hit[:, :, 1, :, 0] & ~(first00 | first01)
  first11 = ~(first00 | first01 | first10)  # also takes windows without a hit (NaN)
  zero = jnp.zeros((), g.dtype)
  pick = lambda mask: jnp.where(mask, g, zero)
  top = jnp.stack([pick(first00), pick(first01)], axis=3)
  bottom = jnp.stack([pick(first10), pick(first11)], axis=3)
  return (jnp.stack([top, bottom], axis=2).reshape(x.shape),)


max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)


def upsample_nearest_2x(x: jnp.ndarray) -> jnp.ndarray:
  """Nearest-neighbour x2 upsampling as a broadcast + reshape (no gather)."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


class Conv(nn.Module):
  """A convolution with bias, 'same' padding and torch's default initialisation.

  Parameters `kernel` (k, k, in, out) and `bias` (out,) are float32; the arithmetic runs in
  `dtype`. 1x1 stride-1 convolutions are a 2-D matrix product over the flattened pixels: its
  weight gradient is then a product contracting the pixel axis of both operands, which
  XLA:CPU runs without the transposed copy of the incoming gradient it made for a 4-D einsum.
  """

  features: int
  kernel_size: int = 1
  stride: int = 1
  dtype: Dtype = jnp.float32
  precision: str | None = None
  use_bias: bool = True  # False: no `bias` parameter (convolutions followed by BatchNorm)

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    k = self.kernel_size
    in_features = x.shape[-1]
    kernel = self.param("kernel", torch_default_kernel_init(), (k, k, in_features, self.features),
                        jnp.float32)
    if self.use_bias:
      bias = self.param("bias", torch_default_bias_init(in_features * k * k), (self.features,),
                        jnp.float32)
      x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
    else:
      x, kernel = (a.astype(self.dtype) for a in (x, kernel))
      bias = None
    if k == 1 and self.stride == 1:
      rows = x.reshape(-1, in_features)
      # The bias is added before the reshape so that its gradient reads the same 2-D array as
      # the product's (one materialised gradient instead of a 2-D and a 4-D copy).
      y = jnp.dot(rows, kernel[0, 0], precision=self.precision)
      if bias is not None:
        y = y + bias
      return y.reshape(*x.shape[:-1], -1)
    pad = (k - 1) // 2
    y = jax.lax.conv_general_dilated(x, kernel, (self.stride, self.stride),
                                     ((pad, pad), (pad, pad)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=self.precision)
    return y if bias is None else y + bias


class UnusedConv1x1(nn.Module):
  """Declares the parameters of a 1x1 convolution that the forward pass never applies.

  Mirrors the official bottleneck's identity-skip convolution (see the module docstring); the
  parameter names and shapes are those of `Conv`.
  """

  in_features: int
  features: int

  @nn.compact
  def __call__(self) -> None:
    self.param("kernel", torch_default_kernel_init(), (1, 1, self.in_features, self.features),
               jnp.float32)
    self.param("bias", torch_default_bias_init(self.in_features), (self.features,), jnp.float32)


ModuleDef = Any


class ResBlock(nn.Module):
  """Pre-activation bottleneck: BN-ReLU-1x1 (C/2), BN-ReLU-3x3, BN-ReLU-1x1 (C), plus skip.

  `conv` and `norm` are the network's partially applied `Conv` and BatchNorm(+ReLU): dtype,
  precision and the BatchNorm axis are decided once, by `StackedHourglass`.
  """

  features: int
  conv: ModuleDef
  norm: ModuleDef
  keep_unused_skip: bool = True

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    in_features = x.shape[-1]
    mid = self.features // 2
    if in_features != self.features:
      residual = self.conv(self.features, 1, name="skip")(x)
    else:
      residual = x
      if self.keep_unused_skip:
        UnusedConv1x1(in_features, self.features, name="skip")()
    out = x
    for i, (width, kernel) in enumerate(((mid, 1), (mid, 3), (self.features, 1)), start=1):
      out = self.norm(name=f"bn{i}")(out)
      out = self.conv(width, kernel, name=f"conv{i}")(out)
    return out + residual


class Hourglass(nn.Module):
  """One recursive hourglass; the outermost level of each stack starts with a 1x1 CoordConv."""

  levels: int
  features: int
  conv: ModuleDef
  block: ModuleDef
  coordconv: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, boundary: jnp.ndarray | None = None) -> jnp.ndarray:
    if self.coordconv:
      x = self.conv(self.features, 1, name="coordconv")(add_coords(x, boundary))
    up = self.block(self.features, name="up1")(x)
    low = self.block(self.features, name="low1")(max_pool_2x2(x))
    if self.levels > 1:
      low = Hourglass(self.levels - 1, self.features, self.conv, self.block,
                      name="low2")(low)
    else:
      low = self.block(self.features, name="low2")(low)
    low = self.block(self.features, name="low3")(low)
    return up + upsample_nearest_2x(low)


@registry.register("stacked_hourglass")
class StackedHourglass(nn.Module):
  """STAR's StackedHGNetV1 (CoordConv, AAM heads) for `(B, H, W, 3)` RGB input in [-1, 1].

  Attributes:
    num_stacks: hourglasses in sequence (each gives a prediction; the last is final).
    num_levels: recursion depth of each hourglass (H and W must divide by 4 * 2**num_levels).
    channels: feature width of the hourglasses (256 in the released models).
    num_points: landmarks.
    edge_points: the landmark indices of each edge (`spec.edges[e].points`); builds E2H.
    use_aam: point-map and edge-map heads and the fusion (the STAR recipe uses them).
    dtype: compute dtype (e.g. bfloat16); parameters are float32, and the instance norm,
      the sigmoid maps, the fusion and the landmarks are computed in float32 (or wider).
    bn_axis_name: mapped axis name for cross-device BatchNorm statistics (SyncBatchNorm).
    keep_unused_skip: declare the official identity-skip convolutions (never applied).
    precision: `jax.lax.Precision` name for the convolutions ('highest', 'high', 'default')
      or None for the backend default. On GPUs the default runs float32 convolutions in TF32,
      which moves the outputs of a converted official model by up to ~1e-2 (random weights,
      fixture model); 'highest' reproduces the official float32 outputs on any backend. CPUs
      compute float32 exactly either way.
  """

  num_stacks: int = 4
  num_levels: int = 4
  channels: int = 256
  num_points: int = 98
  edge_points: tuple[tuple[int, ...], ...] = ()
  use_aam: bool = True
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  keep_unused_skip: bool = True
  precision: str | None = None

  # The backbone contract (star_jax.models.base).
  architecture_defaults = {"num_stacks": 4, "num_levels": 4, "channels": 256, "use_aam": True}
  onnx_graph = "star_jax.deploy.export.onnx_graph"

  @classmethod
  def is_scheme_dependent(cls, module: str) -> bool:
    """The heads and the merge convolutions that read them: their channels are landmarks."""
    return _SCHEME_MODULES.match(module) is not None

  def freeze_groups(self) -> tuple[str, ...]:
    return ("stem",) + tuple(f"stack{i}" for i in range(self.num_stacks))

  def freeze_group(self, module: str) -> str | None:
    if module.startswith("stem_"):
      return "stem"
    match = _STACK_INDEX.match(module)
    return f"stack{match.group(1)}" if match else None

  @property
  def min_image_size(self) -> int:
    return 4 * 2 ** self.num_levels

  @classmethod
  def from_config(cls, model_config: Any, spec: Any, *, bn_axis_name: str | None = None
                  ) -> "StackedHourglass":
    """The network of `config.model` (num_stacks, num_levels, channels, use_aam, dtype,
    precision) for a landmark scheme (`star_jax.core.schemes.DatasetSpec`: points and edges)."""
    def get(key, default):
      value = model_config.get(key, None)
      return default if value is None else value
    return cls(
        num_stacks=int(get("num_stacks", 4)),
        num_levels=int(get("num_levels", 4)),
        channels=int(get("channels", 256)),
        num_points=spec.num_points,
        edge_points=tuple(tuple(int(p) for p in edge.points) for edge in spec.edges),
        use_aam=bool(get("use_aam", True)),
        dtype=jnp.dtype(get("dtype", "float32")),
        bn_axis_name=bn_axis_name,
        keep_unused_skip=bool(get("keep_unused_skip", True)),
        precision=get("precision", None) or None,
    )

  @property
  def num_edges(self) -> int:
    return len(self.edge_points)

  def edge_to_point(self) -> tuple[np.ndarray, np.ndarray]:
    """The fixed E2H transform: weight (E, N) with 1 where point n lies on edge e; bias (N,)
    equal to 1 for points on no edge (so their fused heatmap is not zeroed)."""
    weight = np.zeros((self.num_edges, self.num_points), np.float32)
    for e, points in enumerate(self.edge_points):
      weight[e, list(points)] = 1.0
    bias = (weight.sum(axis=0) < 0.5).astype(np.float32)
    return weight, bias

  def _check_input(self, images: jnp.ndarray) -> None:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"StackedHourglass expects images of shape (B, H, W, 3) (RGB, NHWC); "
                       f"got {images.shape}")
    factor = 4 * 2 ** self.num_levels
    h, w = images.shape[1:3]
    if h % factor or w % factor:
      raise ValueError(f"image size {h}x{w} is not divisible by {factor} (= 4 * 2**num_levels "
                       f"with num_levels={self.num_levels}); resize or pad the input")
    if self.use_aam and self.num_edges == 0:
      raise ValueError("use_aam=True needs edge_points (the dataset's edges); got none")

  @nn.compact
  def __call__(self, images: jnp.ndarray, train: bool = False,
               boundary_masks: Sequence[jnp.ndarray] | None = None) -> ModelOutput:
    """Runs all stacks.

    Args:
      images: (B, H, W, 3) RGB in [-1, 1].
      train: batch statistics (and their update, with `mutable=["batch_stats"]`) if True,
        running averages otherwise.
      boundary_masks: optional, for analysis: `num_stacks - 1` boolean (B, H/4, W/4) masks that
        replace the thresholded heatmaps of stacks 1.. (e.g. the masks of another
        implementation, to compare both without the 0.05 hard switch amplifying rounding).
        The computed masks are sown as "intermediates"/"boundary_masks".
    """
    self._check_input(images)
    if boundary_masks is not None and len(boundary_masks) != self.num_stacks - 1:
      raise ValueError(f"boundary_masks needs {self.num_stacks - 1} masks (stacks 1..), got "
                       f"{len(boundary_masks)}")
    wide = _float_dtype_at_least_f32(self.dtype)
    # Every convolution and BatchNorm of the network is built from these, so the compute dtype,
    # the precision and the BatchNorm axis cannot be forgotten by a submodule.
    conv = functools.partial(Conv, dtype=self.dtype, precision=self.precision)
    norm = functools.partial(BatchNorm, use_running_average=not train, momentum=BN_MOMENTUM,
                             epsilon=BN_EPSILON, axis_name=self.bn_axis_name, dtype=self.dtype,
                             relu=True)
    block = functools.partial(ResBlock, conv=conv, norm=norm,
                              keep_unused_skip=self.keep_unused_skip)

    # Stem: CoordConv 7x7/2, BN, ReLU, then bottlenecks around a 2x2 max-pool (1/4 resolution).
    x = add_coords(images.astype(self.dtype))
    x = conv(STEM_CHANNELS, 7, stride=2, name="stem_conv")(x)
    x = norm(name="stem_bn")(x)
    x = block(STEM_BLOCK_CHANNELS, name="stem_block1")(x)
    x = max_pool_2x2(x)
    x = block(STEM_BLOCK_CHANNELS, name="stem_block2")(x)
    x = block(self.channels, name="stem_block3")(x)

    if self.use_aam:
      e2h_weight, e2h_bias = (jnp.asarray(a, wide) for a in self.edge_to_point())

    landmarks, fused_maps, pointmaps_out, edgemaps_out = [], [], [], []
    heatmaps = None
    for i in range(self.num_stacks):
      boundary = None
      if heatmaps is not None:
        # The previous stack's activated heatmap, last landmark channel (official quirk).
        boundary = jax.lax.stop_gradient(heatmaps[..., -1:] > BOUNDARY_THRESHOLD)
        if not self.is_initializing():
          # Readable with `mutable=["intermediates"]`; kept out of the initial variables.
          self.sow("intermediates", "boundary_masks", boundary[..., 0])
        if boundary_masks is not None:
          boundary = jnp.asarray(boundary_masks[i - 1], bool)[..., None]
      hg = Hourglass(self.num_levels, self.channels, conv, block, coordconv=True,
                     name=f"hourglass{i}")(x, boundary)
      feature = block(self.channels, name=f"features{i}")(hg)
      feature = conv(self.channels, 1, name=f"features_conv{i}")(feature)
      feature = norm(name=f"features_bn{i}")(feature)

      heatmaps = instance_norm_relu(conv(self.num_points, 1, name=f"heatmap_head{i}")(feature))
      if self.use_aam:
        pointmaps = jax.nn.sigmoid(
            conv(self.num_points, 1, name=f"pointmap_head{i}")(feature).astype(wide))
        edgemaps = jax.nn.sigmoid(
            conv(self.num_edges, 1, name=f"edgemap_head{i}")(feature).astype(wide))
        edge_gate = jnp.einsum("bhwe,en->bhwn", edgemaps, e2h_weight,
                               precision=jax.lax.Precision.HIGHEST) + e2h_bias
        fused = heatmaps * (edge_gate * pointmaps)
        pointmaps_out.append(pointmaps)
        edgemaps_out.append(edgemaps)
      else:
        fused = heatmaps
      fused_maps.append(fused)
      landmarks.append(decoder.soft_argmax(fused))

      if i < self.num_stacks - 1:
        # The merge reads the activated heatmaps (not the fused maps), as the official net does.
        merged = (x + conv(self.channels, 1, name=f"merge_features{i}")(feature)
                  + conv(self.channels, 1, name=f"merge_heatmaps{i}")(heatmaps))
        if self.use_aam:
          merged = (merged + conv(self.channels, 1, name=f"merge_pointmaps{i}")(pointmaps)
                    + conv(self.channels, 1, name=f"merge_edgemaps{i}")(edgemaps))
        x = merged

    return ModelOutput(landmarks=tuple(landmarks), heatmaps=tuple(fused_maps),
                       pointmaps=tuple(pointmaps_out), edgemaps=tuple(edgemaps_out))
