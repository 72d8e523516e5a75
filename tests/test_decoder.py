"""Tests of the soft-argmax decoder (star_jax.core.decoder)."""

from __future__ import annotations

import os

import chex
import jax.numpy as jnp
import numpy as np

from star_jax.core import decoder

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "official_wflw_small",
                       "star_loss_official.npz")


class SoftArgmaxTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_one_hot_decodes_to_its_pixel(self):
    height, width = 7, 10
    decode = self.variant(decoder.soft_argmax)
    for row, col in ((0, 0), (3, 4), (6, 9), (2, 9)):
      maps = np.zeros((height, width, 2), np.float32)
      maps[row, col, 0] = 1.0
      maps[row, col, 1] = 5.0                       # the scale of the peak does not matter
      coords = decode(jnp.asarray(maps))
      chex.assert_shape(coords, (2, 2))
      expected = [-1 + 2 * col / (width - 1), -1 + 2 * row / (height - 1)]
      np.testing.assert_allclose(np.asarray(coords), [expected, expected], atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_all_zero_maps_decode_to_origin_and_batches(self):
    decode = self.variant(decoder.soft_argmax)
    coords = decode(jnp.zeros((2, 3, 8, 8, 5)))
    chex.assert_shape(coords, (2, 3, 5, 2))
    np.testing.assert_array_equal(np.asarray(coords), 0.0)

  def test_mass_below_clamp_is_not_renormalised(self):
    # Official: divide by max(sum, 1e-6), so a map of total mass 1e-7 at x = +1 decodes to 0.1.
    maps = np.zeros((4, 4, 1), np.float32)
    maps[0, 3, 0] = 1e-7
    coords = np.asarray(decoder.soft_argmax(jnp.asarray(maps)))
    np.testing.assert_allclose(coords[0], [0.1, -0.1], rtol=1e-5)

  def test_grid_rounds_as_the_official_float32_division(self):
    grid = np.asarray(decoder.heatmap_grid(64))
    # Within float32 rounding of -1 + 2j/63 everywhere ...
    np.testing.assert_allclose(grid, -1 + 2 * np.arange(64) / 63, atol=1.2e-7)
    # ... and bit-exact where the official `j / 63 * 2 - 1` in float32 and a multiplication by
    # the reciprocal 1/63 differ by one ulp (bit patterns of the official values, literal).
    official_bits = {12: 3206445544, 13: 3205912934, 14: 3205380324, 15: 3204847714}
    for j, bits in official_bits.items():
      assert grid[j].view(np.uint32) == bits, j

  def test_official_fixture_landmarks(self):
    data = np.load(FIXTURE)
    maps = jnp.asarray(data["heatmaps_chw"].transpose(1, 2, 0))
    coords = decoder.soft_argmax(maps)
    chex.assert_shape(coords, (maps.shape[-1], 2))
    np.testing.assert_allclose(np.asarray(coords), data["decoded"], atol=1e-5)
