"""Evaluate a checkpoint:
`python eval.py --config configs/wflw.py --checkpoint PATH --output_dir OUT`.

PATH is a training workdir or checkpoint directory (EMA weights unless `--weights=raw`), or an
official STAR `.pkl` (its `"net"` weights; the architecture comes from the checkpoint). Data
overrides work as in training, e.g. `--config.data.test_tsv=/data/wflw/test.tsv
--config.data.image_dir=/data/wflw/images`. Writes OUT/metrics.json, OUT/predictions.npz and
OUT/ced.png and prints a table of NME, FR and AUC per subset.
"""

import os

from star_jax.commands import cli

cli.require_training_install("eval.py")

from absl import flags  # noqa: E402 (after the install check, which needs none of them)
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py).", lock_config=True)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A released model (wflw, 300w, cofw), a training workdir, a checkpoint "
    "directory or an official STAR .pkl.")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Where metrics.json, predictions.npz and ced.png are written.")
_SPLIT = flags.DEFINE_enum("split", "test", ["test", "val"], "Which split to evaluate.")
_NORM = flags.DEFINE_enum(
    "norm", None, ["default", "ocular", "pupil", "diagonal"],
    "NME normalisation (overrides config.nme_norm): inter-ocular, inter-pupil or box diagonal.")
_WEIGHTS = flags.DEFINE_enum(
    "weights", "default", ["default", "ema", "raw"],
    "'default': EMA weights of star-jax checkpoints, 'net' of an official .pkl; 'ema' / 'raw' "
    "force one (for a .pkl: 'net_ema' / 'net').")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Images per network call (default: config.eval_batch_size).",
    lower_bound=1)
_THRESHOLD = flags.DEFINE_float(
    "threshold", None, "FR/AUC threshold in (0, 1] (default: the dataset's, 0.05 for 300W, "
    "else 0.1).")
_EVEN_RULE = flags.DEFINE_enum(
    "auc_even_rule", "average", ["average", "cartwright"],
    "Simpson rule for an even number of CED samples: 'average' reproduces the official numbers "
    "(SciPy < 1.11), 'cartwright' matches SciPy >= 1.11.")
_TTA = flags.DEFINE_enum(
    "tta", "none", ["none", "flip"],
    "Test-time augmentation: 'flip' averages the prediction with that of the mirrored crop.")
_CHECK_IMAGES = flags.DEFINE_boolean(
    "check_images", True, "Decode every image first and report all unreadable ones by TSV line.")
flags.mark_flags_as_required(["config", "checkpoint", "output_dir"])


def main(argv):
  del argv
  from star_jax.training import eval_lib
  from star_jax.commands import host
  eval_lib.check_output_dir(_OUTPUT_DIR.value, eval_lib.inputs_of(_CONFIG.value, _CHECKPOINT.value))
  host.configure_process(tensorflow=True)
  result = eval_lib.evaluate(_CONFIG.value, _CHECKPOINT.value, _OUTPUT_DIR.value,
                             split=_SPLIT.value, norm=_NORM.value, weights=_WEIGHTS.value,
                             batch_size=_BATCH_SIZE.value, threshold=_THRESHOLD.value,
                             even_rule=_EVEN_RULE.value, tta=_TTA.value,
                             check_images=_CHECK_IMAGES.value, verbose=False)
  print(eval_lib.format_table(result.metrics))
  if _OUTPUT_DIR.value:
    print(f"wrote {os.path.join(_OUTPUT_DIR.value, 'metrics.json')}, predictions.npz, ced.png")
  return 0


if __name__ == "__main__":
  cli.absl_run(main)
