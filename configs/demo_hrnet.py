"""HRNetV2-W18 with the STAR losses on the embedded synthetic dataset, at 64x64 input.

The schedule of configs/demo.py (1000 steps at batch 16) and the losses of configs/hrnet.py.
64x64 input gives 16x16 heatmaps and a 2x2 lowest-resolution branch (HRNet's inputs must divide
by 32); the network keeps the official width 18.
"""

from configs import demo
from configs import hrnet


def get_config():
  c = hrnet.apply(demo.get_config())
  c.data.image_size = 64
  return c
