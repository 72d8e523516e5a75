"""The traced ONNX route (star_jax.deploy.export.onnx_traced): any JAX program of the export
contract becomes an ONNX graph equal to it, and what it cannot translate is one line."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from star_jax import models
from star_jax.core import schemes
from star_jax.deploy.export import jax_formats, onnx_graph, onnx_traced
from star_jax.errors import UsageError
from star_jax.models import hrnet

ort = pytest.importorskip("onnxruntime")


def _run(proto, images):
  session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
  return session.run(None, {"image": images})


def _crops(batch, size, seed=0):
  return np.random.default_rng(seed).uniform(0, 255, (batch, size, size, 3)).astype(np.float32)


def test_hourglass_traced_equals_jax_and_the_hand_written_graph():
  spec = schemes.get_spec("wflw")
  model = models.StackedHourglass(num_stacks=2, num_levels=1, channels=8,
                                  num_points=spec.num_points,
                                  edge_points=tuple(e.points for e in spec.edges))
  variables = models.init_variables(model, 3, 32)
  images = _crops(2, 32)
  traced = _run(onnx_traced.build_model(model, variables, 32, with_heatmaps=True, batch=2),
                images)
  written = _run(onnx_graph.build_model(model, variables, 32, with_heatmaps=True, batch=2),
                 images)
  reference = jax_formats.contract_function(model, variables, 32, with_heatmaps=True)(images)
  for got, other, want in zip(traced, written, reference):
    scale = float(np.abs(np.asarray(want)).max())
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-4 * scale)
    np.testing.assert_allclose(got, other, atol=1e-4 * scale)


def test_hrnet_traced_equals_jax_with_both_decodes():
  for decode in ("official", "soft_argmax"):
    model = hrnet.HRNetW18(num_points=19, decode=decode)
    variables = models.init_variables(model, 0, 64)
    images = _crops(2, 64, seed=1)
    got = _run(onnx_traced.build_model(model, variables, 64, with_heatmaps=True, batch=2),
               images)
    want = jax_formats.contract_function(model, variables, 64, with_heatmaps=True)(images)
    # The official decode moves by whole quarter pixels: equal, not merely close.
    np.testing.assert_allclose(got[0], np.asarray(want[0]), atol=1e-3)
    np.testing.assert_allclose(got[1], np.asarray(want[1]),
                               atol=1e-5 * float(np.abs(np.asarray(want[1])).max()))


def test_float16_weights_halve_the_file_and_stay_close():
  model = hrnet.HRNetW18(num_points=19)
  variables = models.init_variables(model, 0, 64)
  full = onnx_traced.build_model(model, variables, 64, batch=1)
  half = onnx_traced.build_model(model, variables, 64, batch=1, weight_dtype="float16")
  assert len(half.SerializeToString()) < 0.6 * len(full.SerializeToString())
  images = _crops(1, 64, seed=2)
  np.testing.assert_allclose(_run(half, images)[0], _run(full, images)[0], atol=0.5)


def test_small_programs_by_primitive():
  """Each translated primitive against jax on random input (a stand-in network per group)."""
  rng = np.random.default_rng(4)
  w = rng.normal(size=(3, 5)).astype(np.float32)

  def fn(image):
    x = image / 255.0
    pooled = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    flat = pooled.reshape(pooled.shape[0], -1, 3)
    mixed = jnp.einsum("bpc,cd->bpd", flat, w)
    soft = jax.nn.softmax(mixed, axis=1)
    parts = jnp.split(soft, [2], axis=-1)
    clipped = jnp.clip(parts[1] - 0.1, 0.0, 0.5) ** 3
    stacked = jnp.stack([jnp.sqrt(clipped + 1e-3), jnp.where(clipped > 0.01, 1.0, -1.0)], -1)
    padded = jnp.pad(stacked[:, :4], ((0, 0), (1, 2), (0, 0), (0, 0)))
    return (jnp.concatenate([padded.reshape(padded.shape[0], -1), jnp.tanh(parts[0][:, :3, 0])],
                            axis=1),)

  images = _crops(2, 8, seed=5)
  want = np.asarray(fn(images)[0])
  proto = onnx_traced.build_from_function(fn, 8, ["landmarks"], [want.shape], batch=2,
                                          weight_dtype="float32")
  np.testing.assert_allclose(_run(proto, images)[0], want, rtol=1e-5, atol=1e-6)


def test_an_untranslatable_primitive_is_one_line():
  def fn(image):
    return (jnp.sort(image.reshape(image.shape[0], -1), axis=-1)[:, :2].reshape(-1, 1, 2),)

  with pytest.raises(UsageError, match="'sort' has no ONNX translation") as info:
    onnx_traced.build_from_function(fn, 4, ["landmarks"], [(1, 1, 2)], batch=1,
                                    weight_dtype="float32")
  assert "\n" not in str(info.value)


def _small_hrnet():
  """HRNet of the official structure with one module per stage and one block per branch."""
  model = hrnet.HRNetW18(num_points=19, stage_modules=(1, 1, 1), blocks=1)
  return model, models.init_variables(model, 0, 64)


def test_a_traced_hrnet_stays_in_nchw_with_batch_norm_folded_into_its_convolutions():
  model, variables = _small_hrnet()
  proto = onnx_traced.build_model(model, variables, 64, with_heatmaps=True, batch=1)
  nodes = list(proto.graph.node)
  ops = [n.op_type for n in nodes]
  # One Transpose into NCHW for the first convolution, one back to NHWC for the heatmaps
  # output; the decode reads the NCHW maps directly.
  assert ops.count("Transpose") <= 2
  # The 1x1 convolutions (a reshape and a matrix product in the model) are Conv nodes.
  assert "Einsum" not in ops and "MatMul" not in ops
  assert ops.count("Conv") > 0 and ops.count("Relu") > 0
  constants = {t.name for t in proto.graph.initializer}
  produced_by_conv = {n.output[0] for n in nodes if n.op_type == "Conv"}
  for node in nodes:
    if node.op_type in ("Add", "Sub", "Mul", "Div") and produced_by_conv & set(node.input):
      assert not constants & set(node.input), f"{node.op_type} of a Conv output and a constant"
  images = _crops(1, 64, seed=3)
  got = _run(proto, images)
  want = jax_formats.contract_function(model, variables, 64, with_heatmaps=True)(images)
  np.testing.assert_allclose(got[1], np.asarray(want[1]),
                             atol=1e-5 * float(np.abs(np.asarray(want[1])).max()))


def test_float16_weights_fold_too():
  model, variables = _small_hrnet()
  full = onnx_traced.build_model(model, variables, 64, batch=1)
  half = onnx_traced.build_model(model, variables, 64, batch=1, weight_dtype="float16")
  count = lambda proto, op: sum(n.op_type == op for n in proto.graph.node)
  assert count(half, "Conv") == count(full, "Conv") and count(half, "Mul") == count(full, "Mul")
  assert not [t for t in half.graph.initializer if t.name not in
              {name for n in half.graph.node for name in n.input}]  # no stale weights


def test_layouts_through_every_translated_primitive_after_a_convolution():
  """Values left in NCHW by a convolution, through the primitives that map their axes, mixed
  with values in the logical layout, against jax."""
  rng = np.random.default_rng(6)
  kernel = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
  pointwise = rng.normal(size=(4, 5)).astype(np.float32)
  shift = rng.normal(size=(4,)).astype(np.float32)

  def fn(image):
    x = image / 255.0
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = jnp.maximum((y - shift) * 2.0, 0.0) + x[..., :1]            # a plain-layout operand
    rows = y.reshape(-1, 4) @ pointwise + shift[:1]
    z = rows.reshape(*y.shape[:-1], 5)                               # a 1x1 convolution
    pooled = jax.lax.reduce_window(z, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                                   "VALID")
    taken = jnp.take(pooled, np.array([0, 2, 1, 3]), axis=2)
    padded = jnp.pad(taken[:, 1:, :, 1:4], ((0, 0), (1, 0), (0, 2), (0, 0)))
    joined = jnp.concatenate([padded, jnp.ones_like(padded[..., :1])], axis=-1)
    parts = jnp.split(joined, [2], axis=-1)
    picked = jnp.where(parts[0] > 0.5, parts[0], jnp.clip(parts[1][..., :2], -1.0, 1.0))
    stacked = jnp.stack([picked, -picked], axis=3)
    summed = stacked.sum(axis=1)                                     # (B, W, 2, 2)
    widened = jnp.broadcast_to(summed[:, None], (summed.shape[0], 2) + summed.shape[1:])
    flat = jnp.transpose(widened, (0, 2, 3, 4, 1)).reshape(widened.shape[0], -1)
    best = jnp.argmax(z, axis=-1).astype(jnp.float32).reshape(z.shape[0], -1)
    mass = jnp.einsum("bhwc,w->bc", z, np.arange(z.shape[2], dtype=np.float32))
    # One stored tensor read as two values (a transpose is no node): both in logical order.
    views = [v.reshape(v.shape[0], -1) for v in (z, jnp.swapaxes(z, 1, 2))]
    return (jnp.concatenate([flat, best, mass] + views, axis=1),)

  images = _crops(2, 8, seed=7)
  want = np.asarray(fn(images)[0])
  proto = onnx_traced.build_from_function(fn, 8, ["landmarks"], [want.shape], batch=2,
                                          weight_dtype="float32")
  np.testing.assert_allclose(_run(proto, images)[0], want, rtol=1e-5, atol=1e-5)
  # The image into NCHW, the plain-layout operand into NCHW, and the three flattenings back
  # to the logical order: nothing else leaves NCHW.
  assert sum(n.op_type == "Transpose" for n in proto.graph.node) <= 5


def test_bilinear_upsampling_is_one_resize_equal_to_jax():
  model, variables = _small_hrnet()
  proto = onnx_traced.build_model(model, variables, 64, batch=1)
  ops = [n.op_type for n in proto.graph.node]
  # 1 + 3 + 6 upsamplings in the fuse layers of stages 2-4 and 3 in the head, each one Resize
  # of both axes.
  assert ops.count("Resize") == 13 and "Gather" not in ops
  rng = np.random.default_rng(8)
  kernel = rng.normal(size=(1, 1, 3, 4)).astype(np.float32)

  def fn(image):
    x = jax.lax.conv_general_dilated(image / 255.0, kernel, (1, 1), ((0, 0), (0, 0)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    small = x[:, :5, :4]
    ups = [hrnet.upsample_bilinear(x, 16, 16), hrnet.upsample_bilinear(x, 32, 24),
           hrnet.upsample_bilinear(small, 8, 7),
           hrnet.upsample_bilinear(image, 16, 16)]  # NHWC: W as a Resize, H stays gathers
    return (jnp.concatenate([u.reshape(u.shape[0], -1) for u in ups], axis=1),)

  images = _crops(2, 8, seed=9)
  want = np.asarray(fn(images)[0])
  proto = onnx_traced.build_from_function(fn, 8, ["landmarks"], [want.shape], batch=2,
                                          weight_dtype="float32")
  assert sum(n.op_type == "Resize" for n in proto.graph.node) == 4
  np.testing.assert_allclose(_run(proto, images)[0], want, rtol=1e-5, atol=1e-5)


def test_a_gather_mix_that_is_not_linear_interpolation_stays_a_gather():
  def fn(image):
    x = image / 255.0
    low, high = np.array([0, 0, 1, 2, 3, 3, 4, 5]), np.array([1, 1, 2, 3, 4, 4, 5, 5])
    w = np.linspace(0.1, 0.9, 8, dtype=np.float32).reshape(1, 1, 8, 1)
    return ((w * jnp.take(x, low, axis=2) + (1 - w) * jnp.take(x, high, axis=2)
             ).reshape(x.shape[0], -1),)

  images = _crops(1, 6, seed=10)
  want = np.asarray(fn(images)[0])
  proto = onnx_traced.build_from_function(fn, 6, ["landmarks"], [want.shape], batch=1,
                                          weight_dtype="float32")
  ops = [n.op_type for n in proto.graph.node]
  assert "Resize" not in ops and ops.count("Gather") == 2
  np.testing.assert_allclose(_run(proto, images)[0], want, rtol=1e-5, atol=1e-6)
