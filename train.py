"""Train STAR: `python train.py --config configs/wflw.py --workdir runs/wflw`.

Any config field can be overridden on the command line, e.g. `--config.optim.lr=1e-4`,
`--config.num_train_steps=1000`, `--config.data.train_tsv=/data/wflw/train.tsv`. Running again
with the same workdir resumes from its latest checkpoint. SIGTERM or Ctrl-C saves a checkpoint
at the current step and exits (143 / 130); a second Ctrl-C exits at once.

The flags and the command are star_jax.commands.train.
"""

from star_jax.commands import cli

cli.require_training_install("train.py")

from star_jax.commands import train  # noqa: E402 (after the install check)

if __name__ == "__main__":
  raise SystemExit(train.main())
