"""Shared by the HRNet configs: HRNetV2-W18 trained with the STAR recipe.

The data, augmentation, optimiser and schedule are the STAR recipe of configs/base.py; the
network is HRNetV2-W18 (star_jax/models/hrnet.py) at the official HRNet face input of 256x256
(64x64 heatmaps). HRNet has one output, raw heatmaps, and no AAM point or edge maps, so:
- `star` reads the heatmaps through a ReLU (`loss.star.activation`): STAR treats a map as a
  distribution and needs it non-negative, as the hourglass's instance-norm + ReLU maps are;
- `heatmap` (star_jax/loss_terms/heatmap.py) regresses the same maps onto the Gaussian point-map
  targets with the recipe's point-map loss (Adaptive Wing, weight 10); it takes the place of the
  AAM `pointmap` term, and `edgemap` is off (no edge head);
- landmarks are decoded with the soft-argmax of the ReLU'd maps (`model.decode`), the decode
  the STAR loss sees, for validation and evaluation alike.
"""

from configs import base


def apply(c):
  """`c` (a base config) switched to HRNetV2-W18 with the losses above; returns `c`."""
  c.model.name = "hrnet_w18"
  c.model.width = 18
  c.model.stage_modules = (1, 4, 3)  # the official face configuration
  c.model.blocks = 4
  c.model.decode = "soft_argmax"
  c.model.input_normalisation = "imagenet"
  c.data.image_size = 256
  c.loss.terms.pointmap = 0.0
  c.loss.terms.edgemap = 0.0
  c.loss.terms.heatmap = 10.0
  c.loss.star.activation = "relu"
  c.loss.heatmap = dict(dist="awing")
  return c


def get_config(dataset: str = "wflw"):
  return apply(base.get_base_config(dataset))
