"""Train STAR: `python train.py --config configs/wflw.py --workdir runs/wflw`.

Any config field can be overridden on the command line, e.g. `--config.optim.lr=1e-4`,
`--config.num_train_steps=1000`, `--config.data.train_tsv=/data/wflw/train.tsv`. Running again
with the same workdir resumes from its latest checkpoint.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from star_jax import train_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, logs and the resolved config.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
