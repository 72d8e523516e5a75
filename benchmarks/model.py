"""Forward latency and parameter count of the full STAR network (WFLW, 4 stacks, 256 channels).

    python -m benchmarks.model [--batch_sizes 1,8] [--dtype float32]
                               [--official_repo /path/to/STAR] [--record]

Times a jitted inference forward pass (median after warm-up). With an official STAR checkout
(`--official_repo` or `STAR_OFFICIAL_REPO`) and torch installed, the official StackedHGNetV1
(eval mode, `torch.no_grad`, every core) is timed in the same process right after, on the same
batch sizes and under the same process settings (`--process_settings`, stated in the output),
and the speed-up column compares the two. Without it no speed-up is given: a figure measured
elsewhere, under other settings, is not a like-for-like comparison.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # `python benchmarks/model.py`: import as `python -m` does
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse

import numpy as np

from benchmarks import common


def time_official(repo: str, batch_sizes: list[int], image_size: int,
                  repeats: int) -> dict[int, float] | None:
  """Median seconds per batch of the official network's forward, or None without torch."""
  try:
    import torch
  except ImportError:
    print("torch not installed: the official network is not timed")
    return None
  from benchmarks import official_step
  torch.set_num_threads(os.cpu_count() or 1)
  net = official_step.official_wflw_network(official_step.load_official_modules(repo),
                                            image_size=image_size)
  net.eval()
  seconds = {}
  with torch.no_grad():
    for batch in batch_sizes:
      images = torch.from_numpy(np.random.default_rng(0).uniform(
          -1, 1, (batch, 3, image_size, image_size)).astype(np.float32))
      walls, _ = common.time_calls(lambda: net(images), warmup=2, repeats=repeats)
      seconds[batch] = common.median(walls)
      print(f"official batch {batch}: {seconds[batch]:.4f} s", flush=True)
  return seconds


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch_sizes", default="1,8")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--image_size", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--official_repo", default=os.environ.get("STAR_OFFICIAL_REPO"),
                      help="an official STAR checkout: time its network beside ours")
  common.add_common_flags(parser)
  args = parser.parse_args(argv)
  if args.official_repo:
    from benchmarks import official_step
    problem = official_step.official_repo_problem(args.official_repo)
    if problem:
      parser.error(problem)
  settings = common.apply_process_settings(args.process_settings)

  import jax
  import jax.numpy as jnp
  from configs import base
  from star_jax import datasets
  from star_jax.models import count_parameters, create_model, init_variables, parameter_shapes

  config = base.get_base_config("wflw")
  config.model.dtype = args.dtype
  model = create_model(config.model, datasets.get_spec("wflw"))
  num_params = count_parameters(parameter_shapes(model)["params"])
  # On the device once: timing must not include a host-to-device copy of the weights.
  variables = jax.device_put(init_variables(model, jax.random.PRNGKey(0)))

  @jax.jit
  def forward(variables, images):
    return model.apply(variables, images, train=False).landmarks[-1]

  batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  ours = {}
  for batch in batch_sizes:
    images = jnp.asarray(np.random.default_rng(0).uniform(
        -1, 1, (batch, args.image_size, args.image_size, 3)).astype(np.float32))
    walls, _ = common.time_calls(lambda: forward(variables, images), warmup=2,
                                 repeats=args.repeats, sync=jax.block_until_ready)
    ours[batch] = (common.median(walls), min(walls))
    print(f"star-jax batch {batch}: {ours[batch][0]:.4f} s", flush=True)
  official = (time_official(args.official_repo, batch_sizes, args.image_size, args.repeats)
              if args.official_repo else None)
  rows = []
  for batch in batch_sizes:
    median, fastest = ours[batch]
    theirs = official[batch] if official else None
    rows.append([batch, args.dtype, f"{median:.4f}", f"{fastest:.4f}", f"{median / batch:.4f}",
                 f"{theirs / batch:.4f}" if theirs else "not measured",
                 f"{theirs / median:.2f}x" if theirs else "-", f"{num_params:,}"])
  common.record(
      "Model forward (WFLW, 4 stacks x 4 levels, 256 channels, jit, inference)",
      ["batch", "dtype", "s / batch (median)", "s / batch (min)", "s / image (median)",
       "official s / image (same process)", "speed-up vs official", "parameters"],
      rows,
      notes=(f"{args.image_size}x{args.image_size} input, median of {args.repeats} after 2 "
             f"warm-up calls; {settings}; official: "
             + (f"StackedHGNetV1 from {os.path.basename(os.path.abspath(args.official_repo))}, "
                f"eval, no_grad, torch with {os.cpu_count()} threads, timed right after "
                "star-jax in the same process" if official else
                "not measured (needs --official_repo and torch)")
             + f"; {common.load_average()} at the end"),
      write=args.record)


if __name__ == "__main__":
  main()
