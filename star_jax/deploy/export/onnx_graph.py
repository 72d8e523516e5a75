"""The ONNX graph of a `StackedHourglass`, written node by node from its variables.

Why not a tracer (jax2onnx, or jax2tf then tf2onnx): the traced graph follows the JAX program
literally, NHWC with a transpose around every convolution, 1x1 convolutions as reshape + MatMul,
pooling as a 6-D reshape + ReduceMax, upsampling as broadcast + reshape. jax2onnx 0.17.1 does
export this model with parity, but into ~4,200 nodes (opset 23) that ONNX Runtime runs 1.4x
slower than jitted JAX at batch 1, after a 65 s conversion, and it pins an older
orbax-checkpoint than the project uses. Here the graph is the architecture itself, in the
layout ONNX runtimes are built for (NCHW inside; NHWC at the interface, per the export contract),
from standard opset-17 operators that onnxruntime-web's WASM backend runs:

- inference BatchNorm is an affine map; where a convolution feeds it directly (the stem, the
  second and third BN of every bottleneck, the feature BN of every stack) it is folded into the
  convolution's weights; the others are `BatchNormalization` + `Relu`;
- CoordConv channels are constants: the convolution of `[x, coords]` is `Conv(x) + Conv(coords)`
  with the coordinate maps a (1, 3, H, W) initializer (runtimes fold the constant branch at
  load), and the boundary channels `mask * (xx, yy)` contribute `mask * Conv((xx, yy))`;
- max-pool is `MaxPool`, nearest upsampling `Resize` (exact replication), the instance norm
  `InstanceNormalization` + `Relu`;
- the three heads of a stack are one `Conv` split in three, the three merge convolutions of
  the maps one `Conv` over their concatenation, E2H a 1x1 `Conv` with the fixed 0/1 weights;
- soft-argmax is one `MatMul` of the flattened maps with `[1, x, y]` grids (mass and both
  moments), then the clamped division and the pixel convention of the contract.

Every parameter must be consumed (the declared-but-unused identity skips excepted); an unknown
variable tree raises, so an architecture change cannot silently produce a wrong graph. The
parity tests (tests/test_export.py) compare the result with the JAX model.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from star_jax.models.hourglass import (BN_EPSILON, BOUNDARY_THRESHOLD, IN_EPSILON,
                                       STEM_BLOCK_CHANNELS, StackedHourglass, coordinate_maps)
from star_jax.core.decoder import MIN_MASS, heatmap_grid
from star_jax.deploy.runtime import contract

OPSET = 17
# IR version 8 (ONNX 1.13+) is read by every onnxruntime (web included) released since 2022.
IR_VERSION = 8


class _Graph:
  """Accumulates nodes and initializers; every value gets a unique readable name."""

  def __init__(self, weight_dtype: np.dtype):
    import onnx
    self.onnx = onnx
    self.nodes: list[Any] = []
    self.initializers: list[Any] = []
    self.weight_dtype = np.dtype(weight_dtype)
    self._names: dict[str, int] = {}

  def name(self, hint: str) -> str:
    count = self._names.get(hint, 0)
    self._names[hint] = count + 1
    return hint if count == 0 else f"{hint}_{count}"

  def const(self, hint: str, array: np.ndarray, *, exact: bool = False) -> str:
    """An initializer. Large float tensors are stored in the weight dtype (float16 weights are
    cast back to float32 by a `Cast` node, which runtimes fold at load); `exact` keeps float32."""
    array = np.asarray(array)
    name = self.name(hint)
    if (array.dtype == np.float32 and self.weight_dtype != np.float32 and not exact
        and array.size > 64):
      stored = self.name(hint + "_stored")
      self.initializers.append(self.onnx.numpy_helper.from_array(
          array.astype(self.weight_dtype), stored))
      self.nodes.append(self.onnx.helper.make_node(
          "Cast", [stored], [name], to=self.onnx.TensorProto.FLOAT, name=name))
      return name
    self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
    return name

  def op(self, op_type: str, inputs: list[str], hint: str, *, outputs: int = 1,
         **attrs) -> Any:
    names = [self.name(hint if outputs == 1 else f"{hint}_{i}") for i in range(outputs)]
    self.nodes.append(self.onnx.helper.make_node(op_type, inputs, names, name=names[0], **attrs))
    return names[0] if outputs == 1 else names


class _Params:
  """Read access to `{params, batch_stats}` that records what was used."""

  def __init__(self, variables: Mapping[str, Any]):
    import flax.traverse_util
    self.params = {k: np.asarray(v, np.float32) for k, v in
                   flax.traverse_util.flatten_dict(dict(variables["params"]), sep="/").items()}
    self.stats = {k: np.asarray(v, np.float32) for k, v in
                  flax.traverse_util.flatten_dict(dict(variables.get("batch_stats", {})),
                                                  sep="/").items()}
    self.used: set[str] = set()

  def param(self, path: str) -> np.ndarray:
    if path not in self.params:
      raise ValueError(f"the model variables have no parameter {path!r}; this exporter knows "
                       "the StackedHourglass architecture of star_jax.models.hourglass")
    self.used.add(path)
    return self.params[path]

  def stat(self, path: str) -> np.ndarray:
    if path not in self.stats:
      raise ValueError(f"the model variables have no batch statistic {path!r}")
    self.used.add("stats:" + path)
    return self.stats[path]

  def has(self, path: str) -> bool:
    return path in self.params

  def check_all_used(self) -> None:
    unused = [p for p in self.params if p not in self.used and "/skip/" not in f"/{p}"]
    unused += ["stats:" + s for s in self.stats if "stats:" + s not in self.used]
    if unused:
      raise ValueError(f"variables not part of the exported graph: {', '.join(sorted(unused)[:5])}"
                       " (an architecture this exporter does not know)")


def _bn_affine(params: _Params, path: str) -> tuple[np.ndarray, np.ndarray]:
  """Inference BatchNorm as `x * a + b` per channel (computed in float64, stored float32)."""
  scale = params.param(f"{path}/scale").astype(np.float64)
  bias = params.param(f"{path}/bias").astype(np.float64)
  mean = params.stat(f"{path}/mean").astype(np.float64)
  var = params.stat(f"{path}/var").astype(np.float64)
  a = scale / np.sqrt(var + BN_EPSILON)
  return a, bias - mean * a


class _Builder:
  """Emits the network; tensors are NCHW value names."""

  def __init__(self, model: StackedHourglass, variables: Mapping[str, Any], image_size: int,
               weight_dtype: np.dtype):
    self.model = model
    self.p = _Params(variables)
    self.g = _Graph(weight_dtype)
    self.size = image_size

  # -- layers ---------------------------------------------------------------------------------

  def conv(self, x: str, kernel: np.ndarray, bias: np.ndarray | None, hint: str, *,
           stride: int = 1, out_scale: np.ndarray | None = None,
           out_shift: np.ndarray | None = None, relu: bool = False) -> str:
    """`Conv` of a flax HWIO kernel, 'same' padding, optionally followed by a folded affine map
    (`y * out_scale + out_shift`) and ReLU."""
    k = kernel.shape[0]
    weight = np.transpose(kernel.astype(np.float64), (3, 2, 0, 1))  # OIHW
    b = np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)
    if out_scale is not None:
      weight = weight * out_scale[:, None, None, None]
      b = b * out_scale + out_shift
    pad = (k - 1) // 2
    y = self.g.op("Conv", [x, self.g.const(hint + "_w", weight.astype(np.float32)),
                          self.g.const(hint + "_b", b.astype(np.float32))], hint,
                  kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4)
    return self.g.op("Relu", [y], hint + "_relu") if relu else y

  def batch_norm_relu(self, x: str, path: str) -> str:
    """Inference `BatchNormalization` + `Relu` with the stored statistics (ONNX Runtime keeps it
    in its blocked NCHWc layout, where a Mul/Add pair would force layout conversions)."""
    hint = path.replace("/", ".")
    inputs = [self.g.const(f"{hint}_{name}", values, exact=True) for name, values in (
        ("scale", self.p.param(f"{path}/scale")), ("bias", self.p.param(f"{path}/bias")),
        ("mean", self.p.stat(f"{path}/mean")), ("var", self.p.stat(f"{path}/var")))]
    y = self.g.op("BatchNormalization", [x] + inputs, hint, epsilon=BN_EPSILON)
    return self.g.op("Relu", [y], hint + "_relu")

  def plain_conv(self, x: str, path: str, **kwargs) -> str:
    return self.conv(x, self.p.param(f"{path}/kernel"), self.p.param(f"{path}/bias"),
                     path.replace("/", "."), **kwargs)

  def res_block(self, x: str, in_channels: int, path: str) -> tuple[str, int]:
    """The pre-activation bottleneck; BN2 and BN3 fold into conv1 and conv2."""
    hint = path.replace("/", ".")
    out_channels = self.p.param(f"{path}/conv3/kernel").shape[-1]
    h = self.batch_norm_relu(x, f"{path}/bn1")
    a2, b2 = _bn_affine(self.p, f"{path}/bn2")
    h = self.plain_conv(h, f"{path}/conv1", out_scale=a2, out_shift=b2, relu=True)
    a3, b3 = _bn_affine(self.p, f"{path}/bn3")
    h = self.plain_conv(h, f"{path}/conv2", out_scale=a3, out_shift=b3, relu=True)
    h = self.plain_conv(h, f"{path}/conv3")
    residual = self.plain_conv(x, f"{path}/skip") if in_channels != out_channels else x
    return self.g.op("Add", [h, residual], hint + ".out"), out_channels

  def coord_contribution(self, kernel: np.ndarray, maps: np.ndarray, hint: str, *,
                         stride: int = 1, bias: np.ndarray | None = None) -> str:
    """`Conv(maps, kernel)` of constant (C, H, W) maps: a (1, F, H', W') value the runtime folds."""
    const = self.g.const(hint + "_maps", maps[None].astype(np.float32), exact=True)
    return self.conv(const, kernel, bias, hint, stride=stride)

  def hourglass(self, x: str, channels: int, levels: int, path: str, coordconv: bool,
                boundary: str | None) -> str:
    hint = path.replace("/", ".")
    if coordconv:
      kernel = self.p.param(f"{path}/coordconv/kernel")
      bias = self.p.param(f"{path}/coordconv/bias")
      side = self.size // 4
      coords = np.transpose(coordinate_maps(side, side), (2, 0, 1))  # (3, H, W): xx, yy, rr
      y = self.conv(x, kernel[:, :, :channels], None, hint + ".coordconv")
      y = self.g.op("Add", [y, self.coord_contribution(kernel[:, :, channels:channels + 3],
                                                       coords, hint + ".coords", bias=bias)],
                    hint + ".coordconv_coords")
      if boundary is not None:
        masked = self.coord_contribution(kernel[:, :, channels + 3:channels + 5], coords[:2],
                                         hint + ".boundary")
        y = self.g.op("Add", [y, self.g.op("Mul", [boundary, masked], hint + ".boundary_mul")],
                      hint + ".coordconv_out")
      elif kernel.shape[2] != channels + 3:
        raise ValueError(f"{path}/coordconv: unexpected input width {kernel.shape[2]}")
      x = y
    up, _ = self.res_block(x, channels, f"{path}/up1")
    low = self.g.op("MaxPool", [x], hint + ".pool", kernel_shape=[2, 2], strides=[2, 2])
    low, _ = self.res_block(low, channels, f"{path}/low1")
    if levels > 1:
      low = self.hourglass(low, channels, levels - 1, f"{path}/low2", False, None)
    else:
      low, _ = self.res_block(low, channels, f"{path}/low2")
    low, _ = self.res_block(low, channels, f"{path}/low3")
    scales = self.g.const(hint + ".up_scales", np.array([1, 1, 2, 2], np.float32), exact=True)
    upsampled = self.g.op("Resize", [low, "", scales], hint + ".upsample", mode="nearest",
                          coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    return self.g.op("Add", [up, upsampled], hint + ".out")

  def soft_argmax_pixels(self, fused: str, hint: str) -> str:
    """`(B, N, h, w)` fused maps -> `(B, N, 2)` crop pixels (the contract's convention)."""
    n, side = self.model.num_points, self.size // 4
    grid = np.asarray(heatmap_grid(side), np.float32)
    # Row-major flattening of (h, w): column j of the grid matrix pairs pixel (j // w, j % w).
    moments = np.stack([np.ones(side * side, np.float32), np.tile(grid, side),
                        np.repeat(grid, side)], axis=1)                       # (h*w, 3)
    flat = self.g.op("Reshape", [fused, self.g.const(hint + "_shape",
                                                     np.array([0, n, -1], np.int64))],
                     hint + "_flat")
    sums = self.g.op("MatMul", [flat, self.g.const(hint + "_moments", moments, exact=True)],
                     hint + "_moments_out")
    mass, xy = self.g.op("Split", [sums, self.g.const(hint + "_split",
                                                      np.array([1, 2], np.int64))],
                         hint + "_split_out", outputs=2, axis=2)
    mass = self.g.op("Max", [mass, self.g.const(hint + "_min_mass",
                                                np.array(MIN_MASS, np.float32))], hint + "_mass")
    normalised = self.g.op("Div", [xy, mass], hint + "_normalised")
    # p = ((l + 1) * S - 1) / 2, in this order (as transforms.denormalize_landmarks).
    one = self.g.const(hint + "_one", np.array(1, np.float32))
    y = self.g.op("Add", [normalised, one], hint + "_p1")
    y = self.g.op("Mul", [y, self.g.const(hint + "_size", np.array(self.size, np.float32))],
                  hint + "_p2")
    y = self.g.op("Sub", [y, one], hint + "_p3")
    return self.g.op("Div", [y, self.g.const(hint + "_two", np.array(2, np.float32))],
                     contract.LANDMARKS_NAME)

  # -- the network ----------------------------------------------------------------------------

  def build(self, with_heatmaps: bool) -> tuple[str, str | None]:
    model, g, p = self.model, self.g, self.p
    x = g.op("Transpose", [contract.INPUT_NAME], "nchw", perm=[0, 3, 1, 2])
    # The evaluation normalisation, in its float32 order: x / 255 * 2 - 1.
    x = g.op("Div", [x, g.const("c255", np.array(255, np.float32))], "scaled")
    x = g.op("Mul", [x, g.const("c2", np.array(2, np.float32))], "scaled2")
    x = g.op("Sub", [x, g.const("c1", np.array(1, np.float32))], "normalised")

    kernel = p.param("stem_conv/kernel")
    a, b = _bn_affine(p, "stem_bn")
    coords = np.transpose(coordinate_maps(self.size, self.size), (2, 0, 1))
    stem = self.conv(x, kernel[:, :, :3], p.param("stem_conv/bias"), "stem_conv", stride=2,
                     out_scale=a, out_shift=b)
    # The coordinate channels go through the same conv and the folded BN scale (no shift).
    coord_part = self.coord_contribution(kernel[:, :, 3:6] * a.astype(np.float32), coords,
                                         "stem_coords", stride=2)
    x = g.op("Relu", [g.op("Add", [stem, coord_part], "stem_sum")], "stem")
    x, c = self.res_block(x, kernel.shape[-1], "stem_block1")
    if c != STEM_BLOCK_CHANNELS:
      raise ValueError(f"stem_block1 has {c} channels, expected {STEM_BLOCK_CHANNELS}")
    x = g.op("MaxPool", [x], "stem_pool", kernel_shape=[2, 2], strides=[2, 2])
    x, c = self.res_block(x, c, "stem_block2")
    x, c = self.res_block(x, c, "stem_block3")
    if c != model.channels:
      raise ValueError(f"stem_block3 has {c} channels, the model declares {model.channels}")

    n, e = model.num_points, model.num_edges
    ones, zeros = np.ones(n, np.float32), np.zeros(n, np.float32)
    boundary, fused = None, None
    for i in range(model.num_stacks):
      hg = self.hourglass(x, c, model.num_levels, f"hourglass{i}", True, boundary)
      feature, _ = self.res_block(hg, c, f"features{i}")
      scale, shift = _bn_affine(p, f"features_bn{i}")
      feature = self.plain_conv(feature, f"features_conv{i}", out_scale=scale, out_shift=shift,
                                relu=True)
      heads = [f"heatmap_head{i}"] + ([f"pointmap_head{i}", f"edgemap_head{i}"]
                                      if model.use_aam else [])
      kernel = np.concatenate([p.param(f"{h}/kernel") for h in heads], axis=-1)
      bias = np.concatenate([p.param(f"{h}/bias") for h in heads])
      logits = self.conv(feature, kernel, bias, f"heads{i}")
      if model.use_aam:
        heat_logits, point_logits, edge_logits = g.op(
            "Split", [logits, g.const(f"heads{i}_split", np.array([n, n, e], np.int64))],
            f"heads{i}_out", outputs=3, axis=1)
      else:
        heat_logits = logits
      normed = g.op("InstanceNormalization",
                    [heat_logits, g.const(f"in{i}_scale", ones), g.const(f"in{i}_bias", zeros)],
                    f"instance_norm{i}", epsilon=IN_EPSILON)
      heatmaps = g.op("Relu", [normed], f"heatmaps{i}")
      if model.use_aam:
        pointmaps = g.op("Sigmoid", [point_logits], f"pointmaps{i}")
        edgemaps = g.op("Sigmoid", [edge_logits], f"edgemaps{i}")
        e2h_weight, e2h_bias = model.edge_to_point()            # (E, N), (N,)
        gate = self.conv(edgemaps, e2h_weight[None, None], e2h_bias, f"edge_gate{i}")
        fused = g.op("Mul", [heatmaps, g.op("Mul", [gate, pointmaps], f"gated{i}")],
                     f"fused{i}")
      else:
        fused = heatmaps
      if i < model.num_stacks - 1:
        boundary_last = g.op("Slice", [heatmaps, g.const(f"last{i}_start",
                                                         np.array([n - 1], np.int64)),
                                       g.const(f"last{i}_end", np.array([n], np.int64)),
                                       g.const(f"last{i}_axis", np.array([1], np.int64))],
                             f"last_heatmap{i}")
        above = g.op("Greater", [boundary_last, g.const(f"threshold{i}", np.array(
            BOUNDARY_THRESHOLD, np.float32))], f"boundary{i}_bool")
        boundary = g.op("Cast", [above], f"boundary{i}", to=g.onnx.TensorProto.FLOAT)
        # The features keep their own convolution (ONNX Runtime runs it in its blocked layout);
        # the maps' three share one over their concatenation.
        maps = [(heatmaps, f"merge_heatmaps{i}")]
        if model.use_aam:
          maps += [(pointmaps, f"merge_pointmaps{i}"), (edgemaps, f"merge_edgemaps{i}")]
        stacked = (g.op("Concat", [m for m, _ in maps], f"merge_maps{i}_in", axis=1)
                   if len(maps) > 1 else heatmaps)
        kernel = np.concatenate([p.param(f"{name}/kernel") for _, name in maps], axis=2)
        bias = np.sum([p.param(f"{name}/bias").astype(np.float64) for _, name in maps], axis=0)
        merged = g.op("Add", [x, self.plain_conv(feature, f"merge_features{i}")],
                      f"merge_features{i}_sum")
        x = g.op("Add", [merged, self.conv(stacked, kernel, bias, f"merge_maps{i}")],
                 f"stack{i + 1}_in")

    landmarks = self.soft_argmax_pixels(fused, "soft_argmax")
    heatmaps_out = None
    if with_heatmaps:
      heatmaps_out = g.op("Transpose", [fused], contract.HEATMAPS_NAME, perm=[0, 2, 3, 1])
    p.check_all_used()
    return landmarks, heatmaps_out


def build_model(model: StackedHourglass, variables: Mapping[str, Any], image_size: int, *,
                with_heatmaps: bool = False, weight_dtype: str = "float32",
                batch: int | None = None, doc: str = "") -> Any:
  """The `onnx.ModelProto` of the contract (see `star_jax.deploy.runtime.contract`).

  `weight_dtype='float16'` stores the large tensors in float16 (half the file; computation stays
  float32). `batch=None` leaves the batch dimension symbolic.
  """
  import onnx
  factor = 4 * 2 ** model.num_levels
  if image_size % factor:
    raise ValueError(f"image size {image_size} is not divisible by {factor}")
  builder = _Builder(model, variables, image_size, np.dtype(weight_dtype))
  landmarks, heatmaps = builder.build(with_heatmaps)
  batch_dim = "batch" if batch is None else int(batch)
  helper = onnx.helper
  inputs = [helper.make_tensor_value_info(contract.INPUT_NAME, onnx.TensorProto.FLOAT,
                                          [batch_dim, image_size, image_size, 3])]
  outputs = [helper.make_tensor_value_info(landmarks, onnx.TensorProto.FLOAT,
                                           [batch_dim, model.num_points, 2])]
  if heatmaps is not None:
    side = image_size // 4
    outputs.append(helper.make_tensor_value_info(heatmaps, onnx.TensorProto.FLOAT,
                                                 [batch_dim, side, side, model.num_points]))
  graph = helper.make_graph(builder.g.nodes, "star_jax_landmarks", inputs, outputs,
                            builder.g.initializers)
  proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                            producer_name="star-jax", doc_string=doc)
  proto.ir_version = IR_VERSION
  onnx.checker.check_model(proto, full_check=True)
  return proto
