"""Annotation files at scale: a 10^6-row WFLW TSV, from the file to the first training step.

The TSV is generated from the rows of the official fixture (tests/fixtures/official_wflw_data):
its three real photos, copied under a few names each, referenced over and over, with each row's
landmarks shifted by a fraction of a pixel so that no two rows are the same text (about 1.65 KB
a row, 1.65 GB at 10^6 rows). Each measurement runs in a fresh child process:
- `parse`: `read_tsv` with its defaults (every image checked): seconds, peak resident memory
  (VmHWM) above the process's memory before the call, and that growth over the bytes of the
  parsed arrays (landmarks, five points, scale, centre, tags, line numbers);
- `train`: `train_lib.train_and_evaluate` on that TSV with a tiny model (1 stack, 1 level, 8
  channels, 64 px, batch 4), validation carved from the training rows as by default: seconds
  from the call to the end of the first training step, and peak memory of the process.

Run: `python -m benchmarks.large_tsv [--rows 1000000] [--record]`.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # `python benchmarks/large_tsv.py`: import as `python -m` does
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import json
import shutil
import subprocess
import tempfile
import time

from benchmarks import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "official_wflw_data")
COPIES_PER_IMAGE = 4


def make_tsv(folder: str, rows: int) -> str:
  """Writes folder/train.tsv (`rows` rows) and folder/images/; returns the TSV path."""
  import numpy as np
  with open(os.path.join(FIXTURE, "test.tsv")) as f:
    lines = [line.rstrip("\n").split("\t") for line in f if line.strip()]
  header, templates = lines[0], lines[1:]
  os.makedirs(os.path.join(folder, "images"), exist_ok=True)
  names = []
  for row in templates:
    stem, ext = os.path.splitext(os.path.basename(row[0]))
    for k in range(COPIES_PER_IMAGE):
      name = f"images/{stem}_{k}{ext}"
      shutil.copy(os.path.join(FIXTURE, row[0]), os.path.join(folder, name))
      names.append(name)
  landmarks = [np.array(row[2].split(","), np.float64) for row in templates]
  rng = np.random.default_rng(0)
  path = os.path.join(folder, "train.tsv")
  with open(path, "w") as f:
    f.write("\t".join(header) + "\n")
    for start in range(0, rows, 1000):
      block = []
      for i in range(start, min(rows, start + 1000)):
        t = i % len(templates)
        row = templates[t]
        moved = landmarks[t] + rng.uniform(-0.4, 0.4)
        block.append("\t".join([names[t * COPIES_PER_IMAGE + i % COPIES_PER_IMAGE], row[1],
                                ",".join(f"{v:.3f}" for v in moved), *row[3:]]))
      f.write("\n".join(block) + "\n")
  return path


def _memory_kb(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  return 0


def _child_parse(tsv: str) -> dict:
  from star_jax.data.annotations import read_tsv
  from star_jax.core.schemes import get_spec
  spec = get_spec("wflw")
  before = _memory_kb("VmRSS")
  start = time.perf_counter()
  ann = read_tsv(tsv, spec)
  seconds = time.perf_counter() - start
  arrays = sum(a.nbytes for a in (ann.landmarks, ann.five_points, ann.scale, ann.center,
                                  ann.tags, ann.line_numbers))
  return {"rows": len(ann), "seconds": seconds, "array_mb": arrays / 2 ** 20,
          "growth_mb": (_memory_kb("VmHWM") - before) / 1024,
          "peak_mb": _memory_kb("VmHWM") / 1024}


def _child_train(tsv: str, workdir: str) -> dict:
  from star_jax.commands import host
  host.configure_process(tensorflow=True)
  from configs import base
  from star_jax.training import train_lib
  config = base.get_base_config("wflw")
  config.data.train_tsv = tsv
  config.data.test_tsv = tsv
  config.data.image_dir = os.path.dirname(tsv)
  config.data.image_size = 64
  config.model.num_stacks, config.model.num_levels, config.model.channels = 1, 1, 8
  config.batch_size = 4
  config.eval_batch_size = 4
  config.num_train_steps = 10
  config.eval_every_steps = 1000
  config.log_every_steps = 1
  start = time.perf_counter()
  first_step: list[float] = []

  def stop_after_first_step() -> bool:
    first_step.append(time.perf_counter() - start)
    return True

  train_lib.train_and_evaluate(config, workdir, should_stop=stop_after_first_step)
  return {"seconds": first_step[0], "peak_mb": _memory_kb("VmHWM") / 1024}


def _run_child(args: list[str]) -> dict:
  proc = subprocess.run([sys.executable, "-m", "benchmarks.large_tsv", "--child", *args],
                        cwd=ROOT, capture_output=True, text=True, check=False,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2"))
  if proc.returncode != 0:
    raise SystemExit(f"child {args[0]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the generated TSV")
  parser.add_argument("--folder", default=None,
                      help="where to write the TSV and images (default: a temporary folder)")
  parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
  common.add_common_flags(parser, settings=False)
  args = parser.parse_args(argv)
  if args.child:
    kind, *rest = args.child
    result = _child_parse(*rest) if kind == "parse" else _child_train(*rest)
    print(json.dumps(result))
    return
  folder = args.folder or tempfile.mkdtemp(prefix="large_tsv_")
  try:
    start = time.perf_counter()
    tsv = make_tsv(folder, args.rows)
    made = time.perf_counter() - start
    size_mb = os.path.getsize(tsv) / 2 ** 20
    print(f"wrote {tsv}: {args.rows} rows, {size_mb:.0f} MiB in {made:.0f} s", flush=True)
    parse = _run_child(["parse", tsv])
    print(f"parse: {parse}", flush=True)
    train = _run_child(["train", tsv, os.path.join(folder, "workdir")])
    print(f"train: {train}", flush=True)
  finally:
    if args.folder is None:
      shutil.rmtree(folder, ignore_errors=True)
  rows = [["parse (read_tsv, images checked)", f"{parse['seconds']:.1f}",
           f"{parse['peak_mb']:.0f}", f"{parse['growth_mb']:.0f}", f"{parse['array_mb']:.0f}",
           f"{parse['growth_mb'] / parse['array_mb']:.2f}"],
          ["first training step (tiny model)", f"{train['seconds']:.1f}",
           f"{train['peak_mb']:.0f}", "-", f"{parse['array_mb']:.0f}", "-"]]
  common.record(
      f"Large annotation file: {args.rows:,} rows, {size_mb:.0f} MiB TSV", [
          "stage", "seconds", "peak RSS MiB", "RSS growth MiB", "parsed arrays MiB",
          "growth / arrays"], rows,
      notes=(f"{len(os.listdir(FIXTURE + '/images')) * COPIES_PER_IMAGE} image files (the "
             "fixture's 3 photos, copied) referenced over and over; each stage in a fresh "
             f"process; {common.load_average()}"),
      write=args.record)


if __name__ == "__main__":
  main()
