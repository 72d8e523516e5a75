"""`python eval.py`: the evaluation command's flags and main (star_jax.training.eval_lib).

`--config PATH[:ARG]` and its `--config.FIELD=VALUE` overrides come from
star_jax.commands.config_args (data overrides work as in training); `--checkpoint` names a
released model, a training workdir, a checkpoint directory or an official STAR `.pkl`. Writes
OUT/metrics.json, OUT/predictions.npz and OUT/ced.png and prints NME, FR and AUC per subset.
"""

from __future__ import annotations

import os
from typing import Sequence

from star_jax.commands import cli
from star_jax.commands import config_args


def _parser() -> cli.ArgumentParser:
  parser = cli.ArgumentParser(
      prog="eval.py", description="Evaluate a checkpoint: NME, FR and AUC per subset.",
      epilog=config_args.OVERRIDES_HELP)
  config_args.add_config_argument(parser)
  parser.add_argument(
      "--checkpoint", required=True,
      help="A released model (wflw, 300w, cofw), a training workdir, a checkpoint directory or "
           "an official STAR .pkl.")
  parser.add_argument(
      "--output_dir", required=True,
      help="Where metrics.json, predictions.npz and ced.png are written.")
  parser.add_argument("--split", default="test", choices=("test", "val"),
                      help="Which split to evaluate.")
  parser.add_argument(
      "--norm", default=None, choices=("default", "ocular", "pupil", "diagonal"),
      help="NME normalisation (overrides config.nme_norm): inter-ocular, inter-pupil or box "
           "diagonal.")
  parser.add_argument(
      "--weights", default="default", choices=("default", "ema", "raw"),
      help="'default': EMA weights of star-jax checkpoints, 'net' of an official .pkl; 'ema' / "
           "'raw' force one (for a .pkl: 'net_ema' / 'net').")
  parser.add_argument(
      "--batch_size", type=cli.int_at_least(1), default=None,
      help="Images per network call (default: config.eval_batch_size).")
  parser.add_argument(
      "--threshold", type=float, default=None,
      help="FR/AUC threshold in (0, 1] (default: the dataset's, 0.05 for 300W, else 0.1).")
  parser.add_argument(
      "--auc_even_rule", default="average", choices=("average", "cartwright"),
      help="Simpson rule for an even number of CED samples: 'average' reproduces the official "
           "numbers (SciPy < 1.11), 'cartwright' matches SciPy >= 1.11.")
  parser.add_argument(
      "--tta", default="none", choices=("none", "flip"),
      help="Test-time augmentation: 'flip' averages the prediction with that of the mirrored "
           "crop.")
  cli.add_switch(
      parser, "check_images", default=True,
      help="Decode every image first and report all unreadable ones by TSV line.")
  return parser


def _main(argv: Sequence[str] | None) -> int:
  from star_jax.commands import host
  host.show_absl_logs()
  args = config_args.parse_args(_parser(), argv)
  from star_jax.training import eval_lib
  eval_lib.check_output_dir(args.output_dir, eval_lib.inputs_of(args.config, args.checkpoint))
  host.configure_process(tensorflow=True)
  result = eval_lib.evaluate(args.config, args.checkpoint, args.output_dir,
                             split=args.split, norm=args.norm, weights=args.weights,
                             batch_size=args.batch_size, threshold=args.threshold,
                             even_rule=args.auc_even_rule, tta=args.tta,
                             check_images=args.check_images, verbose=False)
  print(eval_lib.format_table(result.metrics))
  if args.output_dir:
    print(f"wrote {os.path.join(args.output_dir, 'metrics.json')}, predictions.npz, ced.png")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(lambda: _main(argv))
