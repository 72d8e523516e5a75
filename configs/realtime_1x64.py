"""Real-time model: 1 hourglass x 64 channels, 128x128 input (0.9 GFLOP per face, 0.39 M
parameters). See configs/realtime.py for the input size and the `:demo` variant."""

from configs import realtime


def get_config(variant: str = "wflw"):
  return realtime.get_config(num_stacks=1, channels=64, variant=variant)
