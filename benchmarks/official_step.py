"""The official PyTorch training step and star-jax's, timed side by side on this machine.

The official step is built from an official STAR checkout (github ZhenglinZhou/STAR; give its
path with `--official_repo` or `STAR_OFFICIAL_REPO`): its `StackedHGNetV1` (WFLW: 4 stacks,
98 points, 9 edges, CoordConv, AAM heads), its `STARLoss_v2` and `AWingLoss`, and the step of
its `forward_backward`: forward, the twelve weighted loss terms (each read back to the host, as
the official loop does for its log), backward inside `torch.autograd.detect_anomaly()`, Adam
(lr 1e-3), and the parameter-and-buffer EMA. Only the official modules are imported from the
checkout (not its package `__init__`s, which pull in its data and logging dependencies).

star-jax's step is `benchmarks/train_step.py`'s (the `train_and_evaluate` step, state donated,
synthetic on-device batch), run in a child process after the official one so that the two never
share the cores. Both get the same batch size, the same synthetic value ranges, and the same
number of warm-up and timed steps; the table gives wall seconds and process CPU seconds per step.
Every child runs under the same process settings (`--process_settings`, default 'tuned': the
allocator setting star-jax's entry points make applies to the PyTorch children too; the XLA:CPU
options only to star-jax's), stated in the output.

Run from the repository root (torch must be installed: `pip install -e '.[torch]'`):
  python -m benchmarks.official_step --official_repo /path/to/STAR [--batch_size 4] [--record]
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # `python benchmarks/official_step.py`: import as `python -m` does
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import copy
import importlib
import json
import subprocess
import types
from typing import Any

import numpy as np

from benchmarks import common


def official_repo_problem(repo: str | None) -> str | None:
  """Why `repo` is not an official STAR checkout (a message for --official_repo), or None."""
  if not repo:
    return ("--official_repo (or STAR_OFFICIAL_REPO) is required: a checkout of "
            "github.com/ZhenglinZhou/STAR")
  network_file = os.path.join(os.path.abspath(repo), "lib", "backbone", "stackedHGNetV1.py")
  if not os.path.isfile(network_file):
    return (f"--official_repo {repo}: {network_file} not found (a checkout of "
            "github.com/ZhenglinZhou/STAR is needed)")
  return None


def load_official_modules(repo: str) -> dict[str, Any]:
  """The official network and loss modules, imported from the checkout at `repo`."""
  repo = os.path.abspath(repo)
  problem = official_repo_problem(repo)
  if problem:
    raise FileNotFoundError(problem)
  if repo not in sys.path:
    sys.path.insert(0, repo)
  # Empty package objects stand in for the official `lib`, `lib.dataset`, `lib.loss` and
  # `lib.backbone`, so importing a submodule does not execute their __init__ files.
  for name in ("lib", "lib.dataset", "lib.backbone", "lib.loss"):
    package = types.ModuleType(name)
    package.__path__ = [os.path.join(repo, *name.split("."))]
    sys.modules[name] = package
  decoder = importlib.import_module("lib.dataset.decoder")
  sys.modules["lib.dataset"].get_decoder = decoder.get_decoder
  return {
      "network": importlib.import_module("lib.backbone.stackedHGNetV1"),
      "star": importlib.import_module("lib.loss.starLoss_v2"),
      "awing": importlib.import_module("lib.loss.awingLoss"),
  }


def official_wflw_network(modules: dict[str, Any], *, image_size: int = 256,
                          num_stacks: int = 4, seed: int = 0):
  """The official StackedHGNetV1 as the WFLW recipe builds it (98 points, 9 edges, AAM)."""
  import torch
  from star_jax.core import schemes as datasets

  spec = datasets.get_spec("wflw")
  config = types.SimpleNamespace(width=image_size, height=image_size, use_AAM=True)
  edge_info = tuple((edge.closed, tuple(edge.points)) for edge in spec.edges)
  torch.manual_seed(seed)
  return modules["network"].StackedHGNetV1(
      config=config, classes_num=[spec.num_points, spec.num_edges, spec.num_points],
      edge_info=edge_info, nstack=num_stacks, add_coord=True, decoder_type="default").float()


def official_wflw_setup(modules: dict[str, Any], batch_size: int, seed: int = 0):
  """(network, EMA copy, Adam, loss terms, batch) as the official WFLW recipe builds them."""
  import torch
  from star_jax.core import schemes as datasets
  from benchmarks import train_step

  spec = datasets.get_spec("wflw")
  num_stacks = 4
  net = official_wflw_network(modules, num_stacks=num_stacks, seed=seed)
  net.train(True)
  net_ema = copy.deepcopy(net)
  optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
  star = modules["star"].STARLoss_v2(dist="smoothl1", w=1)
  awing = modules["awing"].AWingLoss()
  # Per stack i: STAR on the fused heatmaps, AWing on point maps and edge maps, weighted
  # (2^i / 2^(S-1)) * (1, 10, 10) (the official conf/alignment.py recipe).
  terms = []
  for i in range(num_stacks):
    factor = 2.0 ** i / 2.0 ** (num_stacks - 1)
    terms += [(i, "star", factor * 1.0), (i, "pointmap", factor * 10.0),
              (i, "edgemap", factor * 10.0)]
  host = train_step.synthetic_batch(batch_size, 256, spec.num_points, spec.num_edges, seed)
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  batch = {"image": nchw(host["image"]), "landmarks": torch.from_numpy(host["landmarks"]),
           "pointmaps": nchw(host["pointmaps"]), "edgemaps": nchw(host["edgemaps"])}
  return net, net_ema, optimizer, (star, awing, terms), batch


def official_step_fn(net, net_ema, optimizer, losses, batch, *, anomaly: bool,
                     ema_decay: float):
  """One official training step as a closure (returns the summed loss as a float)."""
  import torch
  star, awing, terms = losses
  params = dict(net.named_parameters())
  ema_params = dict(net_ema.named_parameters())
  buffers = dict(net.named_buffers())
  ema_buffers = dict(net_ema.named_buffers())

  def step() -> float:
    outputs, fused_heatmaps, _ = net(batch["image"])
    total = 0.0
    logged = []
    for stack, kind, weight in terms:
      if kind == "star":
        value = star(fused_heatmaps[stack], batch["landmarks"])
      elif kind == "pointmap":
        value = awing(outputs[3 * stack + 1], batch["pointmaps"])
      else:
        value = awing(outputs[3 * stack + 2], batch["edgemaps"])
      total = total + weight * value
      logged.append(float(value.item()))  # the official loop reads every term back for its log
    optimizer.zero_grad()
    if anomaly:
      with torch.autograd.detect_anomaly():
        total.backward()
    else:
      total.backward()
    optimizer.step()
    with torch.no_grad():
      for name, value in ema_params.items():
        value.mul_(ema_decay).add_(params[name], alpha=1 - ema_decay)
      for name, value in ema_buffers.items():
        if value.is_floating_point():
          value.mul_(ema_decay).add_(buffers[name], alpha=1 - ema_decay)
        else:
          value.copy_(buffers[name])
    return float(sum(logged))

  return step


def time_steps(step, *, warmup: int, windows: int, steps_per_window: int) -> dict[str, Any]:
  for _ in range(warmup):
    step()

  def run_window():
    for _ in range(steps_per_window):
      step()

  walls, cpus = common.time_windows(run_window, windows=windows,
                                    steps_per_window=steps_per_window)
  return {"seconds": common.median(walls), "cpu_seconds": common.median(cpus), "all": walls}


def measure_official(args, anomaly: bool) -> dict[str, Any]:
  settings = common.apply_process_settings(args.process_settings, jax_in_process=False)
  import torch
  torch.set_num_threads(args.threads)
  modules = load_official_modules(args.official_repo)
  net, net_ema, optimizer, losses, batch = official_wflw_setup(modules, args.batch_size)
  step = official_step_fn(net, net_ema, optimizer, losses, batch, anomaly=anomaly,
                          ema_decay=0.5 ** (args.batch_size / 10000.0))
  return dict(time_steps(step, warmup=args.warmup, windows=args.windows,
                         steps_per_window=args.steps_per_window), settings=settings)


def measure_star_jax(args) -> dict[str, Any]:
  settings = common.apply_process_settings(args.process_settings)
  from benchmarks import train_step
  config = train_step.recipe_config(batch_size=args.batch_size)
  result = train_step.time_train_step(config, steps_per_window=args.steps_per_window,
                                      windows=args.windows, warmup=args.warmup)
  return dict({k: result[k] for k in ("seconds", "cpu_seconds", "all", "first_call_seconds")},
              settings=settings)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--official_repo", default=os.environ.get("STAR_OFFICIAL_REPO"),
                      help="path of an official STAR checkout (or set STAR_OFFICIAL_REPO)")
  parser.add_argument("--batch_size", type=int, default=4)
  parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                      help="torch intra-op threads (default: all cores, as star-jax uses)")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--windows", type=int, default=3)
  parser.add_argument("--steps_per_window", type=int, default=2)
  parser.add_argument("--skip_star_jax", action="store_true")
  common.add_common_flags(parser)
  parser.add_argument("--child", choices=("official", "official_no_anomaly", "star_jax"),
                      help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.child:
    result = (measure_star_jax(args) if args.child == "star_jax"
              else measure_official(args, anomaly=args.child == "official"))
    print("RESULT " + json.dumps(result), flush=True)
    return
  problem = official_repo_problem(args.official_repo)
  if problem:
    parser.error(problem)

  # Each measurement runs in its own process, one after the other (no shared thread pools).
  children = [("official PyTorch (detect_anomaly, as it trains)", "official"),
              ("official PyTorch, detect_anomaly off", "official_no_anomaly")]
  if not args.skip_star_jax:
    children.append(("star-jax (float32)", "star_jax"))
  common_flags = [f"--official_repo={args.official_repo}", f"--batch_size={args.batch_size}",
                  f"--threads={args.threads}", f"--warmup={args.warmup}",
                  f"--windows={args.windows}", f"--steps_per_window={args.steps_per_window}",
                  f"--process_settings={args.process_settings}"]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  results = {}
  for label, child in children:
    run = subprocess.run([sys.executable, "-m", "benchmarks.official_step", f"--child={child}",
                          *common_flags], cwd=root, capture_output=True, text=True, check=False)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
      sys.stderr.write(run.stdout[-3000:] + run.stderr[-3000:])
      raise SystemExit(f"{label}: measurement failed (exit {run.returncode})")
    results[label] = json.loads(lines[-1][len("RESULT "):])
    print(label, results[label], flush=True)

  reference = results[children[0][0]]["seconds"]
  rows = []
  for label, _ in children:
    r = results[label]
    rows.append([label, args.batch_size, f"{r['seconds']:.3f}", f"{r['cpu_seconds']:.2f}",
                 f"{args.batch_size / r['seconds']:.2f}", f"{reference / r['seconds']:.2f}x",
                 " ".join(f"{t:.3f}" for t in r["all"])])
  settings = sorted({results[label]["settings"] for label, _ in children})
  common.record(
      f"Training step side by side: official PyTorch vs star-jax (WFLW network, batch "
      f"{args.batch_size}, CPU)",
      ["step", "batch", "s / step (median)", "CPU-s / step", "images/s",
       "speed vs official", "windows (s / step)"],
      rows,
      notes=(f"measured one after the other in separate processes; torch with "
             f"{args.threads} threads; {args.warmup} warm-up steps, median of {args.windows} "
             f"windows of {args.steps_per_window} steps; synthetic batch "
             "(benchmarks/train_step.synthetic_batch); official code from "
             f"{os.path.basename(os.path.abspath(args.official_repo))} (StackedHGNetV1, "
             f"STARLoss_v2, AWingLoss, Adam, EMA); {' | '.join(settings)}; "
             f"{common.load_average()} at the end"),
      write=args.record)


if __name__ == "__main__":
  main()
