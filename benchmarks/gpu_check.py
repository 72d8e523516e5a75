"""GPU readiness check and timings (the Python behind `benchmarks/gpu.sh`).

Needs only JAX, flax, optax, numpy (torch optional): no TensorFlow, no tf.data, no
ml_collections. In order:
1. correctness against float64 references:
   - the model: the official 32-channel WFLW fixture (tests/fixtures/official_wflw_small)
     converted with `star_jax.commands.convert`, float32 on the accelerator vs the official float32
     and float64 outputs (with the official boundary masks fed, so the 0.05 hard switch
     cannot amplify rounding), with the model built at `precision="highest"` (what
     `load_official_checkpoint` returns: every convolution and product in full float32; the
     check), then the same model at the backend's default precision (TF32 on NVIDIA GPUs),
     reported for information. No process-wide matmul precision is set, so the check fails if
     any layer does not carry the model's precision;
   - the STAR loss and its gradient: float32 on the accelerator vs float64 on the CPU (JAX), and
     vs a PyTorch float64 implementation of the official formula when torch is installed;
2. STAR loss forward+backward timing (B=32, N=98, 64x64, float32) against the memory floor on
   the same device (a jitted pass reading the heatmaps twice and writing them once: what any
   forward + backward of such a loss must move; the ratio is the headline), and against PyTorch
   running the official formula on the same device, including the official CPU round trip for
   `eigh` (in a child process with the same process settings);
3. the full train step (`star_jax.training.train_lib.train_step`, as training maps it) at batch
   32/64/128 in bfloat16 and float32: images/s, achieved TFLOP/s and MFU.

The summary table is printed last and written to `$OUT/gpu_results.md` when `$OUT` is set.
Environment: `GPU_CHECK_DRY=1` runs tiny sizes (a CPU smoke test of this script);
`GPU_CHECK_BUDGET_S` (default 285) is the wall-clock budget: train-step configurations that
would not fit are skipped and reported as such. Each configuration compiles for about two
minutes on an H200 (measured), so the default budget times bf16 (then float32) at batch 128;
`GPU_CHECK_BUDGET_S=560` gives the whole table within a 10-minute limit.
`GPU_CHECK_PROFILE=1` (with `$OUT`) also traces three steps of the first train-step
configuration into `$OUT/trace` (jax.profiler; TensorBoard or Perfetto).

Run from the repository root: `python3 -m benchmarks.gpu_check [--record]` (gpu.sh sets the
environment); `--record` also appends the summary to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # `python benchmarks/gpu_check.py`: import as `python -m` does
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import functools
import json
import subprocess
import tempfile
import time
import traceback

import numpy as np

START = time.time()
DRY = os.environ.get("GPU_CHECK_DRY", "") not in ("", "0")
PROFILE = os.environ.get("GPU_CHECK_PROFILE", "") not in ("", "0")
BUDGET_S = float(os.environ.get("GPU_CHECK_BUDGET_S", "285"))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "official_wflw_small")

# Peak dense throughput of H100/H200 SXM (per GPU), for MFU.
PEAK_BF16_TFLOPS = 989.0
PEAK_TF32_TFLOPS = 495.0

# Sizes: (loss timing batch, points, heatmap side), train-step batches and model overrides.
LOSS_SHAPE = (2, 98, 64) if DRY else (32, 98, 64)
LOSS_CHECK_SHAPE = (2, 98, 64) if DRY else (4, 98, 64)
TRAIN_BATCHES = (2, 4) if DRY else (32, 64, 128)
TRAIN_MODEL = dict(channels=16, num_stacks=1, num_levels=1, image_size=64) if DRY else {}
# Which train-step configurations run first when time is short: the bf16 headline first.
_BIG = max(TRAIN_BATCHES)
TRAIN_ORDER = ([("bfloat16", _BIG), ("float32", _BIG)]
               + [("bfloat16", b) for b in sorted(TRAIN_BATCHES, reverse=True) if b != _BIG]
               + [("float32", b) for b in sorted(TRAIN_BATCHES, reverse=True) if b != _BIG])

RESULTS: list[str] = []     # summary lines (printed last)
FAILURES: list[str] = []


def elapsed() -> float:
  return time.time() - START


def log(msg: str) -> None:
  print(f"[{elapsed():6.1f}s] {msg}", flush=True)


def verdict(name: str, error: float, threshold: float, extra: str = "") -> None:
  ok = bool(np.isfinite(error) and error <= threshold)
  line = (f"{'PASS' if ok else 'FAIL'} {name}: max error {error:.2e} "
          f"(threshold {threshold:.0e}){extra}")
  log(line)
  RESULTS.append(line)
  if not ok:
    FAILURES.append(name)


# ---------------------------------------------------------------------------------------------
# Shared inputs for the loss (deterministic, written for the torch subprocess).

def loss_inputs(batch: int, points: int, side: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Anisotropic Gaussian blobs plus a little positive noise, (B, H, W, N), and landmarks near
  the blob centres (B, N, 2) in [-1, 1]: well-conditioned covariances, like trained heatmaps."""
  rng = np.random.default_rng(seed)
  grid = np.linspace(-1, 1, side)
  y, x = np.meshgrid(grid, grid, indexing="ij")
  centre = rng.uniform(-0.7, 0.7, (batch, points, 2))
  sx, sy = rng.uniform(0.03, 0.2, (2, batch, points))
  angle = rng.uniform(0, np.pi, (batch, points))
  c, s = np.cos(angle), np.sin(angle)
  dx = x[None, None] - centre[..., 0, None, None]
  dy = y[None, None] - centre[..., 1, None, None]
  u = c[..., None, None] * dx + s[..., None, None] * dy
  v = -s[..., None, None] * dx + c[..., None, None] * dy
  maps = np.exp(-0.5 * ((u / sx[..., None, None]) ** 2 + (v / sy[..., None, None]) ** 2))
  maps = maps + 0.01 * rng.uniform(0, 1, maps.shape)
  heatmaps = np.ascontiguousarray(maps.transpose(0, 2, 3, 1)).astype(np.float32)
  landmarks = (centre + rng.normal(0, 0.05, centre.shape)).clip(-1, 1).astype(np.float32)
  return heatmaps, landmarks


# ---------------------------------------------------------------------------------------------
# PyTorch: the official STAR v2 formula (run in a subprocess so that torch's CUDA context and
# allocator never compete with JAX's preallocated memory).

def torch_star_v2(torch, heatmap, gt, *, w=1.0, eps=1e-5, beta=0.01, host_eigh=True):
  """Official STARLoss_v2 (smooth-L1) maths on (B, N, H, W) maps; eigh on the CPU if asked."""
  b, n, h, wd = heatmap.shape
  ys = torch.arange(h, dtype=torch.float32) / (h - 1) * 2 - 1
  xs = torch.arange(wd, dtype=torch.float32) / (wd - 1) * 2 - 1
  yy, xx = torch.meshgrid(ys, xs, indexing="ij")
  yy, xx = yy.to(heatmap), xx.to(heatmap)
  p = heatmap / heatmap.sum((2, 3)).clamp(min=1e-6)[..., None, None]
  mx = (xx * p).sum((2, 3))
  my = (yy * p).sum((2, 3))
  centred = torch.stack([xx - mx[..., None, None], yy - my[..., None, None]], 2)
  centred = centred.reshape(b * n, 2, h * wd)
  cov = torch.bmm(p.reshape(b * n, 1, h * wd) * centred, centred.transpose(1, 2))
  v1 = p.sum((2, 3)) + eps
  v2 = (p * p).sum((2, 3)) + eps
  cov = cov.view(b, n, 2, 2) / (v1 - v2 / v1)[..., None, None]
  if host_eigh:  # what the official code does: device -> host, LAPACK, host -> device
    evals, evecs = torch.linalg.eigh(cov.reshape(-1, 2, 2).cpu())
    evals, evecs = evals.to(p.device), evecs.to(p.device)
  else:
    evals, evecs = torch.linalg.eigh(cov.reshape(-1, 2, 2))
  evals, evecs = evals.view(b, n, 2), evecs.view(b, n, 2, 2)
  err = gt - torch.stack([mx, my], -1)
  proj = (evecs * err[..., :, None]).sum(-2)          # projections on the eigenvector columns
  d2 = proj * proj
  huber = torch.where(d2 < beta * beta, 0.5 / beta * d2, d2.clamp(min=1e-6).sqrt() - 0.5 * beta)
  return ((huber / torch.sqrt(evals + eps)).sum(-1) + w * evals.abs().sum(-1)).mean()


def torch_loss_main(in_path: str, out_path: str, process_settings: str) -> None:
  """Subprocess entry: float64 CPU reference of the check inputs and timing of the official
  formula on the accelerator (CPU when there is none), under the parent's process settings."""
  from benchmarks import common
  settings = common.apply_process_settings(process_settings, jax_in_process=False)
  import torch
  data = np.load(in_path)
  result = {"torch": torch.__version__, "cuda": bool(torch.cuda.is_available()),
            "settings": settings}
  # float64 reference (value and gradient) on the CPU.
  h = torch.tensor(data["check_heatmaps"].transpose(0, 3, 1, 2), dtype=torch.float64,
                   requires_grad=True)
  loss = torch_star_v2(torch, h, torch.tensor(data["check_landmarks"], dtype=torch.float64))
  loss.backward()
  np.savez(out_path + ".npz", loss=loss.detach().numpy(),
           grad=h.grad.numpy().transpose(0, 2, 3, 1))
  # Timing on the device.
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  heat = torch.tensor(data["time_heatmaps"].transpose(0, 3, 1, 2), device=device)
  gt = torch.tensor(data["time_landmarks"], device=device)
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  repeats = 3 if DRY else 20

  def run(host_eigh):
    x = heat.detach().requires_grad_(True)
    value = torch_star_v2(torch, x, gt, host_eigh=host_eigh)
    value.backward()
    return x.grad

  for name, host_eigh in (("official_host_eigh", True), ("device_eigh", False)):
    try:
      for _ in range(3):
        run(host_eigh)
      sync()
      times = []
      for _ in range(repeats):
        t0 = time.perf_counter()
        run(host_eigh)
        sync()
        times.append(time.perf_counter() - t0)
      result[name] = float(np.median(times))
    except Exception as e:  # e.g. no device eigh kernel: report, keep the official figure
      result[name + "_error"] = repr(e)[:200]
  result["device"] = str(device) + (f" ({torch.cuda.get_device_name(0)})"
                                    if device.type == "cuda" else "")
  with open(out_path, "w") as f:
    json.dump(result, f)


def run_torch_subprocess(tmp: str, process_settings: str) -> dict | None:
  try:
    import importlib.util
    if importlib.util.find_spec("torch") is None:
      log("torch not installed: skipping the PyTorch reference and timing")
      return None
  except Exception:
    return None
  check_h, check_l = loss_inputs(*LOSS_CHECK_SHAPE, seed=1)
  time_h, time_l = loss_inputs(*LOSS_SHAPE, seed=2)
  in_path, out_path = os.path.join(tmp, "loss_in.npz"), os.path.join(tmp, "torch_out.json")
  np.savez(in_path, check_heatmaps=check_h, check_landmarks=check_l, time_heatmaps=time_h,
           time_landmarks=time_l)
  log("PyTorch official-formula loss (subprocess) ...")
  try:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--torch_loss_child",
                           in_path, out_path, f"--process_settings={process_settings}"],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
  except subprocess.TimeoutExpired:
    log("PyTorch subprocess timed out (180 s): skipped")
    return None
  if proc.returncode != 0:
    log("PyTorch subprocess failed (skipped):\n" + proc.stderr[-2000:])
    return None
  with open(out_path) as f:
    result = json.load(f)
  ref = np.load(out_path + ".npz")
  result["ref_loss"], result["ref_grad"] = float(ref["loss"]), ref["grad"]
  log(f"PyTorch {result['torch']} on {result.get('device')}: official formula fwd+bwd "
      f"{result.get('official_host_eigh', float('nan')) * 1e3:.2f} ms (eigh on the host), "
      f"{result.get('device_eigh', float('nan')) * 1e3:.2f} ms (eigh on the device)")
  return result


# ---------------------------------------------------------------------------------------------
# JAX sections.

def enable_x64():
  import jax
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64 as ctx
  return ctx()


def _apply_with_masks(net, variables, images, masks):
  return net.apply(variables, images, boundary_masks=masks)


def check_model() -> None:
  import jax
  import jax.numpy as jnp
  from star_jax.foreign import official
  reference = dict(np.load(os.path.join(FIXTURE, "outputs.npz")))
  # The official model reads BGR NCHW; ours RGB NHWC.
  images = np.load(os.path.join(FIXTURE, "input.npy")).transpose(0, 2, 3, 1)[..., ::-1].copy()
  model, variables = official.load_official_checkpoint(os.path.join(FIXTURE, "checkpoint.pkl"),
                                                       precision="highest")
  masks = [reference[f"net/boundary_mask_{i}"].astype(bool) for i in (1, 2, 3)]
  # The precision is the model's own (a field every layer receives), never a process-wide
  # default: a layer that drops it shows up here as a TF32-sized error on GPUs.
  for precision in ("highest", None):
    net = model.clone(precision=precision)
    run = jax.jit(functools.partial(_apply_with_masks, net))
    out = run(variables, jnp.asarray(images), [jnp.asarray(m) for m in masks])
    landmarks = [np.asarray(lm, np.float64) for lm in out.landmarks]
    err32 = max(np.abs(landmarks[i] - reference[f"net/landmarks_{i}"]).max() for i in range(4))
    # Stack 0 precedes every mask, so it also compares with the official float64 run directly.
    err64 = np.abs(landmarks[0] - reference["net/landmarks_0_f64"]).max()
    if precision == "highest":
      verdict('model float32 (precision="highest") vs official float32, landmarks of all 4 '
              "stacks (official masks)", err32, 5e-4)
      verdict('model float32 (precision="highest") vs official float64, stack 0 landmarks',
              err64, 5e-4)
    else:
      # What the default precision costs on this backend (TF32 convolutions on NVIDIA GPUs);
      # the fixture's random-weight network amplifies rounding through 4 stacks.
      line = (f"INFO model float32 at precision=None (the backend's default): max landmark "
              f"error {err32:.2e} (all stacks, vs official float32), {err64:.2e} (stack 0, vs "
              f"official float64); 1 heatmap pixel = {2 / 63:.3f}")
      log(line)
      RESULTS.append(line)


def check_loss(torch_result: dict | None) -> None:
  import jax
  import jax.numpy as jnp
  from star_jax.core import losses
  heatmaps, landmarks = loss_inputs(*LOSS_CHECK_SHAPE, seed=1)
  fn = jax.jit(jax.value_and_grad(lambda h, lm: losses.star_loss(h, lm)))
  value32, grad32 = fn(jnp.asarray(heatmaps), jnp.asarray(landmarks))
  value32, grad32 = float(value32), np.asarray(grad32, np.float64)
  cpu = jax.devices("cpu")[0]
  with enable_x64():
    h64 = jax.device_put(np.asarray(heatmaps, np.float64), cpu)
    lm64 = jax.device_put(np.asarray(landmarks, np.float64), cpu)
    value64, grad64 = jax.jit(jax.value_and_grad(lambda h, lm: losses.star_loss(h, lm)))(h64, lm64)
    value64, grad64 = float(value64), np.asarray(grad64, np.float64)
  dev = jax.devices()[0].platform
  grad_scale = np.abs(grad64).max()
  verdict(f"STAR loss float32 ({dev}) vs float64 (cpu), relative value",
          abs(value32 / value64 - 1), 1e-5)
  verdict(f"STAR loss gradient float32 ({dev}) vs float64 (cpu), relative to max |grad|",
          np.abs(grad32 - grad64).max() / grad_scale, 1e-4)
  if torch_result is not None and "ref_loss" in torch_result:
    verdict("STAR loss float64 (JAX) vs official formula float64 (PyTorch), relative value",
            abs(value64 / torch_result["ref_loss"] - 1), 1e-10)
    verdict("STAR loss gradient float64 (JAX) vs official formula float64 (PyTorch)",
            np.abs(grad64 - torch_result["ref_grad"]).max() / grad_scale, 1e-8)


def time_loss(torch_result: dict | None) -> None:
  import jax
  from benchmarks import common
  from star_jax.core import losses
  heatmaps, landmarks = loss_inputs(*LOSS_SHAPE, seed=2)
  h, lm = jax.device_put(heatmaps), jax.device_put(landmarks)
  fn = jax.jit(jax.value_and_grad(lambda h, lm: losses.star_loss(h, lm)))
  # The memory floor: per-map statistics, then an elementwise pass that needs them (2 reads of
  # the heatmaps, 1 write of their size), as the loss's forward + backward at the least.
  floor = jax.jit(lambda h: h * h.sum(axis=(1, 2), keepdims=True))
  times = common.time_fn(lambda: fn(h, lm), warmup=3, repeats=5 if DRY else 50,
                         sync=jax.block_until_ready)
  latency = common.median(times)
  # Back-to-back calls, one sync per 20 (as inside a train step, where nothing waits for the
  # loss): the device time per call without the host round trip of each dispatch.
  calls = 20

  def back_to_back(f, *a):
    windows = common.time_fn(lambda: [f(*a) for _ in range(calls)], warmup=1,
                             repeats=3 if DRY else 10, sync=jax.block_until_ready)
    return common.median(windows) / calls

  ours = back_to_back(fn, h, lm)
  floor_s = back_to_back(floor, h)
  b, n, s = LOSS_SHAPE
  mb = heatmaps.nbytes / 1e6
  line = (f"STAR loss fwd+bwd (B={b}, N={n}, {s}x{s}, float32, {mb:.0f} MB) on "
          f"{jax.devices()[0].device_kind}: {ours / floor_s:.2f}x the memory floor "
          f"({ours * 1e3:.3f} ms per call back to back vs {floor_s * 1e3:.3f} ms for a jitted "
          f"read-twice-write-once pass, {3 * mb / floor_s / 1e3:.0f} GB/s); "
          f"{latency * 1e3:.3f} ms with a sync per call")
  if torch_result and "official_host_eigh" in torch_result:
    official = torch_result["official_host_eigh"]
    line += (f"; official formula in PyTorch on {torch_result['device']} (same process "
             f"settings): {official * 1e3:.2f} ms (eigh on host, as the official code) -> "
             f"{official / ours:.0f}x back to back, {official / latency:.0f}x with a sync per "
             "call")
    if "device_eigh" in torch_result:
      line += f"; with device eigh {torch_result['device_eigh'] * 1e3:.2f} ms"
  log(line)
  RESULTS.append(line)


def time_train_steps() -> list[list[str]]:
  import jax
  from benchmarks import train_step as ts
  kind = jax.devices()[0].device_kind
  rows = {}
  compile_estimate = 0.0
  for dtype, batch in TRAIN_ORDER:
    # Leave room for this configuration's compile (estimated from the last one) and timing.
    if compile_estimate and elapsed() + 1.3 * compile_estimate + 10 > BUDGET_S:
      rows[(dtype, batch)] = [dtype, str(batch), "skipped (time budget)", "", "", "", ""]
      log(f"train step {dtype} batch {batch}: skipped, {elapsed():.0f}s of {BUDGET_S:.0f}s used")
      continue
    config = ts.recipe_config(dtype=dtype, batch_size=batch, **TRAIN_MODEL)
    try:
      profile = (os.path.join(os.environ["OUT"], "trace") if PROFILE and os.environ.get("OUT")
                 and not rows else None)
      result = ts.time_train_step(config, steps_per_window=2 if DRY else 5,
                                  windows=2 if DRY else 3, warmup=2, profile_dir=profile)
    except Exception as e:  # noqa: BLE001 - e.g. out of memory: report it, go on
      msg = str(e).splitlines()[0][:120] if str(e) else repr(e)
      rows[(dtype, batch)] = [dtype, str(batch), f"error: {msg}", "", "", "", ""]
      log(f"train step {dtype} batch {batch}: ERROR {msg}")
      traceback.print_exc()
      continue
    compile_estimate = max(compile_estimate, result["first_call_seconds"])
    seconds = result["seconds"]
    tflops = ts.train_flops(batch, config.data.image_size) / seconds / 1e12
    peak = PEAK_BF16_TFLOPS if dtype == "bfloat16" else PEAK_TF32_TFLOPS
    mfu = f"{100 * tflops / PEAK_BF16_TFLOPS:.1f}%"
    if dtype == "float32":
      mfu += f" ({100 * tflops / peak:.1f}% of TF32)"
    rows[(dtype, batch)] = [dtype, str(batch), f"{seconds * 1e3:.1f}", f"{batch / seconds:.0f}",
                            f"{tflops:.1f}", mfu, f"{result['first_call_seconds']:.0f}"]
    log(f"train step {dtype} batch {batch}: {seconds * 1e3:.1f} ms/step, "
        f"{batch / seconds:.0f} images/s, {tflops:.1f} TFLOP/s, MFU {mfu}, first call "
        f"{result['first_call_seconds']:.0f}s, loss {result['loss']:.4f}, windows "
        f"{[round(t * 1e3, 1) for t in result['all']]} ms ({kind})")
  ordered = [rows[k] for k in sorted(rows, key=lambda k: (k[0] != "bfloat16", k[1]))]
  return ordered


def section(name: str, fn, *args):
  log(f"== {name}")
  try:
    return fn(*args)
  except Exception as e:  # noqa: BLE001 - one broken section must not hide the others
    traceback.print_exc()
    line = f"FAIL {name}: {type(e).__name__}: {str(e)[:200]}"
    log(line)
    RESULTS.append(line)
    FAILURES.append(name)
    return None


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  from benchmarks import common
  common.add_common_flags(parser)
  parser.add_argument("--torch_loss_child", nargs=2, metavar=("IN", "OUT"),
                      help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.torch_loss_child:
    torch_loss_main(*args.torch_loss_child, args.process_settings)
    return 0
  with tempfile.TemporaryDirectory() as tmp:
    torch_result = section("PyTorch official loss", run_torch_subprocess, tmp,
                           args.process_settings)
  settings = common.apply_process_settings(args.process_settings)
  import jax
  log(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
  log(f"machine: {common.machine()}; versions: {common.versions()}")
  log(f"{settings} (the PyTorch child applies the same)")
  if jax.default_backend() == "cpu" and not DRY:
    log("WARNING: no accelerator visible to JAX; the timings below are CPU timings")
  section("model check", check_model)
  section("loss check", check_loss, torch_result)
  section("loss timing", time_loss, torch_result)
  rows = section("train step timing", time_train_steps) or []

  model = ("WFLW 4 stacks x 4 levels, 256 ch, 256x256" if not DRY
           else f"DRY RUN tiny model {TRAIN_MODEL}")
  header = ["dtype", "batch", "ms / step", "images/s", "TFLOP/s", "MFU (bf16 peak 989)",
            "first call s"]
  verdict_line = (f"{'ALL CHECKS PASSED' if not FAILURES else 'FAILED: ' + '; '.join(FAILURES)} "
                  f"(total {elapsed():.0f}s)")
  caption = (f"Train step ({model}; STAR + AWing, Adam, EMA; synthetic on-device batch; "
             f"TFLOP/s = 3 x {34.7} GFLOP x images/s; TF32 peak 495):")
  summary = "\n".join([
      f"## GPU check ({common.machine()}; {common.versions()}; "
      f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
      f"- {settings}", *[f"- {line}" for line in RESULTS], "", caption, "",
      common.format_table(header, rows), "", verdict_line])
  print("\n" + summary, flush=True)
  out = os.environ.get("OUT")
  if out:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu_results.md"), "w") as f:
      f.write(summary + "\n")
  if args.record:
    common.record(f"GPU check (benchmarks/gpu.sh){' DRY RUN' if DRY else ''}", header, rows,
                  notes=f"{caption[:-1]}; {verdict_line}", write=True,
                  extra_lines=[settings, *RESULTS])
  return 1 if FAILURES else 0


if __name__ == "__main__":
  sys.exit(main())
