"""The real-time configs beside the full model: GFLOP, parameters, ms per face, test NME.

    python -m benchmarks.realtime_models [--workdirs 1x64=runs/rt_1x64,2x128=runs/rt_2x128]
        [--repeats 20] [--record]
    python benchmarks/realtime_models.py --help

GFLOP: XLA's cost analysis of the jitted inference forward pass at batch 1 (a multiply-add
counts 2). ms per face: median wall time of that pass at batch 1 after warm-up (and the
process CPU time, all threads), random weights. NME: for each `--workdirs` entry, the
checkpoint's EMA weights evaluated with `star_jax.training.eval_lib.evaluate` on the embedded
dataset's
100-image test split (inter-ocular NME), with the step it was trained to.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if __package__ in (None, ""):  # run as `python benchmarks/realtime_models.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from benchmarks import common


def configs() -> dict:
  from configs import base, demo, realtime_1x64, realtime_2x128
  return {"full (4x256)": base.get_base_config("wflw"), "demo (2x32)": demo.get_config(),
          "2x128": realtime_2x128.get_config("demo"), "1x64": realtime_1x64.get_config("demo")}


def _trained_step(workdir: str) -> str:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    return "-"
  steps = []
  with open(path) as f:
    for line in f:
      record = json.loads(line)
      if "train_loss" in record:
        steps.append(int(record["step"]))
  return str(max(steps)) if steps else "-"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdirs", default="",
                      help="name=workdir pairs (names: 1x64, 2x128, 'demo (2x32)'), "
                           "comma-separated")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--record", action="store_true", help="append the table to RESULTS.md")
  args = parser.parse_args(argv)
  from star_jax.commands import host
  host.configure_process()
  import jax
  import jax.numpy as jnp
  from star_jax.core import schemes as datasets
  from star_jax.models import count_parameters, create_model, init_variables, parameter_shapes
  workdirs = dict(pair.split("=", 1) for pair in args.workdirs.split(",") if pair)
  load = common.load_average()
  rows = []
  for name, config in configs().items():
    size = int(config.data.image_size)
    model = create_model(config.model, datasets.WFLW)
    variables = jax.device_put(init_variables(model, 0, size))
    forward = jax.jit(lambda v, x, model=model: model.apply(v, x, train=False).landmarks[-1])
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    cost = forward.lower(variables, images).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    jax.block_until_ready(forward(variables, images))
    walls, cpus = [], []
    for _ in range(args.repeats):
      t0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(forward(variables, images))
      walls.append(time.perf_counter() - t0)
      cpus.append(time.process_time() - c0)
    params = count_parameters(parameter_shapes(model, size)["params"])
    short = name.split(" ")[0] if name.startswith(("1x", "2x")) else name
    nme, step = "-", "-"
    if short in workdirs or name in workdirs:
      workdir = workdirs.get(short, workdirs.get(name))
      from star_jax.training import eval_lib
      result = eval_lib.evaluate(config, workdir, progress=False, verbose=False)
      nme = f"{100 * result.metrics['nme']:.2f}"
      step = _trained_step(workdir)
    rows.append([name, f"{size}x{size}", model.num_stacks, model.channels,
                 f"{cost['flops'] / 1e9:.2f}", f"{params / 1e6:.2f}",
                 f"{1000 * statistics.median(walls):.1f}", f"{1000 * statistics.median(cpus):.1f}",
                 step, nme])
  common.record(
      "Real-time models beside the full model (WFLW layout, 98 points)",
      ["model", "input", "stacks", "channels", "GFLOP / face", "parameters (M)",
       "ms / face, batch 1 (wall)", "CPU ms", "trained steps", "embedded test NME %"], rows,
      notes=(f"forward pass at batch 1, median of {args.repeats} after warm-up; NME: EMA weights "
             "after the given steps of the configs' ':demo' variant (configs/demo.py schedule: "
             "batch 16, 1000 steps, lr x0.1 at steps 700 and 900), inter-ocular, embedded test "
             f"split (100 images); at start: {load}"),
      write=args.record)


if __name__ == "__main__":
  main()
