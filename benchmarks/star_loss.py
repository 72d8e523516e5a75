"""STAR loss forward + backward: star-jax against the memory floor and against PyTorch.

    python -m benchmarks.star_loss [--batch 32 --points 98 --size 64] [--settings tuned,default]
                                   [--record]

On float32 heatmaps `(B, S, S, N)` (51 MB at the default 32 x 64 x 64 x 98) it times:
- star-jax: `jax.jit(jax.value_and_grad(star_loss))`, and the forward alone;
- the memory floor: a jitted pass that reads the heatmaps twice and writes a tensor of their
  size once (`h * h.sum(axis=(1, 2), keepdims=True)`: per-map statistics, then an elementwise
  pass that needs them). Forward + backward of any loss of this shape must do at least that
  (statistics, then the gradient), so `star-jax / floor` says how close the loss is to what the
  memory allows on this machine. This ratio is the headline (a pass that only reads the
  heatmaps once is timed too, for reference);
- PyTorch (when torch is importable): the official STARLoss_v2 formula (dense per-pixel
  covariance, `torch.linalg.eigh` on the CPU, as the official code), forward + backward, on the
  same data. Its value is checked against star-jax's first.

Like with like. Each setting of `--settings` runs in a child process of its own, and within a
child both sides (and the floor) run under the same process settings
(`benchmarks.common.apply_process_settings`): 'tuned' is what star-jax's entry points set
(glibc malloc keeps large freed blocks, which PyTorch benefits from too, plus XLA:CPU options
that only JAX reads); 'default' is neither. Both sides use every core (XLA by default, torch
through `torch.set_num_threads`). The JAX functions (star-jax, its forward, the floor, one read)
are called in turns, one call each per round, and the headline is the median over rounds of
star-jax / floor within a round; times are medians after warm-up; CPU time (all threads of the
process) is given beside wall time because it moves less when other work shares the cores.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # `python benchmarks/star_loss.py`: import as `python -m` does
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import json
import subprocess

import numpy as np

from benchmarks import common


def make_inputs(batch: int, points: int, size: int, seed: int = 0):
  """Gaussian-blob heatmaps (channels-last) with noise, and nearby ground truth."""
  rng = np.random.default_rng(seed)
  grid = np.arange(size, dtype=np.float32)
  centres = rng.uniform(4, size - 5, (batch, points, 2)).astype(np.float32)
  sigma = rng.uniform(1.0, 3.0, (batch, points, 1)).astype(np.float32)
  gx = np.exp(-0.5 * ((grid[None, None, :] - centres[..., :1]) / sigma) ** 2)   # (B, N, W)
  gy = np.exp(-0.5 * ((grid[None, None, :] - centres[..., 1:]) / sigma) ** 2)   # (B, N, H)
  heatmaps = np.einsum("bnh,bnw->bhwn", gy, gx).astype(np.float32)
  heatmaps += 0.01 * rng.random(heatmaps.shape, dtype=np.float32)
  gt = (centres + rng.normal(0, 1.0, centres.shape)) / (size - 1) * 2 - 1
  return heatmaps, np.clip(gt, -1, 1).astype(np.float32)


def _timing(walls, cpus) -> dict[str, float]:
  return {"wall": common.median(walls), "min": min(walls), "cpu": common.median(cpus)}


def measure(args) -> dict:
  """Child process: every row under this process's settings, as a JSON-able dict."""
  settings = common.apply_process_settings(args.process_settings)
  import jax
  import jax.numpy as jnp
  from star_jax.core.losses import star_loss

  heatmaps_np, gt_np = make_inputs(args.batch, args.points, args.size)
  heatmaps, gt = jnp.asarray(heatmaps_np), jnp.asarray(gt_np)
  sync = jax.block_until_ready
  result = {"settings": settings, "mb": heatmaps_np.nbytes / 1e6, "rows": {}}

  def add(name, fn, repeats, warmup=3, sync=sync):
    walls, cpus = common.time_calls(fn, warmup=warmup, repeats=repeats, sync=sync)
    result["rows"][name] = _timing(walls, cpus)
    print(args.process_settings, name, result["rows"][name], flush=True)

  fwd_bwd = jax.jit(jax.value_and_grad(star_loss))
  fwd = jax.jit(star_loss)
  floor = jax.jit(lambda h: h * h.sum(axis=(1, 2), keepdims=True))
  read_once = jax.jit(lambda h: h.sum(axis=(1, 2)))
  # In turns, one call of each per round: a shared machine's slow moments (other work, memory
  # bandwidth taken by neighbours) then fall on every row alike, and the per-round ratio
  # star-jax / floor compares calls made a few milliseconds apart.
  jax_rows = {"star-jax": lambda: fwd_bwd(heatmaps, gt),
              "star-jax forward": lambda: fwd(heatmaps, gt),
              "floor": lambda: floor(heatmaps), "read once": lambda: read_once(heatmaps)}
  times = {name: ([], []) for name in jax_rows}
  for fn in jax_rows.values():
    common.time_calls(fn, warmup=3, repeats=0, sync=sync)
  for _ in range(args.repeats):
    for name, fn in jax_rows.items():
      walls, cpus = common.time_calls(fn, warmup=0, repeats=1, sync=sync)
      times[name][0].extend(walls)
      times[name][1].extend(cpus)
  for name, (walls, cpus) in times.items():
    result["rows"][name] = _timing(walls, cpus)
    print(args.process_settings, name, result["rows"][name], flush=True)
  ratios = [a / b for a, b in zip(times["star-jax"][0], times["floor"][0])]
  result["round_ratio"] = {"median": common.median(ratios), "min": min(ratios)}
  result["jax_value"] = float(fwd(heatmaps, gt))
  try:
    import torch
  except ImportError:
    result["torch"] = None
    return result
  from benchmarks.gpu_check import torch_star_v2
  threads = os.cpu_count() or 1
  torch.set_num_threads(threads)
  heat_t = torch.from_numpy(heatmaps_np.transpose(0, 3, 1, 2).copy())
  gt_t = torch.from_numpy(gt_np)

  def torch_step():
    h = heat_t.detach().requires_grad_(True)
    loss = torch_star_v2(torch, h, gt_t)
    loss.backward()
    return h.grad

  with torch.no_grad():
    result["torch_value"] = float(torch_star_v2(torch, heat_t, gt_t))
  result["torch"] = f"{torch.__version__}, {threads} intra-op threads"
  add("PyTorch", torch_step, max(5, args.repeats // 2), warmup=2, sync=lambda x: x)
  return result


def _child(args, settings: str) -> dict:
  flags = [f"--batch={args.batch}", f"--points={args.points}", f"--size={args.size}",
           f"--repeats={args.repeats}", f"--process_settings={settings}", "--child"]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = subprocess.run([sys.executable, "-m", "benchmarks.star_loss", *flags], cwd=root,
                       capture_output=True, text=True, check=False)
  lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
  if run.returncode != 0 or not lines:
    sys.stderr.write(run.stdout[-3000:] + run.stderr[-3000:])
    raise SystemExit(f"star_loss child ({settings}): measurement failed (exit {run.returncode})")
  print("\n".join(line for line in run.stdout.splitlines() if not line.startswith("RESULT ")))
  return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--points", type=int, default=98)
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--settings", default="tuned,default",
                      help="comma list of process settings to measure, each in its own process")
  common.add_common_flags(parser)
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print("RESULT " + json.dumps(measure(args)), flush=True)
    return
  modes = [m for m in args.settings.split(",") if m]
  for mode in modes:
    if mode not in common.PROCESS_SETTINGS:
      parser.error(f"--settings: {mode!r} is not one of {common.PROCESS_SETTINGS}")

  rows, notes = [], []
  for mode in modes:
    r = _child(args, mode)
    t = r["rows"]
    ours, floor = t["star-jax"], t["floor"]
    torch_t = t.get("PyTorch")
    vs_torch = (f"{torch_t['wall'] / ours['wall']:.1f}x ({torch_t['cpu'] / ours['cpu']:.1f}x)"
                if torch_t else "torch not installed")
    rounds = r["round_ratio"]
    rows.append([mode, f"{ours['wall'] * 1e3:.2f} ({ours['cpu'] * 1e3:.2f})",
                 f"{floor['wall'] * 1e3:.2f} ({floor['cpu'] * 1e3:.2f})",
                 f"**{rounds['median']:.2f}x** (min {rounds['min']:.2f}x; of the medians "
                 f"{ours['wall'] / floor['wall']:.2f}x, CPU {ours['cpu'] / floor['cpu']:.2f}x)",
                 f"{t['star-jax forward']['wall'] * 1e3:.2f}",
                 f"{torch_t['wall'] * 1e3:.1f} ({torch_t['cpu'] * 1e3:.1f})" if torch_t else "-",
                 vs_torch])
    notes.append(f"{mode}: {r['settings']}; one read of the heatmaps (a sum over H, W) "
                 f"{t['read once']['wall'] * 1e3:.2f} ms")
    if r.get("torch"):
      rel = abs(r["torch_value"] / r["jax_value"] - 1)
      notes.append(f"{mode}: torch {r['torch']}; loss values agree to {rel:.1e} (relative)")
  title = (f"STAR loss forward+backward vs the memory floor and PyTorch, B={args.batch} "
           f"N={args.points} {args.size}x{args.size} float32 "
           f"({args.batch * args.points * args.size ** 2 * 4 / 1e6:.0f} MB)")
  common.record(
      title,
      ["process settings (both sides)", "star-jax fwd+bwd ms (CPU ms)",
       "floor: read 2x + write 1x ms (CPU ms)", "star-jax / floor: median of the rounds",
       "star-jax fwd only ms", "PyTorch official formula fwd+bwd ms (CPU ms)",
       "PyTorch / star-jax (CPU)"],
      rows,
      notes=("headline: star-jax / floor, the median over rounds of the ratio of two calls "
             "made in the same round. Each row is one process; within it every column ran "
             f"under the same settings: {args.repeats} rounds of one call of each JAX function "
             "in turn after warm-up (medians of those calls), then PyTorch "
             f"({max(5, args.repeats // 2)} calls). "
             + "; ".join(notes) + f"; {common.load_average()} at the end"),
      write=args.record)


if __name__ == "__main__":
  main()
