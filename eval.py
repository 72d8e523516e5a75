"""Evaluate a checkpoint:
`python eval.py --config configs/wflw.py --checkpoint PATH --output_dir OUT`.

PATH is a training workdir or checkpoint directory (EMA weights unless `--weights=raw`), or an
official STAR `.pkl` (its `"net"` weights; the architecture comes from the checkpoint). Data
overrides work as in training, e.g. `--config.data.test_tsv=/data/wflw/test.tsv
--config.data.image_dir=/data/wflw/images`. Writes OUT/metrics.json, OUT/predictions.npz and
OUT/ced.png and prints a table of NME, FR and AUC per subset.

The flags and the command are star_jax.commands.eval.
"""

from star_jax.commands import cli

cli.require_training_install("eval.py")

from star_jax.commands import eval as eval_command  # noqa: E402 (after the install check)

if __name__ == "__main__":
  raise SystemExit(eval_command.main())
