"""A small model on the embedded synthetic dataset: trains on a laptop CPU in minutes."""

from configs import base


def get_config():
  c = base.get_base_config("wflw")
  c.data.source = "embedded"
  c.data.image_size = 128
  c.model.num_stacks = 2
  c.model.num_levels = 3
  c.model.channels = 32
  c.batch_size = 16
  # The embedded training split has 800 images: 50 steps per epoch at batch 16.
  c.num_epochs = 30
  c.optim.milestones = (20, 26)
  c.ema.half_life_examples = 2000.0
  c.log_every_steps = 25
  c.eval_every_steps = 250
  c.checkpoint_every_steps = 250
  c.eval_batch_size = 32
  return c
