"""JAX vs ONNX Runtime tracking the same clip: how far apart the two tracks' landmarks are.

    python -m benchmarks.tracking_agreement [--checkpoint runs/demo] [--clip runs/demo/clip.mp4]
        [--reseed_shift 0.2 0.25] [--record]

The checkpoint is exported to ONNX and both predictors track every frame of the clip with the
same tracker settings (smoothing on, the defaults but `reseed_shift`, which is compared). Per
frame and face the largest landmark difference (px) between the two is taken; the table gives
its median, 90th percentile and maximum, the frame of the maximum, and how many face-frames
differ by more than 1 px. On identical crops the two engines differ by about 0.001 px
(tests/test_runtime.py); what the table shows beyond that comes from the tracking loop.
`make demo` makes the default checkpoint and clip.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

if __package__ in (None, ""):  # `python benchmarks/tracking_agreement.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common


def _track(predictor, frames, config):
  tracker = predictor.tracker(config)
  return [{f.id: f.landmarks for f in tracker.update(frame, t)} for t, frame in frames]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", default="runs/demo")
  parser.add_argument("--clip", default="runs/demo/clip.mp4")
  parser.add_argument("--reseed_shift", type=float, nargs="+", default=[0.2, 0.25])
  common.add_common_flags(parser)
  args = parser.parse_args(argv)
  settings = common.apply_process_settings(args.process_settings)

  import numpy as np
  from star_jax.deploy import tracking, video
  from star_jax.training.model_store import load_model
  from star_jax.deploy.export import exporter
  from star_jax.deploy.inference import Predictor
  from star_jax.deploy.runtime import RuntimePredictor

  with video.FrameReader(args.clip) as reader:
    frames = [(t, frame) for _, t, frame in reader]
  with tempfile.TemporaryDirectory() as tmp:
    path = exporter.export(load_model(args.checkpoint), "onnx", os.path.join(tmp, "m.onnx")).path
    engines = {"jax": Predictor(args.checkpoint), "onnx": RuntimePredictor(path)}
    rows = []
    for shift in args.reseed_shift:
      config = tracking.TrackerConfig(reseed_shift=shift)
      a, b = (_track(p, frames, config) for p in engines.values())
      gaps, where, unmatched = [], [], 0
      for index, (fa, fb) in enumerate(zip(a, b)):
        unmatched += len(set(fa) ^ set(fb))
        for face in set(fa) & set(fb):
          gaps.append(float(np.abs(fa[face] - fb[face]).max()))
          where.append(index)
      gaps_a = np.asarray(gaps)
      rows.append([shift, len(gaps), f"{np.median(gaps_a):.3f}", f"{np.percentile(gaps_a, 90):.3f}",
                   f"{gaps_a.max():.3f}", where[int(gaps_a.argmax())], int((gaps_a > 1).sum()),
                   unmatched])
  common.record(
      "Tracking: JAX vs ONNX Runtime on the same clip",
      ["reseed_shift", "face-frames", "median px", "p90 px", "max px", "frame of max",
       "> 1 px", "faces in one only"], rows,
      notes=f"{args.checkpoint} on {args.clip} ({len(frames)} frames); {settings}; "
            f"{common.load_average()}", write=args.record)
  return 0


if __name__ == "__main__":
  sys.exit(main())
