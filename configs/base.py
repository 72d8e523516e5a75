"""The official STAR recipe as a ConfigDict; dataset configs derive from it.

Every field a module reads is declared here, so a typo in `--config.x.y=...` fails loudly.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from star_jax.data.transforms import OFFICIAL_AUGMENT


def get_base_config(dataset: str = "wflw") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # A built-in scheme ('wflw', '300w', 'cofw') or the path of a scheme .json file (README,
  # "Train on your own data").
  c.dataset = dataset
  c.seed = 0                   # params init, data order and augmentation draws

  # ---- data ----
  c.data = ml_collections.ConfigDict()
  # 'tsv': the files below; 'embedded': the synthetic dataset shipped with star-jax;
  # 'tfds': the TFDS builder for `dataset` (see star_jax/data/tfds_builders.py).
  c.data.source = "tsv"
  c.data.image_dir = f"data/{dataset}/images"
  c.data.train_tsv = f"data/{dataset}/train.tsv"
  c.data.val_tsv = ""          # empty: carve `val_fraction` of the training set
  c.data.val_fraction = 0.05
  c.data.test_tsv = f"data/{dataset}/test.tsv"
  c.data.tfds_data_dir = ""    # source == 'tfds': TFDS data_dir ('' = $TFDS_DATA_DIR or TFDS's)
  c.data.embedded_dir = ""     # source == 'embedded': cache folder ('' = ~/.cache/star_jax)
  # Decode every training image once before training starts and report all unreadable ones
  # with their TSV lines (evaluation always does).
  c.data.check_images = False
  c.data.image_size = 256      # network input (square); heatmaps are image_size // 4
  c.data.aug_prob = 1.0        # official: augmentation gate passes for every sample
  c.data.augment = ml_collections.ConfigDict(OFFICIAL_AUGMENT)
  c.data.gaussian_sigma = 1.5  # point-map Gaussian at image_size resolution
  c.data.num_parallel_calls = -1  # <= 0: one call per CPU this process may use
  c.data.prefetch = 2

  # ---- model ----
  c.model = ml_collections.ConfigDict()
  c.model.name = "stacked_hourglass"  # star_jax.models registry (StackedHGNetV1 with AAM)
  # Architecture: None means "from config.init_from's checkpoint, else the official value"
  # (4 stacks, 4 levels, 256 channels, AAM heads); star_jax.training.finetune resolves them.
  c.model.num_stacks = placeholder(int)
  c.model.num_levels = placeholder(int)
  c.model.channels = placeholder(int)
  c.model.use_aam = placeholder(bool)
  c.model.dtype = "float32"    # compute dtype; 'bfloat16' for mixed precision (params stay f32)
  c.model.precision = ""       # '' backend default; 'highest' for exact float32 on GPUs

  # ---- loss: per stack i, 2^i / 2^(S-1) * sum(weight * term) ----
  c.loss = ml_collections.ConfigDict()
  # name -> weight (star_jax.core.losses registry); 0 switches a term off. The official
  # `--loss_func smoothl1` is `terms.star=0 terms.smoothl1=1`.
  c.loss.terms = ml_collections.ConfigDict(dict(
      star=1.0, pointmap=10.0, edgemap=10.0, smoothl1=0.0, l1=0.0, l2=0.0, wing=0.0))
  c.loss.star = ml_collections.ConfigDict(dict(w=1.0, dist="smoothl1", eps=1e-5, version="v2"))

  # ---- optimisation ----
  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  # The official config names 1e-5 but never passes it to Adam; off by default to match the run.
  c.optim.weight_decay = 0.0
  c.optim.milestones = (200, 350, 450)  # epochs (steps = epoch * steps_per_epoch)
  c.optim.gamma = 0.1

  c.batch_size = 128           # global, whatever the device count
  c.num_epochs = 500
  c.num_train_steps = -1       # > 0 overrides num_epochs
  c.ema = ml_collections.ConfigDict()
  c.ema.enabled = True
  c.ema.half_life_examples = 10000.0  # decay per step = 0.5 ** (batch_size / half_life)

  # ---- fine-tuning (README, "Train on your own data") ----
  c.init_from = ""             # wflw/300w/cofw (released), official .pkl, star-jax workdir or
                               # checkpoint; '' = from scratch
  # 'default' (EMA of star-jax runs, 'net' of an official .pkl, as eval.py), 'ema' or 'raw'.
  c.init_weights = "default"
  # Parameters kept fixed: '' none, 'stem', or 'stem,stack0,...' (stem and the first stacks).
  c.freeze = ""

  # ---- cadence, model selection, logging ----
  c.log_every_steps = 50
  c.eval_every_steps = -1      # -1: once per epoch
  c.checkpoint_every_steps = -1  # -1: once per epoch
  c.keep_checkpoints = 3
  c.eval_batch_size = 32
  c.nme_norm = "default"       # 'default', 'ocular', 'pupil' or 'diagonal'
  # Which weights the best model is chosen by: 'ema' (the validation NME of the EMA weights) or
  # 'better' (the better of raw and EMA at each evaluation, the official rule).
  c.best_weights = "ema"

  # ---- several processes (README, "Several processes") ----
  c.distributed = False        # call jax.distributed.initialize() at start
  c.coordinator_address = ""   # 'host:port' of process 0 ('' = $JAX_COORDINATOR_ADDRESS / SLURM)
  c.num_processes = -1         # -1: from the cluster environment
  c.process_id = -1            # -1: from the cluster environment
  return c


def get_config() -> ml_collections.ConfigDict:
  """The recipe with WFLW defaults; set `--config.dataset` (a scheme file) and the data paths
  to train on a dataset of your own."""
  return get_base_config("wflw")
