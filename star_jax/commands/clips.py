"""`python -m star_jax.clips --out clip.mp4`: writes a synthetic clip (star_jax.deploy.clips).
"""

from __future__ import annotations

import os

from star_jax.deploy import clips as clips_lib
from star_jax.deploy.clips import moving_face_clip


def main(argv: list[str] | None = None) -> int:
  """`python -m star_jax.clips --out clip.mp4`: writes a synthetic clip (for the demo)."""
  import argparse
  from star_jax.commands import cli
  from star_jax.deploy import video

  parser = cli.ArgumentParser(prog="python -m star_jax.clips", description=clips_lib.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="video file to write (.mp4, .avi)")
  parser.add_argument("--frames", type=int, default=90)
  parser.add_argument("--faces", type=int, choices=(1, 2), default=2)
  parser.add_argument("--noise", type=float, default=0.0, help="pixel noise sigma")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  def run() -> int:
    clip = moving_face_clip(max(1, args.frames), faces=args.faces, noise=args.noise,
                            seed=args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    video.write_clip(args.out, clip.frames, clip.fps, (clip.frames[0].shape[1],
                                                        clip.frames[0].shape[0]))
    print(f"wrote {args.out}: {len(clip.frames)} frames, {args.faces} face(s)")
    return 0

  return cli.run(run)
