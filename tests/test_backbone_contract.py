"""The backbone contract end to end with a network defined only here.

`ToyBackbone` (three convolutions, one BatchNorm per stage) is registered from this file, the
way a user's own network would be, and goes through the public paths without any other module
knowing it: training on the embedded synthetic faces, fine-tuning (`init_from` its checkpoint)
onto another landmark scheme with a frozen group, evaluation, prediction, and export in every
format (ONNX through the traced route, the network having no hand-written graph).
"""

from __future__ import annotations

import json
import os
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from star_jax.training import eval_lib, model_store, train_lib
from star_jax.core import decoder
from star_jax import models
from star_jax.deploy import predict
from star_jax.errors import UsageError
from star_jax.models import registry
from star_jax.models.batch_norm import BatchNorm
from tests import tiny_data

WIDTH = 6  # not the class default (8): fine-tuning must take it from the checkpoint
IMAGE_SIZE = 32
MEAN_PX, MAX_PX = 0.05, 0.5


@registry.register("toy_contract_backbone")
class ToyBackbone(nn.Module):
  """Stem (3x3/2 conv, BN-ReLU), body (3x3/2 conv, BN-ReLU), head (1x1 conv, sigmoid maps)."""

  num_points: int = 98
  width: int = 8
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  architecture_defaults = {"width": 8}
  onnx_graph = None
  min_image_size = 8  # two stride-2 stages: 2x2 maps at the smallest

  @classmethod
  def from_config(cls, model_config, spec, *, bn_axis_name=None):
    width = model_config.get("width", None)
    return cls(num_points=spec.num_points, width=int(width or 8),
               dtype=jnp.dtype(model_config.get("dtype", "float32")), bn_axis_name=bn_axis_name)

  @classmethod
  def is_scheme_dependent(cls, module: str) -> bool:
    return module == "head_conv"

  def freeze_groups(self):
    return ("stem", "body", "head")

  def freeze_group(self, module: str):
    return module.split("_")[0]

  @nn.compact
  def __call__(self, images, train: bool = False):
    norm = lambda name: BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                  axis_name=self.bn_axis_name, dtype=self.dtype, relu=True,
                                  name=name)
    x = images.astype(self.dtype)
    x = norm("stem_bn")(nn.Conv(self.width, (3, 3), (2, 2), dtype=self.dtype,
                                name="stem_conv")(x))
    x = norm("body_bn")(nn.Conv(self.width, (3, 3), (2, 2), dtype=self.dtype,
                                name="body_conv")(x))
    maps = jax.nn.sigmoid(nn.Conv(self.num_points, (1, 1), dtype=self.dtype,
                                  name="head_conv")(x))
    return models.ModelOutput(landmarks=(decoder.soft_argmax(maps),), heatmaps=(maps,),
                              pointmaps=(), edgemaps=())


def _parameters(width: int, points: int) -> int:
  """The toy's parameter count by hand: two 3x3 convolutions with bias and BatchNorm (scale,
  bias), a 1x1 head with bias."""
  stem = 3 * 3 * 3 * width + width + 2 * width
  body = 3 * 3 * width * width + width + 2 * width
  return stem + body + width * points + points


def _config(folder, image_dir, dataset="wflw"):
  c = base.get_base_config("wflw")
  c.dataset = dataset
  c.model.name = "toy_contract_backbone"
  c.data.image_dir = image_dir
  c.data.train_tsv, c.data.val_tsv, c.data.test_tsv = (
      os.path.join(folder, f"{s}.tsv") for s in ("train", "val", "test"))
  c.data.image_size = IMAGE_SIZE
  c.batch_size = c.eval_batch_size = 4
  c.num_train_steps = 2
  c.log_every_steps = 1
  c.eval_every_steps = c.checkpoint_every_steps = 2
  return c


@pytest.mark.slow
def test_a_backbone_defined_outside_star_jax_trains_finetunes_evaluates_and_exports(tmp_path):
  from star_jax.deploy.export import exporter, parity
  files = tiny_data.wflw(str(tmp_path / "wflw"), counts=(8, 4, 4))
  scheme = tiny_data.scheme29(str(tmp_path / "face29"), files)
  scheme_dir = os.path.dirname(scheme)

  # Train on the embedded faces (98 points), at a non-default width.
  config = _config(os.path.dirname(files.train_tsv), files.image_dir)
  config.model.width = WIDTH
  run98 = str(tmp_path / "run98")
  train_lib.train_and_evaluate(config, run98)
  start = model_store.load_model(run98)
  assert type(start.model) is ToyBackbone
  assert (start.model.width, start.model.num_points) == (WIDTH, 98)

  # Fine-tune onto 29 points: width from the checkpoint, stem frozen, head re-initialised.
  config = _config(scheme_dir, os.path.join(scheme_dir, "images"), dataset=scheme)
  config.init_from = run98
  config.freeze = "stem"
  tuned = str(tmp_path / "tuned29")
  result = train_lib.train_and_evaluate(config, tuned)
  before = jax.tree.map(np.asarray, start.variables["params"])
  after = jax.tree.map(np.asarray, result.state.params)
  chex.assert_trees_all_equal(after["stem_conv"], before["stem_conv"])
  chex.assert_trees_all_equal(after["stem_bn"], before["stem_bn"])
  assert not np.array_equal(after["body_conv"]["kernel"], before["body_conv"]["kernel"])
  assert after["head_conv"]["kernel"].shape == (1, 1, WIDTH, 29)
  loaded = model_store.load_model(tuned)
  assert type(loaded.model) is ToyBackbone and loaded.model.width == WIDTH
  assert loaded.spec.name == "face29"

  # A freeze group the network does not have is refused in one line.
  config.freeze = "stack0"
  with pytest.raises(UsageError, match="choose from stem, body, head") as info:
    train_lib.train_and_evaluate(config, str(tmp_path / "refused"))
  assert "\n" not in str(info.value)
  config.freeze = "stem"

  # Evaluation.
  out = eval_lib.evaluate(config, tuned, None, progress=False, verbose=False)
  assert out.landmarks.shape == (4, 29, 2) and np.isfinite(out.metrics["nme"])

  # Prediction on a photo (the predictor asks nothing of the network but its outputs).
  image = np.zeros((96, 96, 3), np.uint8)
  faces = predict.Predictor(tuned, batch_size=2).predict(image, boxes=[(16, 16, 80, 80)])
  assert faces[0].shape == (29, 2) and np.isfinite(faces[0]).all()

  # Export: every format matches the float64 JAX network (ONNX through the traced route, the
  # network having no hand-written graph).
  crops = parity.random_crops(3, IMAGE_SIZE, seed=2)
  reference = parity.jax_landmarks(loaded.model, loaded.variables, crops, IMAGE_SIZE,
                                   float64=True)
  for fmt in ("stablehlo", "savedmodel", "tflite", "onnx"):
    path = str(tmp_path / ("toy_savedmodel" if fmt == "savedmodel" else f"toy.{fmt}"))
    exported = exporter.export(tuned, fmt, path)
    got = parity.exported_landmarks(exported.path, crops)
    assert got.shape == (3, 29, 2)
    d = parity.difference(got, reference)
    assert d["mean_px"] < MEAN_PX and d["max_px"] < MAX_PX, (fmt, d)
    with open(exported.sidecar) as f:
      record = json.load(f)
    assert record["model"] == {"architecture": "toy_contract_backbone", "width": WIDTH,
                               "parameters": _parameters(WIDTH, 29)}
    assert record["num_points"] == 29 and record["dataset"] == "face29"
    if fmt == "onnx":
      assert record["input"]["shape"][0] == 1  # a traced program has fixed shapes
