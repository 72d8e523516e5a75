"""A small model on the embedded synthetic dataset: trains on a laptop CPU in minutes."""

from configs import base


def get_config():
  c = base.get_base_config("wflw")
  c.data.source = "embedded"
  # 64x64 input (16x16 heatmaps): the smallest size at which the network still learns the
  # synthetic faces well; about 4 steps/s on a 2-core CPU.
  c.data.image_size = 64
  c.model.num_stacks = 2
  c.model.num_levels = 2       # image_size must divide by 4 * 2**num_levels
  c.model.channels = 32
  c.batch_size = 16
  # The embedded training split has 800 images (its own 100-image val split is used for
  # validation): 50 steps per epoch at batch 16, 1000 steps in all.
  c.num_epochs = 20
  c.optim.milestones = (14, 18)
  c.ema.half_life_examples = 2000.0
  c.log_every_steps = 25
  c.eval_every_steps = 250
  c.checkpoint_every_steps = 250
  c.eval_batch_size = 32
  return c
