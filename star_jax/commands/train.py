"""`python train.py`: the training command's flags and main (star_jax.training.train_lib).

`--config PATH[:ARG]` and its `--config.FIELD=VALUE` overrides come from
star_jax.commands.config_args, `--workdir` is where checkpoints, logs and the resolved config
go. SIGTERM or Ctrl-C saves a checkpoint at the current step and exits 143 / 130.
"""

from __future__ import annotations

from typing import Sequence

from star_jax.commands import cli
from star_jax.commands import config_args


def _parser() -> cli.ArgumentParser:
  parser = cli.ArgumentParser(
      prog="train.py",
      description="Train STAR. Running again with the same workdir resumes from its latest "
                  "checkpoint.",
      epilog=config_args.OVERRIDES_HELP)
  config_args.add_config_argument(parser)
  parser.add_argument("--workdir", required=True,
                      help="Directory for checkpoints, logs and the resolved config.")
  return parser


def _main(argv: Sequence[str] | None) -> int:
  from star_jax.commands import host
  host.show_absl_logs()
  args = config_args.parse_args(_parser(), argv)
  from star_jax.training import parallel
  from star_jax.training import train_lib
  host.configure_process(tensorflow=True)
  parallel.initialize_distributed(args.config)
  with cli.graceful_stop() as stop:
    train_lib.train_and_evaluate(args.config, args.workdir, should_stop=stop)
  return stop.exit_code


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(lambda: _main(argv))
