"""Forward latency and parameter count of the full STAR network (WFLW, 4 stacks, 256 channels).

Run from the repository root: `python -m benchmarks.model [--batch_sizes 1,8,32] [--dtype float32]`.
Times a jitted inference forward pass (median after warm-up) and compares it with the official
PyTorch model measured on this machine (0.172 s per image at batch 1, 2 threads).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from configs import base
from star_jax import datasets
from star_jax.models import count_parameters, create_model, init_variables, parameter_shapes

# The official StackedHGNetV1 (PyTorch 2.13, CPU, 2 threads, eval, no_grad) on this machine.
OFFICIAL_SECONDS_PER_IMAGE_BATCH1 = 0.172


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batch_sizes", default="1,8,32")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--image_size", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--no_record", action="store_true", help="print only, skip RESULTS.md")
  args = parser.parse_args(argv)
  from star_jax import host  # pylint: disable=g-import-not-at-top
  host.tune_process()

  config = base.get_base_config("wflw")
  config.model.dtype = args.dtype
  model = create_model(config.model, datasets.get_spec("wflw"))
  num_params = count_parameters(parameter_shapes(model)["params"])
  # On the device once: timing must not include a host-to-device copy of the weights.
  variables = jax.device_put(init_variables(model, jax.random.PRNGKey(0)))

  @jax.jit
  def forward(variables, images):
    return model.apply(variables, images, train=False).landmarks[-1]

  rows = []
  for batch in (int(b) for b in args.batch_sizes.split(",")):
    images = jnp.asarray(np.random.default_rng(0).uniform(
        -1, 1, (batch, args.image_size, args.image_size, 3)).astype(np.float32))
    times = common.time_fn(lambda: forward(variables, images), warmup=2, repeats=args.repeats,
                           sync=jax.block_until_ready)
    per_batch = common.median(times)
    per_image = per_batch / batch
    rows.append([batch, args.dtype, f"{per_batch:.4f}", f"{min(times):.4f}", f"{per_image:.4f}",
                 f"{OFFICIAL_SECONDS_PER_IMAGE_BATCH1:.3f}",
                 f"{OFFICIAL_SECONDS_PER_IMAGE_BATCH1 / per_image:.2f}x", f"{num_params:,}"])
  common.record(
      "Model forward (WFLW, 4 stacks x 4 levels, 256 channels, jit, inference)",
      ["batch", "dtype", "s / batch (median)", "s / batch (min)", "s / image (median)", "official s / image (batch 1)",
       "speed-up vs official", "parameters"],
      rows,
      notes=(f"{args.image_size}x{args.image_size} input, median of {args.repeats} after 2 "
             "warm-up calls; official figure: PyTorch StackedHGNetV1 on this machine, 2 threads, "
             "batch 1"),
      write=not args.no_record)


if __name__ == "__main__":
  main()
