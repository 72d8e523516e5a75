"""HRNetV2-W18 beside the STAR hourglasses: the speed table (per face and video with tracking).

    python -m benchmarks.hrnet [--models hourglass,rt128,rt64,hrnet] [--repeats 20]
        [--threads 2] [--frames 90] [--calibration_crops 16] [--process_settings tuned|default]
        [--record]
    python benchmarks/hrnet.py --help

Models as their configs build them, 98 points (WFLW), random weights (speed does not depend on
them): `hourglass` = configs/wflw.py (4 hourglasses x 256 channels, AAM, 256 px), `rt128` =
configs/realtime_2x128.py and `rt64` = configs/realtime_1x64.py (128 px), `hrnet` =
configs/wflw_hrnet.py (HRNetV2-W18, soft-argmax decode, 256 px).

Per face, batch 1: parameters; GFLOP (XLA's cost analysis of the jitted inference pass, heatmaps
to landmarks; a multiply-add counts 2); ms per face, the median of `--repeats` calls after
warm-up, for jitted JAX, ONNX Runtime float32 and ONNX Runtime int8 (`--quantize int8`: static
QDQ, calibrated on `--calibration_crops` embedded-dataset crops; the count does not change the
speed), the ONNX files exported at batch 1 by `star_jax.deploy.export.exporter`, ONNX Runtime
with `--threads` intra-op threads, whose workers sleep between operators (the runtime's
default) or spin (`RuntimePredictor(spin=True)`, `predict --spin`: for cores of its own); the
targets are read on the spinning rows. Beside HRNet's targets stands its floor on this CPU: its
GFLOP at the float32 and int8 GEMM peaks of benchmarks/cpu_peak.py, measured in the same run.

Video, end to end: a `--frames`-frame 640x480 MPEG-4 clip of one moving face
(`star_jax.deploy.clips`, as benchmarks/video_tracking.py) through `star_jax.deploy.video.run_video`
(decode thread, tracker, network, drawing, MPEG-4 + JSONL writing) with the ONNX Runtime
exports in `RuntimePredictor`. A network with random weights does not give a face's landmarks,
so the tracker's lost-face checks would call the detector on every frame; the `tracking` rows
turn those checks off (`TrackerConfig` fill, shift, segment and drift bounds opened), which gives
the workload of a trained model: the network on every frame and the detector every
`redetect_every` (10) frames. The `detector every frame` rows keep the default tracker (the
worst case: what a random network does).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as `python benchmarks/hrnet.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from benchmarks import common, cpu_peak

VIDEO_SIZE = (640, 480)
# The targets for HRNet at 256 px.
TARGET_INT8_MS = 15.0
TARGET_VIDEO_FPS = 30.0


def configs() -> dict:
  """name -> (label, config)."""
  import importlib
  from configs import wflw, wflw_hrnet
  realtime_2x128 = importlib.import_module("configs.realtime_2x128")
  realtime_1x64 = importlib.import_module("configs.realtime_1x64")
  return {"hourglass": ("STAR hourglass 4x256 (configs/wflw.py)", wflw.get_config()),
          "rt128": ("hourglass 2x128 (configs/realtime_2x128.py)", realtime_2x128.get_config()),
          "rt64": ("hourglass 1x64 (configs/realtime_1x64.py)", realtime_1x64.get_config()),
          "hrnet": ("HRNetV2-W18 (configs/wflw_hrnet.py)", wflw_hrnet.get_config())}


def _loaded(name: str, config):
  """A `model_store.LoadedModel` of `config`'s network with random weights."""
  from star_jax.core import schemes as datasets
  from star_jax.models import create_model, init_variables
  from star_jax.training import finetune
  from star_jax.training.model_store import LoadedModel
  config = finetune.resolve_model_config(config)
  size = int(config.data.image_size)
  model = create_model(config.model, datasets.WFLW)
  variables = init_variables(model, 0, size)
  return LoadedModel(model, variables, datasets.WFLW, size, source=f"random {name}",
                     weights="raw")


def _jax_row(loaded, repeats: int) -> tuple[float, float, float]:
  """(parameters, GFLOP, median ms) of the jitted inference pass at batch 1."""
  import jax
  import jax.numpy as jnp
  from star_jax.models import count_parameters, parameter_shapes
  model, size = loaded.model, loaded.image_size
  variables = jax.device_put(loaded.variables)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False).landmarks[-1])
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  cost = forward.lower(variables, images).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  walls, _ = common.time_calls(lambda: forward(variables, images), warmup=2, repeats=repeats,
                               sync=jax.block_until_ready)
  params = count_parameters(parameter_shapes(model, size)["params"])
  return params, cost["flops"] / 1e9, 1000 * statistics.median(walls)


def _onnx_ms(path: str, size: int, repeats: int, threads: int, spin: bool) -> float:
  from star_jax.deploy.runtime import backends
  runner = backends.load_model(path, threads=threads, spin=spin)
  crop = np.random.default_rng(0).uniform(0, 255, (1, size, size, 3)).astype(np.float32)
  walls, _ = common.time_calls(lambda: runner(crop), warmup=3, repeats=repeats)
  return 1000 * statistics.median(walls)


def _video_fps(path: str, source: str, folder: str, threads: int, lenient: bool,
               spin: bool) -> tuple[float, int, int, int]:
  """(frames/s, frames with a face, frames, detector runs) of `run_video` on `source`."""
  from star_jax.deploy import tracking, video
  from star_jax.deploy.runtime import RuntimePredictor
  predictor = RuntimePredictor(path, batch_size=1, threads=threads, spin=spin)
  config = tracking.TrackerConfig()
  if lenient:
    config = tracking.TrackerConfig(lost_min_fill=0.0, lost_max_fill=math.inf,
                                    lost_max_shift=math.inf, lost_max_segment=math.inf,
                                    lost_max_drift=math.inf)
  # Warm-up: the engine's first calls (allocation) and the detector's.
  warm = predictor.tracker(config)
  for k in range(3):
    warm.update(np.zeros(VIDEO_SIZE[::-1] + (3,), np.uint8), k / 30)
  tracker = predictor.tracker(config)
  report = video.run_video(source, os.path.join(folder, "out"), "moving", tracker=tracker,
                           progress=False)
  return report.fps, report.frames_with_faces, report.frames, report.detections_run


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default="hourglass,rt128,rt64,hrnet",
                      help="comma-separated: hourglass, rt128, rt64, hrnet")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
  parser.add_argument("--frames", type=int, default=90, help="frames of the video clip")
  parser.add_argument("--calibration_crops", type=int, default=16)
  common.add_common_flags(parser)
  args = parser.parse_args(argv)
  table = configs()
  names = [n.strip() for n in args.models.split(",") if n.strip()]
  unknown = [n for n in names if n not in table]
  if unknown:
    parser.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(table)}")
  settings = common.apply_process_settings(args.process_settings)
  from star_jax.deploy import clips, video
  from star_jax.deploy.export import exporter, quantize
  loads = [os.getloadavg()[0]]
  folder = tempfile.mkdtemp(prefix="star_jax_hrnet_bench_")
  rows, video_rows, results = [], [], {}
  try:
    moving = clips.moving_face_clip(args.frames, size=VIDEO_SIZE, seed=0)
    source = video.write_clip(os.path.join(folder, "moving.mp4"), moving.frames, moving.fps,
                              VIDEO_SIZE)
    for name in names:
      label, config = table[name]
      loaded = _loaded(name, config)
      size = loaded.image_size
      params, gflop, jax_ms = _jax_row(loaded, args.repeats)
      loads.append(os.getloadavg()[0])
      calibration = quantize.embedded_calibration_crops(size, count=args.calibration_crops)
      paths = {}
      for engine, quant in (("float32", None), ("int8", "int8")):
        t0 = time.perf_counter()
        out = os.path.join(folder, f"{name}_{engine}.onnx")
        paths[engine] = exporter.export(loaded, "onnx", out, batch=1, quantize=quant,
                                        calibration=calibration).path
        print(f"{name}: exported {engine} in {time.perf_counter() - t0:.0f} s", flush=True)
      ort_ms = {(engine, spin): _onnx_ms(path, size, args.repeats, args.threads, spin)
                for engine, path in paths.items() for spin in (False, True)}
      loads.append(os.getloadavg()[0])
      results[name] = {"int8_ms": ort_ms["int8", True], "gflop": gflop}
      rows.append([label, f"{size}x{size}", f"{params / 1e6:.2f}", f"{gflop:.2f}",
                   f"{jax_ms:.1f}"] + [f"{ort_ms[engine, spin]:.1f}" for engine in
                                       ("float32", "int8") for spin in (False, True)])
      for engine, lenient, spin in (("int8", True, True), ("int8", True, False),
                                    ("float32", True, True), ("int8", False, True)):
        fps, seen, frames, detections = _video_fps(paths[engine], source, folder, args.threads,
                                                   lenient, spin)
        loads.append(os.getloadavg()[0])
        if engine == "int8" and lenient and spin:
          results[name]["fps"] = fps
        threads = "spinning" if spin else "sleeping"
        video_rows.append([label, f"ONNX Runtime {engine}, {threads}",
                           "tracking" if lenient else "detector every frame", f"{fps:.1f}",
                           f"{seen}/{frames}", detections])
        print(f"{name}: video {engine} {threads} {'tracking' if lenient else 'detector'}: "
              f"{fps:.1f} fps", flush=True)
  finally:
    shutil.rmtree(folder, ignore_errors=True)
  load = (f"1-min load average {min(loads):.1f}-{max(loads):.1f} during the run "
          f"(sampled {len(loads)} times) on {os.cpu_count()} cores")
  targets = []
  if "hrnet" in results:
    hr = results["hrnet"]
    peaks = {kind: cpu_peak.peak_gops(kind, threads=args.threads) for kind in ("float32", "int8")}
    targets.append(
        f"floor on this CPU (benchmarks/cpu_peak.py, {args.threads} threads): HRNet's "
        f"{hr['gflop']:.2f} GFLOP take at least {cpu_peak.floor_ms(hr['gflop'], peaks['int8']):.1f}"
        f" ms at the int8 GEMM peak ({peaks['int8']:.0f} G op/s) and "
        f"{cpu_peak.floor_ms(hr['gflop'], peaks['float32']):.1f} ms at the float32 one "
        f"({peaks['float32']:.0f} GFLOP/s)")
    ms_met = "met" if hr["int8_ms"] <= TARGET_INT8_MS else "not met"
    fps_met = "met" if hr["fps"] >= TARGET_VIDEO_FPS else "not met"
    targets += [
        f"target: HRNet at 256 px at most {TARGET_INT8_MS:g} ms per face with ONNX Runtime int8 "
        "(spinning): "
        f"measured {hr['int8_ms']:.1f} ms, {ms_met}",
        f"target: at least {TARGET_VIDEO_FPS:g} frames/s end to end on 640x480 video with "
        f"tracking: measured {hr['fps']:.1f} frames/s (ONNX Runtime int8, spinning), {fps_met}"]
  common.record(
      "HRNetV2-W18 beside the STAR hourglasses: ms per face (batch 1)",
      ["model", "input", "parameters (M)", "GFLOP / face", "JAX ms",
       "ONNX Runtime float32 ms (sleeping)", "float32 ms (spinning)", "int8 ms (sleeping)",
       "int8 ms (spinning)"], rows,
      notes=(f"98 points (WFLW), random weights; median of {args.repeats} calls after warm-up, "
             f"batch 1, wall time; ONNX Runtime (CPU) with {args.threads} intra-op threads "
             "that sleep or spin between operators, int8 = "
             f"static QDQ calibrated on {args.calibration_crops} embedded crops; JAX jitted on "
             f"the CPU; {settings}; {load}"),
      extra_lines=targets, write=args.record)
  common.record(
      "HRNetV2-W18 beside the STAR hourglasses: video with tracking, 640x480 (frames/s)",
      ["model", "engine", "tracker", "frames/s end to end (wall)", "frames with a face",
       "detector runs"], video_rows,
      notes=(f"{args.frames}-frame synthetic MPEG-4 clip, one moving face (~170 px), "
             f"run_video (decode, track, network, draw, encode MP4 + JSONL), RuntimePredictor "
             f"batch 1, {args.threads} threads, default detector; 'tracking': lost-face checks "
             "off, detector every 10 frames (a trained model's workload; the weights are "
             "random); 'detector every frame': default tracker; " + load),
      write=args.record)


if __name__ == "__main__":
  main()
