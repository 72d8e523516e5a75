"""Exported models on this CPU: latency, throughput, file size, export time, int8 accuracy.

    python -m benchmarks.export [--models full,rt128,rt64] [--rounds 5] [--record]
    python benchmarks/export.py --help

Models (random weights: speed does not depend on them): `full` = the WFLW network (4 stacks x
256 channels), `rt128` = 2 stacks x 128 channels, `rt64` = 1 stack x 64 channels (the real-time
sizes of issue 13), all 4 levels, 256 px input. Engines: jitted JAX (`star_jax.commands.host`
tuning,
as `star_jax.deploy.predict` runs it), ONNX Runtime (CPU), LiteRT with XNNPACK, and the int8
dynamic-range exports of the last two. Each row is timed in interleaved rounds (one call of
every engine per round, so that load from other processes hits all engines alike); the table
gives the median and the minimum over rounds. Batch 1: latency; batch 32: images per second.

`--nme CHECKPOINT` (default `runs/demo`, what `make demo` trains, when present) evaluates the
float32, int8 and float16-weight (`_f16w`) exports on the embedded test split with the official
evaluation crop (`eval_lib.predict_split`) and reports the NME change against the JAX model.

The runtime's import-to-first-landmark time is measured in a fresh interpreter: from before
`import star_jax.deploy.runtime` to the first landmarks of one image with a given box.
Nothing is written to benchmarks/RESULTS.md unless `--record` is given.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # `python benchmarks/export.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from benchmarks import common

MODELS = {"full": (4, 256), "rt128": (2, 128), "rt64": (1, 64)}
# engine -> (format, --quantize); "jax" is the jitted model itself.
EXPORTS = {"onnx": ("onnx", None), "onnx_int8": ("onnx", "int8"),
           "onnx_int8dyn": ("onnx", "int8-dynamic"), "tflite": ("tflite", None),
           "tflite_int8": ("tflite", "int8")}
ENGINES = ("jax",) + tuple(EXPORTS)
IMAGE_SIZE = 256


def _model(name: str):
  stacks, channels = MODELS[name]
  return common.random_wflw_model(name, stacks=stacks, channels=channels, image_size=IMAGE_SIZE)


def _export_all(loaded, directory: str, batches: list[int]) -> tuple[dict, list]:
  """Exports every engine's files; returns {(engine, batch): path} and size/time rows."""
  from star_jax.deploy.export import exporter
  paths, rows = {}, []
  for engine, (fmt, quantize) in EXPORTS.items():
    # ONNX has a symbolic batch; TFLite gets one file per batch size.
    for batch in ([None] if fmt == "onnx" else batches):
      path = os.path.join(directory, f"{engine}_{batch or 'any'}.{fmt}")
      result = exporter.export(loaded, fmt, path, batch=batch, quantize=quantize)
      for b in (batches if batch is None else [batch]):
        paths[(engine, b)] = result.path
      rows.append((engine, batch or "any", exporter.file_size(path) / 2 ** 20, result.seconds))
  return paths, rows


def _engine_calls(loaded, paths: dict, batch: int, images: np.ndarray, threads: int | None):
  import jax
  from star_jax.training import eval_lib
  from star_jax.deploy.export.exporter import inference_model
  from star_jax.deploy.runtime import backends
  model = inference_model(loaded.model)
  landmark_fn = eval_lib.make_landmark_fn(model)
  variables = jax.device_put(loaded.variables)
  calls = {"jax": lambda: jax.block_until_ready(
      landmark_fn(variables, eval_lib.normalize_crops(images)))}
  for engine in ENGINES[1:]:
    runner = backends.load_model(paths[(engine, batch)], threads=threads)
    calls[engine] = lambda runner=runner: runner(images)
  return calls


def _time_interleaved(calls: dict, rounds: int, warmup: int) -> dict[str, list[float]]:
  for call in calls.values():  # warm-up (compilation, allocation)
    for _ in range(warmup):
      call()
  times = {name: [] for name in calls}
  for _ in range(rounds):
    for name, call in calls.items():
      start = time.perf_counter()
      call()
      times[name].append(time.perf_counter() - start)
  return times


FIRST_LANDMARK = """
import time
start = time.perf_counter()
import numpy as np
from star_jax.deploy.runtime import RuntimePredictor
image = np.full((480, 640, 3), 128, np.uint8)
faces = RuntimePredictor({path!r}).predict(image, boxes=[(200, 120, 440, 360)])
assert faces and faces[0].shape[1] == 2
import sys
assert "jax" not in sys.modules and "tensorflow" not in sys.modules
print(time.perf_counter() - start)
"""


def _first_landmark_seconds(path: str, repeats: int = 3) -> float:
  """Median over fresh interpreters of import-to-first-landmark (seconds)."""
  values = []
  for _ in range(repeats):
    run = subprocess.run([sys.executable, "-c", FIRST_LANDMARK.format(path=path)],
                         capture_output=True, text=True, check=True)
    values.append(float(run.stdout.strip().splitlines()[-1]))
  return float(np.median(values))


def _nme_rows(checkpoint: str, directory: str) -> list[list[str]]:
  """NME (%) on the embedded test split: JAX vs the float32 and int8 exports."""
  from star_jax.training import eval_lib, model_store
  from star_jax.core.schemes import get_spec
  from star_jax.deploy.export import exporter
  from star_jax.deploy.runtime import backends

  loaded = model_store.load_model(checkpoint)
  config = loaded.config
  spec = get_spec(config.dataset)
  size = loaded.image_size

  def exported(path):
    """An exported model as a `predict_split` landmark function: [-1, 1] in, [-1, 1] out."""
    runner = backends.load_model(path)

    def landmark_fn(_, images):
      pixels = runner((np.asarray(images, np.float32) + 1) / 2 * 255)
      return (2 * pixels.astype(np.float64) + 1) / size - 1
    return landmark_fn

  def nme(landmark_fn=None) -> float:
    out = eval_lib.predict_split(config, loaded, split="test", progress=False,
                                 landmark_fn=landmark_fn)
    metrics, _, _ = eval_lib.compute_metrics(out["landmarks"], out["landmarks_gt"], spec,
                                             image_paths=out["image_paths"], tags=out["tags"],
                                             image_dir=out["image_dir"])
    return 100 * metrics["nme"]

  reference = nme()
  rows = [["JAX float32", f"{reference:.4f}", "-"]]
  variants = [(engine, fmt, quantize, "float32") for engine, (fmt, quantize) in EXPORTS.items()]
  variants += [("onnx_f16w", "onnx", None, "float16"), ("tflite_f16w", "tflite", None, "float16")]
  for engine, fmt, quantize, dtype in variants:
    path = os.path.join(directory, f"nme_{engine}.{fmt}")
    exporter.export(loaded, fmt, path, quantize=quantize, dtype=dtype,
                    batch=8 if fmt == "tflite" else None)
    value = nme(exported(path))
    rows.append([engine, f"{value:.4f}", f"{value - reference:+.4f}"])
  return rows


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.export",
                                   description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split("\n\n", 1)[1])
  parser.add_argument("--models", default="full,rt128,rt64",
                      help="comma-separated from " + ", ".join(MODELS) +
                      " ('' for the NME rows only)")
  parser.add_argument("--batch_sizes", default="1,32")
  parser.add_argument("--rounds", type=int, default=5,
                      help="interleaved timing rounds at batch sizes below 8")
  parser.add_argument("--large_rounds", type=int, default=2,
                      help="interleaved timing rounds at batch sizes 8 and above")
  parser.add_argument("--threads", type=int, default=None, help="engine threads (default: all)")
  parser.add_argument("--nme", default="runs/demo",
                      help="trained checkpoint for the int8 NME rows ('' to skip)")
  parser.add_argument("--record", action="store_true", help="append the tables to RESULTS.md")
  args = parser.parse_args(argv)
  from star_jax.commands import host
  host.configure_process()
  host.hide_xla_flags_from_tensorflow()  # TensorFlow's XLA aborts on jaxlib's options

  batches = [int(b) for b in args.batch_sizes.split(",")]
  names = [name for name in args.models.split(",") if name]
  unknown = sorted(set(names) - set(MODELS))
  if unknown:
    parser.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)}")
  speed_rows, size_rows, start_rows, summary = [], [], [], {}
  load_before = os.getloadavg()[0]
  with tempfile.TemporaryDirectory(prefix="star_jax_bench_export_") as directory:
    for name in names:
      loaded = _model(name)
      model_dir = os.path.join(directory, name)
      os.makedirs(model_dir)
      paths, rows = _export_all(loaded, model_dir, batches)
      size_rows += [[name, engine, batch, f"{mib:.1f}", f"{seconds:.1f}"]
                    for engine, batch, mib, seconds in rows]
      for batch in batches:
        images = np.random.default_rng(0).uniform(
            0, 255, (batch, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
        calls = _engine_calls(loaded, paths, batch, images, args.threads)
        large = batch >= 8
        times = _time_interleaved(calls, args.large_rounds if large else args.rounds,
                                  warmup=1 if large else 2)
        jax_median = float(np.median(times["jax"]))
        for engine, values in times.items():
          median = float(np.median(values))
          summary[(name, batch, engine)] = median
          speed_rows.append([name, batch, engine, f"{1000 * median:.1f}",
                             f"{1000 * min(values):.1f}", f"{batch / median:.2f}",
                             f"{jax_median / median:.2f}x"])
        print(common.format_table(["model", "batch", "engine", "ms (median)", "ms (min)",
                                   "images/s", "vs JAX"], speed_rows[-len(times):]),
              flush=True)
      start_rows.append([name, f"{_first_landmark_seconds(paths[('onnx', batches[0])]):.3f}",
                         f"{_first_landmark_seconds(paths[('tflite', batches[0])]):.3f}"])
    nme_rows = []
    if args.nme and os.path.exists(args.nme):
      nme_rows = _nme_rows(args.nme, directory)
      print(common.format_table(["model", "NME %", "change"], nme_rows), flush=True)
  load_after = os.getloadavg()[0]

  notes = (f"random weights; interleaved rounds: {args.rounds} (batch >= 8: "
           f"{args.large_rounds}); engine threads: "
           f"{args.threads or 'default'}; 1-min load average {load_before:.1f} before, "
           f"{load_after:.1f} after")
  if nme_rows:
    common.record(f"Export: NME on the embedded test split ({args.nme})",
                  ["model", "NME %", "change (points of %)"], nme_rows, write=args.record)
  if not names:
    return
  common.record("Export: latency and throughput per engine (256 px, CPU)",
                ["model", "batch", "engine", "ms / batch (median)", "ms / batch (min)",
                 "images/s", "speed vs JAX"], speed_rows, notes=notes, write=args.record)
  common.record("Export: file sizes and export times",
                ["model", "engine", "batch", "MiB", "export s"], size_rows, write=args.record)
  common.record("Export: runtime import to first landmark (fresh interpreter, one 640x480 "
                "image, given box)", ["model", "onnx s", "tflite s"], start_rows,
                write=args.record)
  targets = []
  for name in names:
    b1 = batches[0]
    jax_t, ort_t = summary[(name, b1, "jax")], summary[(name, b1, "onnx")]
    int8_t = summary[(name, b1, "onnx_int8")]
    int8dyn_t = summary[(name, b1, "onnx_int8dyn")]
    tflite_t = summary[(name, b1, "tflite")]
    targets.append([name, f"ORT f32 batch {b1}: {1000 * ort_t:.1f} ms vs JAX {1000 * jax_t:.1f} "
                    f"ms ({jax_t / ort_t:.2f}x)",
                    f"ORT int8 static {ort_t / int8_t:.2f}x f32, dynamic "
                    f"{ort_t / int8dyn_t:.2f}x f32",
                    f"TFLite int8 {tflite_t / summary[(name, b1, 'tflite_int8')]:.2f}x f32"])
  common.record("Export: targets", ["model", "ORT float32 vs JAX", "ORT int8 speed-up",
                                    "TFLite int8 speed-up"], targets, write=args.record)


if __name__ == "__main__":
  main()
