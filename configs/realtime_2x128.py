"""Small model: 2 hourglasses x 128 channels, 128x128 input (1.8 GFLOP per face, 1.9 M
parameters). See configs/realtime.py for the input size and the `:demo` variant."""

from configs import realtime


def get_config(variant: str = "wflw"):
  return realtime.get_config(num_stacks=2, channels=128, variant=variant)
