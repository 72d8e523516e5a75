"""Shared by the real-time configs: a smaller hourglass on the STAR recipe, at 128x128 input.

Why 128x128 input: the stem of the network (a 7x7 convolution to 64 channels and three
bottlenecks of 128 channels at 1/2 and 1/4 of the input side) does not shrink with
`model.channels`. At 256x256 it alone costs about 2 GFLOP per face, more than the whole
1x64 hourglass at 128x128 (0.9 GFLOP); halving the input quarters it. Heatmaps are 32x32 and
`num_levels=3` keeps the innermost hourglass resolution at 4x4, as the full model's 64x64
heatmaps with 4 levels do. Points are still decoded with sub-pixel soft-argmax.

Two variants per model (`--config configs/realtime_1x64.py:VARIANT`):
  wflw  (default) the official WFLW recipe (data, augmentation, loss, optimiser, 500 epochs);
  demo  the schedule of configs/demo.py on the embedded synthetic dataset (1000 steps at batch
        16), used for the table in benchmarks/RESULTS.md and by the tests.
"""

from configs import base
from configs import demo


def get_config(num_stacks: int, channels: int, variant: str = "wflw"):
  if variant == "wflw":
    c = base.get_base_config("wflw")
  elif variant == "demo":
    c = demo.get_config()
  else:
    raise ValueError(f"unknown variant {variant!r}: use 'wflw' or 'demo' "
                     "(e.g. --config configs/realtime_1x64.py:demo)")
  c.data.image_size = 128
  c.model.num_stacks = num_stacks
  c.model.num_levels = 3
  c.model.channels = channels
  return c
