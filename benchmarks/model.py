"""Forward latency and parameter count of the full STAR network (WFLW, 4 stacks, 256 channels).

    python -m benchmarks.model [--batch_sizes 1,8] [--dtype float32]
                               [--official_repo /path/to/STAR] [--record]

Times a jitted inference forward pass (median after warm-up; process CPU time beside wall
time). With an official STAR checkout (`--official_repo` or `STAR_OFFICIAL_REPO`) and torch
installed, the official StackedHGNetV1 (eval mode, `torch.no_grad`, torch on every core) is
timed afterwards on the same batch sizes, in a child process of its own (no thread pool shared
with XLA's) under the same process settings (`--process_settings`, stated in the output), and
the speed-up column compares the two. Without it no speed-up is given: a figure measured
elsewhere, under other settings, is not a like-for-like comparison.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # `python benchmarks/model.py`: import as `python -m` does
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import json
import subprocess

import numpy as np

from benchmarks import common


def time_official(args, batch_sizes: list[int]) -> dict[str, list[float]]:
  """Child process: {batch: [median wall s, median CPU s]} of the official forward."""
  settings = common.apply_process_settings(args.process_settings, jax_in_process=False)
  import torch
  from benchmarks import official_step
  torch.set_num_threads(os.cpu_count() or 1)
  net = official_step.official_wflw_network(
      official_step.load_official_modules(args.official_repo), image_size=args.image_size)
  net.eval()
  seconds = {"settings": settings}
  with torch.no_grad():
    for batch in batch_sizes:
      images = torch.from_numpy(np.random.default_rng(0).uniform(
          -1, 1, (batch, 3, args.image_size, args.image_size)).astype(np.float32))
      walls, cpus = common.time_calls(lambda images=images: net(images), warmup=2,
                                      repeats=args.repeats)
      seconds[str(batch)] = [common.median(walls), common.median(cpus)]
      print(f"official batch {batch}: {seconds[str(batch)]}", flush=True)
  return seconds


def _official_child(args) -> dict | None:
  try:
    import importlib.util
    if importlib.util.find_spec("torch") is None:
      print("torch not installed: the official network is not timed")
      return None
  except ValueError:
    return None
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = subprocess.run(
      [sys.executable, "-m", "benchmarks.model", "--official_child",
       f"--official_repo={args.official_repo}", f"--batch_sizes={args.batch_sizes}",
       f"--image_size={args.image_size}", f"--repeats={args.repeats}",
       f"--process_settings={args.process_settings}"],
      cwd=root, capture_output=True, text=True, check=False)
  lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
  if run.returncode != 0 or not lines:
    sys.stderr.write(run.stdout[-3000:] + run.stderr[-3000:])
    raise SystemExit(f"official network: measurement failed (exit {run.returncode})")
  return json.loads(lines[-1][len("RESULT "):])


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
  parser.add_argument("--official_child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  if args.official_child:
    print("RESULT " + json.dumps(time_official(args, batch_sizes)), flush=True)
    return
  if args.official_repo:
    from benchmarks import official_step
    problem = official_step.official_repo_problem(args.official_repo)
    if problem:
      parser.error(problem)
  settings = common.apply_process_settings(args.process_settings)

  import jax
  import jax.numpy as jnp
  from configs import base
  from star_jax.core import schemes as datasets
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

  ours = {}
  for batch in batch_sizes:
    images = jnp.asarray(np.random.default_rng(0).uniform(
        -1, 1, (batch, args.image_size, args.image_size, 3)).astype(np.float32))
    walls, cpus = common.time_calls(lambda images=images: forward(variables, images), warmup=2,
                                    repeats=args.repeats, sync=jax.block_until_ready)
    ours[batch] = (common.median(walls), common.median(cpus))
    print(f"star-jax batch {batch}: {ours[batch]}", flush=True)
  official = _official_child(args) if args.official_repo else None
  rows = []
  for batch in batch_sizes:
    wall, cpu = ours[batch]
    theirs = official[str(batch)] if official else None
    rows.append([batch, args.dtype, f"{wall:.4f} ({cpu:.4f})", f"{wall / batch:.4f}",
                 f"{theirs[0]:.4f} ({theirs[1]:.4f})" if theirs else "not measured",
                 f"{theirs[0] / wall:.2f}x ({theirs[1] / cpu:.2f}x)" if theirs else "-",
                 f"{num_params:,}"])
  common.record(
      "Model forward (WFLW, 4 stacks x 4 levels, 256 channels, jit, inference)",
      ["batch", "dtype", "s / batch (CPU s)", "s / image", "official s / batch (CPU s)",
       "speed-up vs official (CPU)", "parameters"],
      rows,
      notes=(f"{args.image_size}x{args.image_size} input, median of {args.repeats} after 2 "
             f"warm-up calls; {settings}; official: "
             + (f"StackedHGNetV1 from {os.path.basename(os.path.abspath(args.official_repo))}, "
                f"eval, no_grad, torch with {os.cpu_count()} threads, timed after star-jax in a "
                f"child process with the same settings ({official['settings']})" if official else
                "not measured (needs --official_repo and torch)")
             + f"; {common.load_average()} at the end"),
      write=args.record)


if __name__ == "__main__":
  main()
