"""HRNetV2-W18 against the official HRNet face network (tests/fixtures/official_hrnet_300w, made
by the official code with random weights in the released file layout; its README gives every
key): parameter counts, the converted file's heatmaps and the official decode, and the legacy
(pre-1.6) file format read as data."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from star_jax.training import eval_lib, model_store
from star_jax.foreign import official
from star_jax.models import count_parameters, hrnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "official_hrnet_300w")


@pytest.mark.parametrize("points, expected", [(98, 9_662_528), (68, 9_654_398)])
def test_parameter_counts_equal_the_official_network(points, expected):
  model = hrnet.HRNetW18(num_points=points)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 256, 256, 3)))
  assert count_parameters(shapes["params"]) == expected


@pytest.fixture(scope="module")
def converted():
  return model_store.load_model(os.path.join(FIXTURE, "HR18-300W-fixture.pth"))


@pytest.fixture(scope="module")
def outputs():
  with np.load(os.path.join(FIXTURE, "outputs.npz")) as f:
    return {k: f[k] for k in f.files}


@pytest.mark.slow
def test_converted_file_gives_the_official_heatmaps_and_decode(converted, outputs):
  assert converted.spec.num_points == 68
  images = eval_lib.normalize_crops(outputs["input_rgb_u8"])
  # The network's own normalisation equals the official input (ImageNet mean/std of u8 / 255).
  np.testing.assert_allclose(np.asarray(converted.model.normalise(jnp.asarray(images))),
                             outputs["input"].transpose(0, 2, 3, 1), atol=2e-6)
  out = jax.jit(lambda v, x: converted.model.apply(v, x, train=False))(converted.variables,
                                                                       images)
  maps = np.asarray(out.heatmaps[-1])                     # (B, 64, 64, N)
  official_maps = outputs["heatmaps_img01"].transpose(0, 2, 3, 1)
  scale = np.abs(official_maps).max()
  assert np.abs(maps[:2] - official_maps).max() / scale < 1e-4
  flat = maps.reshape(4, 64 * 64, 68)[:, outputs["sample_flat_idx"]].transpose(0, 2, 1)
  assert np.abs(flat - outputs["heatmaps_samples"]).max() / np.abs(
      outputs["heatmaps_samples"]).max() < 1e-4
  coords = np.asarray(hrnet.official_decode(jnp.asarray(maps)))
  np.testing.assert_allclose(coords, outputs["landmarks_heatmap"], atol=1e-3)
  image = hrnet.official_to_image(coords, outputs["center"], outputs["scale"], 64)
  np.testing.assert_array_equal(image, outputs["landmarks_image"])


def _state(name):
  return official.select_state_dict(official.read_torch_checkpoint(os.path.join(FIXTURE, name)))


def test_legacy_file_format_is_read_as_data():
  # The legacy sample (storages tagged cuda:0) holds the zip file's first 12 entries.
  legacy, current = _state("legacy_sample.pth"), _state("HR18-300W-fixture.pth")
  assert len(legacy) == 12
  for key, value in legacy.items():
    np.testing.assert_array_equal(value.numpy(), current[key].numpy(), err_msg=key)
