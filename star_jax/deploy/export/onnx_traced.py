"""The ONNX graph of any backbone, traced from its JAX program (the route for networks without
a hand-written graph writer, `onnx_graph = None` in the backbone contract).

The export function of the contract (`jax_formats.contract_function`: 0-255 NHWC crops in,
landmarks in crop pixels out) is traced to a jaxpr at a fixed batch, and each equation becomes
standard opset-17 ONNX nodes. Everything that depends only on the weights and on constants
(coordinate grids, `iota`, folded arithmetic on parameters) is evaluated at export time and
stored as an initializer, so the graph holds only the computation on the image. Nested programs
(`pjit`, custom derivatives, `remat`) are inlined.

Layout: JAX convolutions run on NHWC with HWIO kernels, ONNX's on NCHW with OIHW kernels. Each
traced value therefore carries an optional permutation: the ONNX tensor is
`transpose(logical value, perm)`. A `Conv` reads its input in NCHW and leaves its output there;
elementwise operators, casts, `select_n` and `clamp` work in the layout of their operands
(constants are transposed at export time, scalars broadcast as they are; an operand in another
layout gets one `Transpose`); gathers, slices, pads, concatenations, reductions, pooling,
`transpose` and the reshapes that only merge or split axes adjacent in the stored order map
their axes through the permutation. The logical layout is materialised (one `Transpose`, cached
per value) only where a consumer has no such rule, and for the graph's outputs. A reshape of a
map to its (pixels, channels) rows followed by a product with a constant matrix, as the models
write 1x1 convolutions, becomes a 1x1 `Conv`, and the rows keep the map's layout until they are
reshaped back. Any other `dot_general` is an `Einsum` over the stored layouts.

After tracing, per-channel constant `Add`/`Sub`/`Mul`/`Div` that directly follow a `Conv` whose
output has no other consumer (BatchNorm at inference, a bias) are folded into that `Conv`'s
weights and bias, and `max(x, 0)` is a `Relu`, so ONNX Runtime sees Conv -> Relu chains it
fuses. The bilinear upsampling of the models (constant-index gathers along W then H, mixed with
constant weights) becomes one `Resize` where its indices and weights are those of `Resize`
(linear, half_pixel: torch's `align_corners=False`).

A primitive outside the supported set is one UsageError naming it: the export then needs a
hand-written graph (`star_jax.deploy.export.onnx_graph` is the hourglass's) or one of the
traced formats (TFLite, SavedModel, StableHLO). Parity with the JAX model is tested in
tests/test_backbone_contract.py, tests/test_export.py and tests/test_onnx_traced.py.
"""

from __future__ import annotations

import collections
import math
import string
from typing import Any, Callable, Mapping

import jax
import jax.extend
import numpy as np

from star_jax.deploy.runtime import contract
from star_jax.errors import UsageError

OPSET = 17
IR_VERSION = 8
# Float constants with more elements than this are stored in float16 when asked.
_HALF_MIN_SIZE = 1024

_ELEMENTWISE = {
    "add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max", "min": "Min",
    "pow": "Pow", "neg": "Neg", "exp": "Exp", "log": "Log", "tanh": "Tanh", "logistic": "Sigmoid",
    "sqrt": "Sqrt", "abs": "Abs", "sign": "Sign", "floor": "Floor", "ceil": "Ceil",
    "erf": "Erf", "sin": "Sin", "cos": "Cos", "gt": "Greater", "lt": "Less",
    "ge": "GreaterOrEqual", "le": "LessOrEqual", "eq": "Equal", "and": "And", "or": "Or",
    "not": "Not",
}
_INLINED = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
            "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
            "custom_vjp_call_jaxpr": "fun_jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr",
            "custom_lin": None}
_IDENTITY = {"copy", "copy_p", "reduce_precision", "optimization_barrier", "stop_gradient"}
# Operators with a constant operand that can be folded into the Conv they follow.
_AFFINE = ("Add", "Sub", "Mul", "Div")


def _onnx_dtype(dtype: np.dtype) -> int:
  import onnx
  return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _inverse(perm) -> list[int]:
  inverse = [0] * len(perm)
  for position, axis in enumerate(perm):
    inverse[axis] = position
  return inverse


def _layout(perm) -> tuple[int, ...] | None:
  """`perm` as a tuple, None for the identity (the logical layout)."""
  if perm is None:
    return None
  perm = tuple(int(a) for a in perm)
  return None if perm == tuple(range(len(perm))) else perm


def _reshape_groups(a: tuple, b: tuple) -> list[tuple[list[int], list[int]]] | None:
  """The smallest groups of consecutive axes of shape `a` and of shape `b` with equal sizes
  (a reshape merges or splits within each group), or None (empty shapes, zero sizes)."""
  if not a or not b or 0 in a or 0 in b:
    return None
  groups, i, j = [], 0, 0
  while i < len(a) and j < len(b):
    ins, outs, size_in, size_out = [i], [j], a[i], b[j]
    i, j = i + 1, j + 1
    while size_in != size_out:
      if size_in < size_out:
        if i == len(a):
          return None
        size_in, i = size_in * a[i], i + 1
        ins.append(i - 1)
      else:
        if j == len(b):
          return None
        size_out, j = size_out * b[j], j + 1
        outs.append(j - 1)
    groups.append((ins, outs))
  rest_in, rest_out = list(range(i, len(a))), list(range(j, len(b)))
  if any(a[k] != 1 for k in rest_in) or any(b[k] != 1 for k in rest_out):
    return None
  groups[-1] = (groups[-1][0] + rest_in, groups[-1][1] + rest_out)
  return groups


def _stored_reshape(perm: tuple, in_shape: tuple, out_shape: tuple) -> list[int] | None:
  """The layout of `reshape(x, out_shape)` done on the stored tensor of `x` (layout `perm`), or
  None when some merged or split group of axes is not adjacent and in order there."""
  groups = _reshape_groups(in_shape, out_shape)
  if groups is None:
    return None
  placed = []
  for ins, outs in groups:
    positions = [perm.index(a) for a in ins]
    if positions != list(range(positions[0], positions[0] + len(positions))):
      return None
    placed.append((positions[0], outs))
  return [a for _, outs in sorted(placed) for a in outs]


class _Permuted:
  """A traced value stored transposed: the ONNX tensor `name` is `transpose(value, perm)`."""

  __slots__ = ("name", "perm")

  def __init__(self, name: str, perm: tuple[int, ...]):
    self.name, self.perm = name, perm


class _Rows:
  """`map.reshape(-1, C)`: the (pixels, channels) matrix of a traced map of logical shape
  `shape` (..., C), kept as the map itself (any layout) so that a product with a constant
  matrix is a 1x1 convolution and the reshape back to `shape` is free."""

  __slots__ = ("map", "shape")

  def __init__(self, map_: Any, shape: tuple[int, ...]):
    self.map, self.shape = map_, tuple(int(d) for d in shape)


def _is_tensor(value: Any) -> bool:
  """An ONNX value (as opposed to a numpy constant known at export time)."""
  return isinstance(value, (str, _Permuted, _Rows))


class _Graph:
  """Nodes and initializers under construction; `values` holds the float32 (or integer) value
  of every constant by the name the nodes read it under (the folding reads them back)."""

  def __init__(self, weight_dtype: np.dtype):
    self.nodes: list[Any] = []
    self.prologue: list[Any] = []  # Casts of float16 initializers, ahead of every reader
    self.initializers: list[Any] = []
    self.values: dict[str, np.ndarray] = {}
    # Gather output -> (its axis, the stored shape of its input), for `_resize_upsampling`.
    self.gathers: dict[str, tuple[int, tuple[int, ...]]] = {}
    self.weight_dtype = weight_dtype
    self._count = 0

  def name(self, hint: str) -> str:
    self._count += 1
    return f"{hint}_{self._count}"

  def node(self, op: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
    import onnx
    out = self.name(hint or op.lower())
    self.nodes.append(onnx.helper.make_node(op, inputs, [out], **attrs))
    return out

  def constant(self, value: np.ndarray, hint: str = "const") -> str:
    import onnx
    value = np.asarray(value)
    if value.dtype == np.float64:
      value = value.astype(np.float32)
    half = (self.weight_dtype == np.float16 and value.dtype == np.float32
            and value.size > _HALF_MIN_SIZE)
    name = self.name(hint)
    stored = value.astype(np.float16) if half else value
    self.initializers.append(onnx.numpy_helper.from_array(np.ascontiguousarray(stored), name))
    if half:
      out = self.name(hint)
      self.prologue.append(onnx.helper.make_node("Cast", [name], [out],
                                                 to=onnx.TensorProto.FLOAT))
      name = out
    self.values[name] = value
    return name

  def shape(self, dims) -> str:
    return self.constant(np.asarray(list(dims), np.int64), "shape")


class _Tracer:
  """Translates jaxpr equations; `env` maps a jaxpr variable to a numpy constant, the name of
  an ONNX value in the logical layout, a `_Permuted` or a `_Rows`."""

  def __init__(self, graph: _Graph):
    self.g = graph
    self._views: dict[tuple, str] = {}  # (stored name, permutation) -> its Transpose

  def value(self, env: dict, var: Any) -> Any:
    if isinstance(var, jax.extend.core.Literal):
      return np.asarray(var.val)
    return env[var]

  @staticmethod
  def layout(value: Any) -> tuple[int, ...] | None:
    return value.perm if isinstance(value, _Permuted) else None

  @staticmethod
  def wrap(name: str, perm) -> Any:
    perm = _layout(perm)
    return name if perm is None else _Permuted(name, perm)

  def stored(self, value: Any) -> Any:
    """`value` as a str or `_Permuted` (rows become their logical matrix)."""
    return self.name(value) if isinstance(value, _Rows) else value

  def physical(self, value: Any, perm) -> str:
    """The ONNX name of `value` laid out as `transpose(value, perm)` (None: logical)."""
    perm = _layout(perm)
    value = self.stored(value)
    if not _is_tensor(value):
      array = np.asarray(value)
      return self.g.constant(array if perm is None else np.transpose(array, perm))
    current = self.layout(value)
    base = value.name if isinstance(value, _Permuted) else value
    if current == perm:
      return base
    rank = len(current or perm)
    have, want = current or tuple(range(rank)), perm or tuple(range(rank))
    # Keyed by the stored tensor and the permutation applied to it: after a `transpose` one
    # stored tensor stands for several values.
    key = (base, tuple(have.index(a) for a in want))
    if key not in self._views:
      self._views[key] = self.g.node("Transpose", [base], perm=list(key[1]))
    return self._views[key]

  def name(self, value: Any) -> str:
    """The ONNX name of `value` in its logical layout."""
    if isinstance(value, _Rows):
      logical = self.physical(value.map, None)
      key = (logical, "rows")
      if key not in self._views:
        rows = (math.prod(value.shape[:-1]), value.shape[-1])
        self._views[key] = self.g.node("Reshape", [logical, self.g.shape(rows)])
      return self._views[key]
    if _is_tensor(value):
      return self.physical(value, None)
    return self.g.constant(value)

  def run(self, jaxpr: Any, consts: list[Any], args: list[Any]) -> list[Any]:
    env: dict = {}
    for var, value in zip(jaxpr.constvars, consts):
      env[var] = np.asarray(value)
    for var, value in zip(jaxpr.invars, args):
      env[var] = value
    for eqn in jaxpr.eqns:
      inputs = [self.value(env, v) for v in eqn.invars]
      outputs = self.equation(eqn, inputs)
      for var, value in zip(eqn.outvars, outputs):
        env[var] = value
    return [self.value(env, v) for v in jaxpr.outvars]

  def equation(self, eqn: Any, inputs: list[Any]) -> list[Any]:
    name = eqn.primitive.name
    if name in _INLINED:
      key = _INLINED[name]
      inner = eqn.params.get(key) if key else None
      if inner is None:
        inner = next((v for v in eqn.params.values() if hasattr(v, "jaxpr") or
                      hasattr(v, "eqns")), None)
      if inner is None:
        raise UsageError(f"ONNX export: cannot inline the JAX primitive {name!r}")
      if hasattr(inner, "consts"):
        return self.run(inner.jaxpr, list(inner.consts), inputs[:len(inner.jaxpr.invars)])
      return self.run(inner, [], inputs[:len(inner.invars)])
    if not any(_is_tensor(v) for v in inputs):
      # Only constants in: evaluate now (weights, grids, iota, arithmetic on parameters).
      results = eqn.primitive.bind(*[jax.numpy.asarray(v) for v in inputs], **eqn.params)
      results = results if eqn.primitive.multiple_results else [results]
      return [np.asarray(r) for r in results]
    emit = getattr(self, f"_{name}", None)
    if emit is None and name in _ELEMENTWISE:
      return [self.elementwise(_ELEMENTWISE[name], eqn, inputs)]
    if name in _IDENTITY:
      return list(inputs)
    if emit is None:
      raise UsageError(f"ONNX export: the JAX primitive {name!r} has no ONNX translation in "
                       "the traced route; export this network as tflite, savedmodel or stablehlo")
    out = emit(eqn, inputs)
    return out if isinstance(out, list) else [out]

  # Elementwise operators, in the layout of their operands.
  def elementwise(self, op: str, eqn: Any, inputs: list[Any], **attrs) -> Any:
    return self.apply(op, inputs, [tuple(v.aval.shape) for v in eqn.invars],
                      tuple(eqn.outvars[0].aval.shape), **attrs)

  def unary(self, op: str, value: Any, shape: tuple, **attrs) -> Any:
    return self.apply(op, [value], [tuple(shape)], tuple(shape), **attrs)

  def apply(self, op: str, inputs: list[Any], shapes: list[tuple], out_shape: tuple,
            **attrs) -> Any:
    """ONNX `op` (numpy broadcasting) on `inputs` of logical `shapes`, in the layout most of
    its tensor operands already have."""
    if any(isinstance(v, _Rows) for v in inputs):
      lifted = self._lift_rows(inputs, shapes, out_shape)
      if lifted is not None:
        values, value_shapes, map_shape = lifted
        return _Rows(self.apply(op, values, value_shapes, map_shape, **attrs), map_shape)
      inputs = [self.stored(v) for v in inputs]
    rank = len(out_shape)
    if any(len(s) not in (0, rank) for s in shapes):
      perm = None
    else:
      perm = self._common_layout([self.layout(v) for v, s in zip(inputs, shapes)
                                  if _is_tensor(v) and len(s) == rank])
    names = []
    for value, shape in zip(inputs, shapes):
      if not shape:  # a scalar broadcasts in any layout
        names.append(value.name if isinstance(value, _Permuted) else
                     value if isinstance(value, str) else self.g.constant(value))
      else:
        names.append(self.physical(value, perm))
    return self.wrap(self.g.node(op, names, **attrs), perm)

  @staticmethod
  def _common_layout(layouts: list) -> tuple | None:
    if not layouts:
      return None
    counts = collections.Counter(layouts)
    # The most common layout (fewest Transposes); a tie goes to a stored (non-logical) one.
    return max(counts, key=lambda p: (counts[p], p is not None))

  @staticmethod
  def _lift_rows(inputs, shapes, out_shape):
    """Operands of an elementwise op on rows, as operands on the rows' maps (constants of
    shape (1, C) or (pixels, C) reshaped to the map's), or None when they do not fit."""
    first = next(v for v in inputs if isinstance(v, _Rows))
    pixels, channels = math.prod(first.shape[:-1]), first.shape[-1]
    if tuple(out_shape) != (pixels, channels):
      return None
    values, value_shapes = [], []
    for value, shape in zip(inputs, shapes):
      if isinstance(value, _Rows):
        if value.shape != first.shape:
          return None
        values.append(value.map)
        value_shapes.append(first.shape)
      elif not shape:
        values.append(value)
        value_shapes.append(())
      elif not _is_tensor(value) and len(shape) == 2 and shape[0] in (1, pixels):
        leading = (1,) * (len(first.shape) - 1) if shape[0] == 1 else first.shape[:-1]
        values.append(np.asarray(value).reshape(leading + (shape[1],)))
        value_shapes.append(leading + (shape[1],))
      else:
        return None
    return values, value_shapes, first.shape

  def _max(self, eqn, inputs):
    # max(x, 0) as Relu, the activation ONNX Runtime fuses into the Conv before it.
    index = 0 if _is_tensor(inputs[0]) else 1
    x, other = inputs[index], inputs[1 - index]
    out_shape = tuple(eqn.outvars[0].aval.shape)
    if (not _is_tensor(other) and np.size(other) == 1 and not np.any(other)
        and np.issubdtype(eqn.outvars[0].aval.dtype, np.floating)
        and tuple(eqn.invars[index].aval.shape) == out_shape):
      return self.unary("Relu", x, out_shape)
    return self.elementwise("Max", eqn, inputs)

  def _ne(self, eqn, inputs):
    shape = tuple(eqn.outvars[0].aval.shape)
    return self.unary("Not", self.elementwise("Equal", eqn, inputs), shape)

  def _rem(self, eqn, inputs):
    # lax.rem takes the dividend's sign (C fmod), as ONNX Mod with fmod=1.
    return self.elementwise("Mod", eqn, inputs, fmod=1)

  def _integer_pow(self, eqn, inputs):
    x, y = inputs[0], int(eqn.params["y"])
    shape = tuple(eqn.invars[0].aval.shape)
    if y == 2:
      return self.apply("Mul", [x, x], [shape, shape], shape)
    dtype = eqn.invars[0].aval.dtype
    return self.apply("Pow", [x, np.asarray(y, dtype)], [shape, ()], shape)

  def _square(self, eqn, inputs):
    shape = tuple(eqn.invars[0].aval.shape)
    return self.apply("Mul", [inputs[0], inputs[0]], [shape, shape], shape)

  def _rsqrt(self, eqn, inputs):
    shape = tuple(eqn.invars[0].aval.shape)
    return self.unary("Reciprocal", self.unary("Sqrt", inputs[0], shape), shape)

  def _exp2(self, eqn, inputs):
    shape = tuple(eqn.invars[0].aval.shape)
    two = np.asarray(2, eqn.invars[0].aval.dtype)
    return self.apply("Pow", [two, inputs[0]], [(), shape], shape)

  def _log1p(self, eqn, inputs):
    shape = tuple(eqn.invars[0].aval.shape)
    one = np.asarray(1, eqn.invars[0].aval.dtype)
    return self.unary("Log", self.apply("Add", [inputs[0], one], [shape, ()], shape), shape)

  def _expm1(self, eqn, inputs):
    shape = tuple(eqn.invars[0].aval.shape)
    one = np.asarray(1, eqn.invars[0].aval.dtype)
    return self.apply("Sub", [self.unary("Exp", inputs[0], shape), one], [shape, ()], shape)

  def _convert_element_type(self, eqn, inputs):
    return self.unary("Cast", inputs[0], tuple(eqn.invars[0].aval.shape),
                      to=_onnx_dtype(eqn.params["new_dtype"]))

  def _select_n(self, eqn, inputs):
    if len(inputs) != 3:
      raise UsageError("ONNX export: select_n with more than two cases is not supported")
    shapes = [tuple(v.aval.shape) for v in eqn.invars]
    predicate = inputs[0]
    if eqn.invars[0].aval.dtype != np.bool_:
      predicate = (self.unary("Cast", predicate, shapes[0], to=_onnx_dtype(np.bool_))
                   if _is_tensor(predicate) else np.asarray(predicate).astype(np.bool_))
    return self.apply("Where", [predicate, inputs[2], inputs[1]],
                      [shapes[0], shapes[2], shapes[1]], tuple(eqn.outvars[0].aval.shape))

  def _clamp(self, eqn, inputs):
    low, x, high = inputs
    shapes = [tuple(v.aval.shape) for v in eqn.invars]
    out = tuple(eqn.outvars[0].aval.shape)
    return self.apply("Max", [self.apply("Min", [x, high], [shapes[1], shapes[2]], out), low],
                      [out, shapes[0]], out)

  # Shape operators.
  def _reshape(self, eqn, inputs):
    if eqn.params.get("dimensions"):
      raise UsageError("ONNX export: reshape with a dimension order is not supported")
    return self.reshape(inputs[0], eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape)

  def _squeeze(self, eqn, inputs):
    return self.reshape(inputs[0], eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape)

  _expand_dims = _squeeze

  def reshape(self, value: Any, in_shape, out_shape) -> Any:
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    if isinstance(value, _Rows):
      if out_shape == value.shape:
        return value.map
      value = self.stored(value)
    elif len(in_shape) >= 3 and out_shape == (math.prod(in_shape[:-1]), in_shape[-1]):
      return _Rows(value, in_shape)
    perm = self.layout(value)
    if perm is not None:
      order = _stored_reshape(perm, in_shape, out_shape)
      if order is not None:
        stored_shape = self.g.shape([out_shape[a] for a in order])
        return self.wrap(self.g.node("Reshape", [value.name, stored_shape]), order)
    return self.g.node("Reshape", [self.name(value), self.g.shape(out_shape)])

  def _broadcast_in_dim(self, eqn, inputs):
    shape = tuple(eqn.outvars[0].aval.shape)
    dims = [int(d) for d in eqn.params["broadcast_dimensions"]]
    operand_shape = tuple(eqn.invars[0].aval.shape)
    value = self.stored(inputs[0])
    perm = self.layout(value) or tuple(range(len(operand_shape)))
    # The operand's axes keep their stored order; each new axis goes right after the axis
    # before it, so that a later reshape merging the two stays on the stored tensor.
    order = [dims[a] for a in perm]
    for axis in range(len(shape)):
      if axis not in dims:
        order.insert(order.index(axis - 1) + 1 if axis > 0 else 0, axis)
    keep = [operand_shape[dims.index(a)] if a in dims else 1 for a in order]
    x = value.name if isinstance(value, _Permuted) else value
    if keep != [operand_shape[a] for a in perm]:
      x = self.g.node("Reshape", [x, self.g.shape(keep)])
    out = [shape[a] for a in order]
    if out != keep:
      x = self.g.node("Expand", [x, self.g.shape(out)])
    return self.wrap(x, order)

  def _transpose(self, eqn, inputs):
    # No node: the result is the same tensor in another layout.
    value = self.stored(inputs[0])
    permutation = [int(p) for p in eqn.params["permutation"]]
    perm = self.layout(value) or tuple(range(len(permutation)))
    inverse = _inverse(permutation)
    base = value.name if isinstance(value, _Permuted) else value
    return self.wrap(base, [inverse[a] for a in perm])

  def _reduce(self, op, eqn, inputs):
    axes = [int(a) for a in eqn.params["axes"]]
    value = self.stored(inputs[0])
    stored_axes, perm = self._reduced(value, axes, len(eqn.invars[0].aval.shape))
    base = value.name if isinstance(value, _Permuted) else value
    if op == "ReduceSum":
      return self.wrap(self.g.node(op, [base, self.g.shape(stored_axes)], keepdims=0), perm)
    return self.wrap(self.g.node(op, [base], axes=stored_axes, keepdims=0), perm)

  def _reduced(self, value, axes, rank) -> tuple[list[int], list[int]]:
    """(the stored axes of logical `axes`, the layout of the result without them)."""
    perm = self.layout(value) or tuple(range(rank))
    kept = [a for a in range(rank) if a not in axes]
    return sorted(perm.index(a) for a in axes), [kept.index(a) for a in perm if a not in axes]

  def _reduce_sum(self, eqn, inputs):
    return self._reduce("ReduceSum", eqn, inputs)

  def _reduce_max(self, eqn, inputs):
    return self._reduce("ReduceMax", eqn, inputs)

  def _reduce_min(self, eqn, inputs):
    return self._reduce("ReduceMin", eqn, inputs)

  def _arg(self, op, eqn, inputs):
    (axis,) = eqn.params["axes"]
    value = self.stored(inputs[0])
    (stored_axis,), perm = self._reduced(value, [int(axis)], len(eqn.invars[0].aval.shape))
    base = value.name if isinstance(value, _Permuted) else value
    index = self.g.node(op, [base], axis=stored_axis, keepdims=0)
    return self.wrap(self.g.node("Cast", [index], to=_onnx_dtype(eqn.params["index_dtype"])),
                     perm)

  def _argmax(self, eqn, inputs):
    return self._arg("ArgMax", eqn, inputs)

  def _argmin(self, eqn, inputs):
    return self._arg("ArgMin", eqn, inputs)

  def concatenate(self, inputs: list[Any], axis: int) -> Any:
    inputs = [self.stored(v) for v in inputs]
    perm = self._common_layout([self.layout(v) for v in inputs if _is_tensor(v)])
    names = [self.physical(v, perm) for v in inputs]
    return self.wrap(self.g.node("Concat", names, axis=perm.index(axis) if perm else axis), perm)

  def _concatenate(self, eqn, inputs):
    return self.concatenate(inputs, int(eqn.params["dimension"]))

  def _stack(self, eqn, inputs):
    axis = int(eqn.params["axis"])
    shape = tuple(eqn.invars[0].aval.shape)
    expanded = shape[:axis] + (1,) + shape[axis:]
    parts = [self.reshape(v, shape, expanded) if _is_tensor(v) else np.reshape(v, expanded)
             for v in inputs]
    return self.concatenate(parts, axis)

  def _slice(self, eqn, inputs):
    value = self.stored(inputs[0])
    starts = eqn.params["start_indices"]
    ends = eqn.params["limit_indices"]
    steps = eqn.params["strides"] or [1] * len(starts)
    perm = self.layout(value) or tuple(range(len(starts)))
    base = value.name if isinstance(value, _Permuted) else value
    pick = lambda values: self.g.shape([values[a] for a in perm])
    return self.wrap(self.g.node("Slice", [base, pick(starts), pick(ends),
                                           self.g.shape(range(len(starts))), pick(steps)]), perm)

  def _split(self, eqn, inputs):
    import onnx
    value = self.stored(inputs[0])
    axis = int(eqn.params["axis"])
    sizes = [int(s) for s in eqn.params["sizes"]]
    perm = self.layout(value)
    base = value.name if isinstance(value, _Permuted) else value
    names = [self.g.name("split") for _ in sizes]
    self.g.nodes.append(onnx.helper.make_node("Split", [base, self.g.shape(sizes)], names,
                                              axis=perm.index(axis) if perm else axis))
    return [self.wrap(n, perm) for n in names]

  def _pad(self, eqn, inputs):
    config = eqn.params["padding_config"]
    if any(interior for _, _, interior in config) or any(lo < 0 or hi < 0
                                                         for lo, hi, _ in config):
      raise UsageError("ONNX export: pad with interior or negative padding is not supported")
    value = self.stored(inputs[0])
    perm = self.layout(value) or tuple(range(len(config)))
    base = value.name if isinstance(value, _Permuted) else value
    pads = [config[a][0] for a in perm] + [config[a][1] for a in perm]
    return self.wrap(self.g.node("Pad", [base, self.g.shape(pads), self.name(inputs[1])]), perm)

  # Products and convolutions.
  def _dot_general(self, eqn, inputs):
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
    lhs_value, rhs_value = inputs
    kernel = np.asarray(rhs_value) if not _is_tensor(rhs_value) else None
    if (isinstance(lhs_value, _Rows) and kernel is not None and kernel.ndim == 2
        and tuple(lhs_contract) == (1,) and tuple(rhs_contract) == (0,) and not lhs_batch
        and kernel.dtype == eqn.outvars[0].aval.dtype
        and np.issubdtype(kernel.dtype, np.floating)):
      return self._pointwise_conv(lhs_value, kernel)
    lhs_rank, rhs_rank = len(eqn.invars[0].aval.shape), len(eqn.invars[1].aval.shape)
    letters = iter(string.ascii_lowercase)
    lhs = [next(letters) for _ in range(lhs_rank)]
    rhs = [None] * rhs_rank
    for left, right in zip(lhs_batch, rhs_batch):
      rhs[right] = lhs[left]
    for left, right in zip(lhs_contract, rhs_contract):
      rhs[right] = lhs[left]
    rhs = [r or next(letters) for r in rhs]
    batch = [lhs[i] for i in lhs_batch]
    lhs_free = [lhs[i] for i in range(lhs_rank) if i not in lhs_batch and i not in lhs_contract]
    rhs_free = [rhs[i] for i in range(rhs_rank) if i not in rhs_batch and i not in rhs_contract]
    # Each operand is read in its stored layout: its subscripts follow that order.
    operands, subscripts = [], []
    for value, axes in ((lhs_value, lhs), (rhs_value, rhs)):
      value = self.stored(value)
      perm = self.layout(value) or tuple(range(len(axes)))
      operands.append(value.name if isinstance(value, _Permuted) else self.name(value))
      subscripts.append("".join(axes[a] for a in perm))
    equation = f"{subscripts[0]},{subscripts[1]}->{''.join(batch + lhs_free + rhs_free)}"
    return self.g.node("Einsum", operands, equation=equation)

  def _pointwise_conv(self, rows: _Rows, kernel: np.ndarray) -> _Rows:
    """`rows @ kernel` as a 1x1 Conv on the rows' map (channel-first)."""
    rank = len(rows.shape)
    channel_first = (0, rank - 1) + tuple(range(1, rank - 1))
    x = self.physical(rows.map, channel_first)
    weights = np.transpose(kernel).reshape(kernel.shape[1], kernel.shape[0], *[1] * (rank - 2))
    y = self.g.node("Conv", [x, self.g.constant(weights, "kernel")],
                    kernel_shape=[1] * (rank - 2))
    return _Rows(self.wrap(y, channel_first), rows.shape[:-1] + (kernel.shape[1],))

  def _conv_general_dilated(self, eqn, inputs):
    params = eqn.params
    if any(d != 1 for d in params["lhs_dilation"]) or params["batch_group_count"] != 1:
      raise UsageError("ONNX export: transposed or batch-grouped convolutions are not supported")
    numbers = params["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = numbers.lhs_spec, numbers.rhs_spec, numbers.out_spec
    # lhs_spec lists the logical axes in (N, C, spatial...) order: read the input in it.
    x = self.physical(inputs[0], lhs_spec)
    kernel = inputs[1]
    if _is_tensor(kernel):
      kernel = self.physical(kernel, rhs_spec)
    else:
      kernel = self.g.constant(np.transpose(kernel, rhs_spec), "kernel")
    padding = [int(lo) for lo, _ in params["padding"]] + [int(hi) for _, hi in params["padding"]]
    y = self.g.node("Conv", [x, kernel], strides=[int(s) for s in params["window_strides"]],
                    pads=padding, dilations=[int(d) for d in params["rhs_dilation"]],
                    group=int(params["feature_group_count"]))
    # y is laid out (N, C, spatial...) = transpose(output, out_spec): it stays there.
    return self.wrap(y, out_spec)

  def _gather(self, eqn, inputs):
    """`jnp.take(x, constant indices, axis)`: ONNX `Gather` along that axis;
    `jnp.take_along_axis(x, indices, -1)`: `GatherElements`."""
    numbers = eqn.params["dimension_numbers"]
    indices = inputs[1]
    shape = eqn.invars[0].aval.shape
    if self._is_take_along_last_axis(eqn):
      out_shape = eqn.outvars[0].aval.shape
      index = self.g.node("Reshape", [self.name(indices), self.g.shape(out_shape)])
      index = self.g.node("Cast", [index], to=_onnx_dtype(np.int64))
      return self.g.node("GatherElements", [self.name(inputs[0]), index],
                         axis=len(shape) - 1)
    axes = tuple(numbers.collapsed_slice_dims)
    simple = (not _is_tensor(indices) and len(axes) == 1
              and tuple(numbers.start_index_map) == axes
              and not getattr(numbers, "operand_batching_dims", ())
              and indices.shape[-1:] == (1,))
    if simple:
      (axis,) = axes
      sizes = eqn.params["slice_sizes"]
      simple = all(sizes[i] == (1 if i == axis else shape[i]) for i in range(len(shape)))
      expected = shape[:axis] + indices.shape[:-1] + shape[axis + 1:]
      simple = simple and tuple(eqn.outvars[0].aval.shape) == tuple(expected)
    if not simple:
      raise UsageError("ONNX export: only gathers of constant indices along one axis "
                       "(jnp.take) are supported")
    index = self.g.constant(np.asarray(indices[..., 0], np.int64), "indices")
    value = self.stored(inputs[0])
    if indices.ndim != 2:
      return self.g.node("Gather", [self.name(value), index], axis=int(axis))
    # One index axis: the rank and layout stay.
    perm = self.layout(value) or tuple(range(len(shape)))
    base = value.name if isinstance(value, _Permuted) else value
    out = self.g.node("Gather", [base, index], axis=perm.index(axis))
    self.g.gathers[out] = (perm.index(axis), tuple(int(shape[a]) for a in perm))
    return self.wrap(out, perm)

  @staticmethod
  def _is_take_along_last_axis(eqn) -> bool:
    numbers = eqn.params["dimension_numbers"]
    rank = len(eqn.invars[0].aval.shape)
    leading = tuple(range(rank - 1))
    return (tuple(numbers.collapsed_slice_dims) == (rank - 1,)
            and tuple(numbers.start_index_map) == (rank - 1,)
            and tuple(getattr(numbers, "operand_batching_dims", ())) == leading
            and tuple(getattr(numbers, "start_indices_batching_dims", ())) == leading
            and tuple(numbers.offset_dims) == ()
            and all(size == 1 for size in eqn.params["slice_sizes"])
            and len(eqn.outvars[0].aval.shape) == rank
            and tuple(eqn.invars[1].aval.shape) == tuple(eqn.outvars[0].aval.shape) + (1,))

  def _reduce_window_max(self, eqn, inputs):
    return self._pool("MaxPool", eqn, inputs)

  def _pool(self, op, eqn, inputs):
    params = eqn.params
    window, strides = params["window_dimensions"], params["window_strides"]
    padding = params["padding"]
    if window[0] != 1 or window[-1] != 1 or strides[0] != 1 or strides[-1] != 1 or any(
        d != 1 for d in params.get("base_dilation", ()) + params.get("window_dilation", ())):
      raise UsageError("ONNX export: only spatial pooling of NHWC maps is supported")
    rank = len(window)
    channel_first = (0, rank - 1) + tuple(range(1, rank - 1))
    x = self.physical(inputs[0], channel_first)
    pads = [int(lo) for lo, _ in padding[1:-1]] + [int(hi) for _, hi in padding[1:-1]]
    y = self.g.node(op, [x], kernel_shape=[int(w) for w in window[1:-1]],
                    strides=[int(s) for s in strides[1:-1]], pads=pads)
    return self.wrap(y, channel_first)


def _fold_into_convolutions(graph: _Graph) -> None:
  """Folds each per-channel constant Add/Sub/Mul/Div that is the only consumer of a Conv's
  output into that Conv's weights and bias (repeatedly: BatchNorm is a Sub, a Mul and an Add)."""
  consumers: dict[str, list[Any]] = collections.defaultdict(list)
  for node in graph.nodes:
    for name in node.input:
      consumers[name].append(node)
  removed: set[int] = set()
  for conv in graph.nodes:
    if conv.op_type != "Conv" or id(conv) in removed:
      continue
    kernel = graph.values.get(conv.input[1])
    has_bias = len(conv.input) > 2 and conv.input[2]
    bias = graph.values.get(conv.input[2]) if has_bias else None
    if kernel is None or kernel.dtype != np.float32 or (has_bias and bias is None):
      continue
    # The folded constants are computed in float64 and rounded once.
    kernel = kernel.astype(np.float64)
    bias = np.zeros(kernel.shape[0]) if bias is None else bias.astype(np.float64)
    folded = False
    while True:
      users = consumers.get(conv.output[0], [])
      if len(users) != 1:
        break
      step = _affine_step(graph, conv.output[0], users[0], kernel, bias)
      if step is None:
        break
      kernel, bias = step
      removed.add(id(users[0]))
      conv.output[0] = users[0].output[0]
      folded = True
    if folded:
      conv.input[1] = graph.constant(kernel.astype(np.float32), "kernel")
      bias_name = graph.constant(bias.astype(np.float32), "bias")
      if has_bias:
        conv.input[2] = bias_name
      else:
        conv.input.append(bias_name)
  graph.nodes = [node for node in graph.nodes if id(node) not in removed]


def _affine_step(graph: _Graph, output: str, user: Any, kernel: np.ndarray, bias: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray] | None:
  """(kernel, bias) of the Conv with `user` (reading the Conv's `output`) folded in, or None
  when `user` is not an affine operator with a per-channel constant."""
  if user.op_type not in _AFFINE or len(user.input) != 2 or user.input[0] == user.input[1]:
    return None
  position = 1 if user.input[0] == output else 0
  constant = graph.values.get(user.input[position])
  rank = kernel.ndim
  if constant is None or constant.dtype != np.float32 or constant.ndim > rank:
    return None
  constant = constant.reshape((1,) * (rank - constant.ndim) + constant.shape)
  channels = kernel.shape[0]
  if (constant.shape[0] != 1 or constant.shape[1] not in (1, channels)
      or any(d != 1 for d in constant.shape[2:])):
    return None
  c = np.broadcast_to(constant.reshape(-1), (channels,)).astype(np.float64)
  per_output = c.reshape((channels,) + (1,) * (rank - 1))
  if user.op_type == "Add":
    return kernel, bias + c
  if user.op_type == "Sub":
    return (kernel, bias - c) if position == 1 else (-kernel, c - bias)
  if user.op_type == "Mul":
    return kernel * per_output, bias * c
  if position == 0:  # constant / conv is not affine in the conv
    return None
  return kernel / per_output, bias / c


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(low index, high index, weight of the high one) of ONNX Resize's linear interpolation with
  half_pixel coordinates (torch's align_corners=False), from n_in to n_out samples."""
  source = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
  low = np.floor(source).astype(np.int64)
  return low, np.minimum(low + 1, n_in - 1), source - low


def _resize_upsampling(graph: _Graph) -> None:
  """Replaces `w_low * gather(x, low, a) + w_high * gather(x, high, a)` whose indices and
  weights are those of linear half_pixel interpolation along axis a by a `Resize` of x (one
  Resize for consecutive axes), as torch's bilinear `align_corners=False` upsampling is. The
  gathers and products left unread are dropped by `_live`."""
  import onnx
  producer = {node.output[0]: node for node in graph.nodes}
  resized: dict[str, tuple[str, list[int]]] = {}  # Resize output -> (its input, its sizes)
  replacement: dict[int, Any] = {}
  for node in graph.nodes:
    if node.op_type != "Add" or len(node.input) != 2:
      continue
    taps = [_weighted_gather(graph, producer, name) for name in node.input]
    if None in taps or taps[0][:3] != taps[1][:3]:
      continue
    if not np.all(taps[0][3] <= taps[1][3]):
      taps = taps[::-1]
    (source, axis, shape, low, w_low), (_, _, _, high, w_high) = taps
    if len(shape) != 4 or axis < 2:  # ONNX Runtime's linear Resize: the H, W of NCHW only
      continue
    want_low, want_high, fraction = _linear_taps(shape[axis], len(low))
    if not (np.array_equal(low, want_low) and np.array_equal(high, want_high)
            and np.allclose(w_high, fraction, rtol=0, atol=1e-6)
            and np.allclose(w_low, 1 - fraction, rtol=0, atol=1e-6)):
      continue
    if source in resized:  # the Resize of the previous axis: one Resize for both
      source, sizes = resized[source]
    else:
      sizes = list(shape)
    sizes = list(sizes)
    sizes[axis] = len(low)
    replacement[id(node)] = onnx.helper.make_node(
        "Resize", [source, "", "", graph.shape(sizes)], [node.output[0]], mode="linear",
        coordinate_transformation_mode="half_pixel")
    resized[node.output[0]] = (source, sizes)
  graph.nodes = [replacement.get(id(node), node) for node in graph.nodes]


def _weighted_gather(graph: _Graph, producer: dict, name: str) -> tuple | None:
  """(gathered tensor, axis, its stored shape, indices, weights) of `name` = Mul(Gather(x,
  constant indices, axis), constant weights varying along that axis only), else None."""
  mul = producer.get(name)
  if mul is None or mul.op_type != "Mul" or len(mul.input) != 2:
    return None
  for position in (0, 1):
    gathered, weights = mul.input[position], graph.values.get(mul.input[1 - position])
    if gathered in graph.gathers and weights is not None:
      break
  else:
    return None
  axis, shape = graph.gathers[gathered]
  indices = graph.values.get(producer[gathered].input[1])
  if (indices is None or indices.ndim != 1 or weights.ndim != len(shape)
      or weights.shape[axis] != len(indices)
      or any(d != 1 for k, d in enumerate(weights.shape) if k != axis)):
    return None
  return (producer[gathered].input[0], axis, shape, indices,
          weights.reshape(-1).astype(np.float64))


def _live(nodes: list[Any], initializers: list[Any], outputs: list[str]
          ) -> tuple[list[Any], list[Any]]:
  """The nodes and initializers the outputs depend on (folding leaves some unread)."""
  needed = set(outputs)
  kept = []
  for node in reversed(nodes):
    if any(name in needed for name in node.output):
      kept.append(node)
      needed.update(node.input)
  return kept[::-1], [t for t in initializers if t.name in needed]


def build_from_function(fn: Callable, image_size: int, output_names: list[str],
                        output_shapes: list[tuple], *, batch: int, weight_dtype: str,
                        doc: str = "") -> Any:
  """The ONNX model of `fn(image (batch, S, S, 3) float32) -> tuple of arrays`."""
  import onnx
  closed = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct((batch, image_size, image_size, 3),
                                                   np.float32))
  graph = _Graph(np.dtype(weight_dtype))
  tracer = _Tracer(graph)
  results = tracer.run(closed.jaxpr, list(closed.consts), [contract.INPUT_NAME])
  helper = onnx.helper
  outputs = []
  for value, name, shape in zip(results, output_names, output_shapes):
    graph.nodes.append(helper.make_node("Identity", [tracer.name(value)], [name]))
    outputs.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(shape)))
  _fold_into_convolutions(graph)
  _resize_upsampling(graph)
  nodes, initializers = _live(graph.prologue + graph.nodes, graph.initializers, output_names)
  inputs = [helper.make_tensor_value_info(contract.INPUT_NAME, onnx.TensorProto.FLOAT,
                                          [batch, image_size, image_size, 3])]
  proto = helper.make_model(helper.make_graph(nodes, "star_jax_landmarks", inputs, outputs,
                                              initializers),
                            opset_imports=[helper.make_opsetid("", OPSET)],
                            producer_name="star-jax", doc_string=doc)
  proto.ir_version = IR_VERSION
  onnx.checker.check_model(proto, full_check=True)
  return proto


def build_model(model: Any, variables: Mapping[str, Any], image_size: int, *,
                with_heatmaps: bool = False, weight_dtype: str = "float32",
                batch: int | None = None, doc: str = "") -> Any:
  """The `onnx.ModelProto` of the export contract for any backbone, at a fixed batch
  (`batch=None` means 1: a traced program has fixed shapes)."""
  from star_jax.deploy.export import jax_formats
  batch = 1 if batch is None else int(batch)
  fn = jax_formats.contract_function(model, variables, image_size, with_heatmaps=with_heatmaps)
  shapes = jax.eval_shape(fn, jax.ShapeDtypeStruct((batch, image_size, image_size, 3),
                                                   np.float32))
  names = [contract.LANDMARKS_NAME] + ([contract.HEATMAPS_NAME] if with_heatmaps else [])
  return build_from_function(fn, image_size, names, [s.shape for s in shapes], batch=batch,
                             weight_dtype=weight_dtype, doc=doc)
