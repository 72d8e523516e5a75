"""The ONNX graph of any backbone, traced from its JAX program (the route for networks without
a hand-written graph writer, `onnx_graph = None` in the backbone contract).

The export function of the contract (`jax_formats.contract_function`: 0-255 NHWC crops in,
landmarks in crop pixels out) is traced to a jaxpr at a fixed batch, and each equation becomes
standard opset-17 ONNX nodes. Everything that depends only on the weights and on constants
(coordinate grids, `iota`, folded arithmetic on parameters) is evaluated at export time and
stored as an initializer, so the graph holds only the computation on the image. Nested programs
(`pjit`, custom derivatives, `remat`) are inlined.

Layout: JAX convolutions run on NHWC with HWIO kernels; each becomes `Transpose` -> `Conv`
(NCHW, OIHW weights) -> `Transpose`, and ONNX Runtime's transpose optimiser cancels the pairs
between consecutive convolutions. A general `dot_general` is an `Einsum`.

A primitive outside the supported set is one UsageError naming it: the export then needs a
hand-written graph (`star_jax.deploy.export.onnx_graph` is the hourglass's) or one of the
traced formats (TFLite, SavedModel, StableHLO). Parity with the JAX model is tested in
tests/test_backbone_contract.py and tests/test_export.py.
"""

from __future__ import annotations

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


def _onnx_dtype(dtype: np.dtype) -> int:
  import onnx
  return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


class _Graph:
  """Nodes and initializers under construction; `env` maps a jaxpr variable to either a numpy
  constant or the name of an ONNX value."""

  def __init__(self, weight_dtype: np.dtype):
    self.nodes: list[Any] = []
    self.initializers: list[Any] = []
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
      return self.node("Cast", [name], hint, to=onnx.TensorProto.FLOAT)
    return name

  def shape(self, dims) -> str:
    return self.constant(np.asarray(list(dims), np.int64), "shape")


class _Tracer:
  def __init__(self, graph: _Graph):
    self.g = graph

  def value(self, env: dict, var: Any) -> Any:
    if isinstance(var, jax.extend.core.Literal):
      return np.asarray(var.val)
    return env[var]

  def name(self, value: Any) -> str:
    return value if isinstance(value, str) else self.g.constant(value)

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
    if all(not isinstance(v, str) for v in inputs):
      # Only constants in: evaluate now (weights, grids, iota, arithmetic on parameters).
      results = eqn.primitive.bind(*[jax.numpy.asarray(v) for v in inputs], **eqn.params)
      results = results if eqn.primitive.multiple_results else [results]
      return [np.asarray(r) for r in results]
    emit = getattr(self, f"_{name}", None)
    if name in _ELEMENTWISE:
      return [self.g.node(_ELEMENTWISE[name], [self.name(v) for v in inputs])]
    if name in _IDENTITY:
      return list(inputs)
    if emit is None:
      raise UsageError(f"ONNX export: the JAX primitive {name!r} has no ONNX translation in "
                       "the traced route; export this network as tflite, savedmodel or stablehlo")
    out = emit(eqn, inputs)
    return out if isinstance(out, list) else [out]

  # One method per primitive with parameters (inputs hold at least one ONNX value).
  def _ne(self, eqn, inputs):
    return self.g.node("Not", [self.g.node("Equal", [self.name(v) for v in inputs])])

  def _rem(self, eqn, inputs):
    # lax.rem takes the dividend's sign (C fmod), as ONNX Mod with fmod=1.
    return self.g.node("Mod", [self.name(v) for v in inputs], fmod=1)

  def _integer_pow(self, eqn, inputs):
    x, y = self.name(inputs[0]), int(eqn.params["y"])
    if y == 2:
      return self.g.node("Mul", [x, x])
    dtype = eqn.invars[0].aval.dtype
    return self.g.node("Pow", [x, self.g.constant(np.asarray(y, dtype))])

  def _square(self, eqn, inputs):
    x = self.name(inputs[0])
    return self.g.node("Mul", [x, x])

  def _rsqrt(self, eqn, inputs):
    return self.g.node("Reciprocal", [self.g.node("Sqrt", [self.name(inputs[0])])])

  def _exp2(self, eqn, inputs):
    dtype = eqn.invars[0].aval.dtype
    return self.g.node("Pow", [self.g.constant(np.asarray(2, dtype)), self.name(inputs[0])])

  def _log1p(self, eqn, inputs):
    one = self.g.constant(np.asarray(1, eqn.invars[0].aval.dtype))
    return self.g.node("Log", [self.g.node("Add", [self.name(inputs[0]), one])])

  def _expm1(self, eqn, inputs):
    one = self.g.constant(np.asarray(1, eqn.invars[0].aval.dtype))
    return self.g.node("Sub", [self.g.node("Exp", [self.name(inputs[0])]), one])

  def _convert_element_type(self, eqn, inputs):
    return self.g.node("Cast", [self.name(inputs[0])],
                       to=_onnx_dtype(eqn.params["new_dtype"]))

  def _reshape(self, eqn, inputs):
    if eqn.params.get("dimensions"):
      raise UsageError("ONNX export: reshape with a dimension order is not supported")
    return self.g.node("Reshape", [self.name(inputs[0]), self.g.shape(eqn.outvars[0].aval.shape)])

  def _squeeze(self, eqn, inputs):
    return self.g.node("Reshape", [self.name(inputs[0]), self.g.shape(eqn.outvars[0].aval.shape)])

  _expand_dims = _squeeze

  def _broadcast_in_dim(self, eqn, inputs):
    shape = eqn.outvars[0].aval.shape
    dims = eqn.params["broadcast_dimensions"]
    operand_shape = eqn.invars[0].aval.shape
    keep = [1] * len(shape)
    for axis, size in zip(dims, operand_shape):
      keep[axis] = size
    x = self.name(inputs[0])
    if tuple(keep) != tuple(operand_shape):
      x = self.g.node("Reshape", [x, self.g.shape(keep)])
    return self.g.node("Expand", [x, self.g.shape(shape)])

  def _transpose(self, eqn, inputs):
    return self.g.node("Transpose", [self.name(inputs[0])],
                       perm=[int(p) for p in eqn.params["permutation"]])

  def _reduce(self, op, eqn, inputs):
    axes = [int(a) for a in eqn.params["axes"]]
    if op == "ReduceSum":
      return self.g.node(op, [self.name(inputs[0]), self.g.shape(axes)], keepdims=0)
    return self.g.node(op, [self.name(inputs[0])], axes=axes, keepdims=0)

  def _reduce_sum(self, eqn, inputs):
    return self._reduce("ReduceSum", eqn, inputs)

  def _reduce_max(self, eqn, inputs):
    return self._reduce("ReduceMax", eqn, inputs)

  def _reduce_min(self, eqn, inputs):
    return self._reduce("ReduceMin", eqn, inputs)

  def _argmax(self, eqn, inputs):
    (axis,) = eqn.params["axes"]
    index = self.g.node("ArgMax", [self.name(inputs[0])], axis=int(axis), keepdims=0)
    return self.g.node("Cast", [index], to=_onnx_dtype(eqn.params["index_dtype"]))

  def _argmin(self, eqn, inputs):
    (axis,) = eqn.params["axes"]
    index = self.g.node("ArgMin", [self.name(inputs[0])], axis=int(axis), keepdims=0)
    return self.g.node("Cast", [index], to=_onnx_dtype(eqn.params["index_dtype"]))

  def _concatenate(self, eqn, inputs):
    return self.g.node("Concat", [self.name(v) for v in inputs],
                       axis=int(eqn.params["dimension"]))

  def _stack(self, eqn, inputs):
    axis = int(eqn.params["axis"])
    shape = list(eqn.invars[0].aval.shape)
    shape.insert(axis, 1)
    parts = [self.g.node("Reshape", [self.name(v), self.g.shape(shape)]) for v in inputs]
    return self.g.node("Concat", parts, axis=axis)

  def _slice(self, eqn, inputs):
    starts = eqn.params["start_indices"]
    ends = eqn.params["limit_indices"]
    steps = eqn.params["strides"] or [1] * len(starts)
    axes = list(range(len(starts)))
    return self.g.node("Slice", [self.name(inputs[0]), self.g.shape(starts), self.g.shape(ends),
                                 self.g.shape(axes), self.g.shape(steps)])

  def _split(self, eqn, inputs):
    axis = int(eqn.params["axis"])
    sizes = [int(s) for s in eqn.params["sizes"]]
    import onnx
    names = [self.g.name("split") for _ in sizes]
    self.g.nodes.append(onnx.helper.make_node("Split", [self.name(inputs[0]),
                                                        self.g.shape(sizes)], names, axis=axis))
    return names

  def _pad(self, eqn, inputs):
    config = eqn.params["padding_config"]
    if any(interior for _, _, interior in config) or any(lo < 0 or hi < 0
                                                         for lo, hi, _ in config):
      raise UsageError("ONNX export: pad with interior or negative padding is not supported")
    pads = [lo for lo, _, _ in config] + [hi for _, hi, _ in config]
    return self.g.node("Pad", [self.name(inputs[0]), self.g.shape(pads), self.name(inputs[1])])

  def _select_n(self, eqn, inputs):
    if len(inputs) != 3:
      raise UsageError("ONNX export: select_n with more than two cases is not supported")
    predicate = self.name(inputs[0])
    if eqn.invars[0].aval.dtype != np.bool_:
      predicate = self.g.node("Cast", [predicate], to=_onnx_dtype(np.bool_))
    return self.g.node("Where", [predicate, self.name(inputs[2]), self.name(inputs[1])])

  def _clamp(self, eqn, inputs):
    low, x, high = (self.name(v) for v in inputs)
    return self.g.node("Max", [self.g.node("Min", [x, high]), low])

  def _dot_general(self, eqn, inputs):
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
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
    equation = f"{''.join(lhs)},{''.join(rhs)}->{''.join(batch + lhs_free + rhs_free)}"
    return self.g.node("Einsum", [self.name(inputs[0]), self.name(inputs[1])],
                       equation=equation)

  def _conv_general_dilated(self, eqn, inputs):
    params = eqn.params
    if any(d != 1 for d in params["lhs_dilation"]) or params["batch_group_count"] != 1:
      raise UsageError("ONNX export: transposed or batch-grouped convolutions are not supported")
    numbers = params["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = numbers.lhs_spec, numbers.rhs_spec, numbers.out_spec
    x = self.g.node("Transpose", [self.name(inputs[0])], perm=[int(a) for a in lhs_spec])
    kernel = inputs[1]
    if isinstance(kernel, str):
      kernel = self.g.node("Transpose", [kernel], perm=[int(a) for a in rhs_spec])
    else:
      kernel = self.g.constant(np.transpose(kernel, rhs_spec), "kernel")
    padding = [int(lo) for lo, _ in params["padding"]] + [int(hi) for _, hi in params["padding"]]
    y = self.g.node("Conv", [x, kernel], strides=[int(s) for s in params["window_strides"]],
                    pads=padding, dilations=[int(d) for d in params["rhs_dilation"]],
                    group=int(params["feature_group_count"]))
    # y is laid out (N, C, spatial...); out_spec[k] is where axis k of that order belongs.
    inverse = [0] * len(out_spec)
    for position, axis in enumerate(out_spec):
      inverse[axis] = position
    return self.g.node("Transpose", [y], perm=inverse)

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
    simple = (not isinstance(indices, str) and len(axes) == 1
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
    return self.g.node("Gather", [self.name(inputs[0]), index], axis=int(axis))

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
    to_nchw = [0, rank - 1] + list(range(1, rank - 1))
    to_nhwc = [0] + list(range(2, rank)) + [1]
    x = self.g.node("Transpose", [self.name(inputs[0])], perm=to_nchw)
    pads = [int(lo) for lo, _ in padding[1:-1]] + [int(hi) for _, hi in padding[1:-1]]
    y = self.g.node(op, [x], kernel_shape=[int(w) for w in window[1:-1]],
                    strides=[int(s) for s in strides[1:-1]], pads=pads)
    return self.g.node("Transpose", [y], perm=to_nhwc)


def build_from_function(fn: Callable, image_size: int, output_names: list[str],
                        output_shapes: list[tuple], *, batch: int, weight_dtype: str,
                        doc: str = "") -> Any:
  """The ONNX model of `fn(image (batch, S, S, 3) float32) -> tuple of arrays`."""
  import onnx
  closed = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct((batch, image_size, image_size, 3),
                                                   np.float32))
  graph = _Graph(np.dtype(weight_dtype))
  results = _Tracer(graph).run(closed.jaxpr, list(closed.consts), [contract.INPUT_NAME])
  helper = onnx.helper
  outputs = []
  for value, name, shape in zip(results, output_names, output_shapes):
    source = value if isinstance(value, str) else graph.constant(value)
    graph.nodes.append(helper.make_node("Identity", [source], [name]))
    outputs.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(shape)))
  inputs = [helper.make_tensor_value_info(contract.INPUT_NAME, onnx.TensorProto.FLOAT,
                                          [batch, image_size, image_size, 3])]
  proto = helper.make_model(helper.make_graph(graph.nodes, "star_jax_landmarks", inputs, outputs,
                                              graph.initializers),
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
