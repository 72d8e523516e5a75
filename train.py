"""Train STAR: `python train.py --config configs/wflw.py --workdir runs/wflw`.

Any config field can be overridden on the command line, e.g. `--config.optim.lr=1e-4`,
`--config.num_train_steps=1000`, `--config.data.train_tsv=/data/wflw/train.tsv`. Running again
with the same workdir resumes from its latest checkpoint. SIGTERM or Ctrl-C saves a checkpoint
at the current step and exits (143 / 130); a second Ctrl-C exits at once.
"""

from star_jax.commands import cli

cli.require_training_install("train.py")

from absl import flags  # noqa: E402 (after the install check, which needs none of them)
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, logs and the resolved config.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from star_jax.commands import host
  from star_jax.training import parallel
  from star_jax.training import train_lib
  host.configure_process(tensorflow=True)
  parallel.initialize_distributed(_CONFIG.value)
  with cli.graceful_stop() as stop:
    train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value, should_stop=stop)
  return stop.exit_code


if __name__ == "__main__":
  cli.absl_run(main)
