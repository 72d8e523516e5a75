"""HRNetV2-W18 beside the STAR hourglass: parameters, GFLOP and CPU ms per face at 256x256.

    python -m benchmarks.hrnet [--repeats 20] [--threads N] [--process_settings tuned|default]
        [--record]
    python benchmarks/hrnet.py --help

Both networks as the configs build them (configs/wflw.py: 4 hourglasses x 256 channels with AAM;
configs/wflw_hrnet.py: HRNetV2-W18, soft-argmax decode), 98 points (WFLW), random weights (speed
does not depend on them). GFLOP: XLA's cost analysis of the jitted inference forward pass at
batch 1 (a multiply-add counts 2), heatmaps to decoded landmarks. ms per face: median wall time
of that pass at batch 1 after warm-up, and the process CPU time (all threads).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if __package__ in (None, ""):  # run as `python benchmarks/hrnet.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from benchmarks import common


def configs() -> dict:
  from configs import wflw, wflw_hrnet
  return {"STAR hourglass (4x256, AAM)": wflw.get_config(),
          "HRNetV2-W18": wflw_hrnet.get_config()}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--image_size", type=int, default=256)
  common.add_common_flags(parser)
  args = parser.parse_args(argv)
  settings = common.apply_process_settings(args.process_settings)
  import jax
  import jax.numpy as jnp
  from star_jax.core import schemes as datasets
  from star_jax.training import finetune
  from star_jax.models import count_parameters, create_model, init_variables, parameter_shapes
  load = common.load_average()
  rows = []
  for name, config in configs().items():
    config = finetune.resolve_model_config(config)
    size = int(args.image_size)
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
    rows.append([name, f"{size}x{size}", f"{params / 1e6:.2f}", f"{cost['flops'] / 1e9:.2f}",
                 f"{1000 * statistics.median(walls):.1f}",
                 f"{1000 * statistics.median(cpus):.1f}"])
  common.record(
      "HRNetV2-W18 beside the STAR hourglass (WFLW, 98 points), JAX on the CPU",
      ["model", "input", "parameters (M)", "GFLOP / face", "ms / face, batch 1 (wall)",
       "CPU ms"], rows,
      notes=(f"inference forward pass (heatmaps and decoded landmarks) at batch 1, median of "
             f"{args.repeats} after warm-up, random weights; {settings}; at start: {load}"),
      write=args.record)


if __name__ == "__main__":
  main()
