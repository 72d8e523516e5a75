"""Evaluation of a checkpoint on a test (or validation) split: NME, FR, AUC, subsets, outputs.

The path mirrors the official evaluate.py: each image is cropped on its annotated box
(`scale`, `center`), the network predicts final-stack landmarks in [-1, 1], which are mapped back
to original-image pixels (`p = ((l + 1) * S - 1) / 2`, then the affine part of the inverse crop
matrix) and compared with the annotation there. Inference is batched and jitted.

Outputs in `output_dir`:
  metrics.json     overall and per-subset `nme`, `fr`, `auc` (fractions) and `count`
  predictions.npz  `landmarks` (M, N, 2) original pixels in TSV order, `image_paths` (M,),
                   `nme` (M,), `landmarks_gt` (M, N, 2), `index` (M,) TSV rows
  ced.png          cumulative error distribution, one line per subset
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from star_jax import host
from star_jax import logging_utils
from star_jax import metrics as metrics_lib
from star_jax import plots
from star_jax.data import transforms
from star_jax.datasets import DatasetSpec, get_spec

OFFICIAL_SUFFIXES = (".pkl", ".pth", ".pt")


# ------------------------------------------------------------------------------------------
# Checkpoints and inference
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LoadedModel:
  """A network ready for inference: module, variables, and the config it came with (if any)."""

  model: Any
  variables: Any
  config: Any = None          # ml_collections.ConfigDict for star-jax checkpoints, else None
  source: str = ""            # what was loaded, for reports
  weights: str = ""           # 'ema', 'raw' or the official state-dict key

  @property
  def image_size(self) -> int:
    if self.config is not None:
      try:
        return int(self.config.data.image_size)
      except (AttributeError, KeyError):
        pass
    return 256

  @property
  def num_points(self) -> int:
    return int(self.model.num_points)

  @property
  def landmark_fn(self) -> Callable[[Any, jnp.ndarray], jnp.ndarray]:
    """`make_landmark_fn(model)`; shared by equal models, so compilations are reused."""
    return make_landmark_fn(self.model)


def is_official_checkpoint(path: str) -> bool:
  return os.path.isfile(path) and path.lower().endswith(OFFICIAL_SUFFIXES)


def load_model(path: str, *, weights: str = "default") -> LoadedModel:
  """Loads a checkpoint for inference.

  Args:
    path: a training workdir, a star-jax checkpoint directory, or an official STAR `.pkl`
      (converted on the fly; the architecture comes from its state dict).
    weights: 'default' (EMA weights of star-jax checkpoints; the official `"net"` weights of a
      `.pkl`, as the official tester and evaluate.py use), 'ema' or 'raw' (for a `.pkl`: the
      `"net_ema"` or `"net"` state dict).
  """
  if weights not in ("default", "ema", "raw"):
    raise ValueError(f"weights must be 'default', 'ema' or 'raw', got {weights!r}")
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist")
  from star_jax import checkpointing
  official = is_official_checkpoint(path)
  ema = weights == "ema" if official else weights != "raw"
  model, variables, config = checkpointing.load_for_inference(path, ema=ema)
  label = ("net_ema" if ema else "net") if official else ("ema" if ema else "raw")
  return LoadedModel(model, variables, config, path, label)


@functools.lru_cache(maxsize=8)
def make_landmark_fn(model: Any) -> Callable[[Any, jnp.ndarray], jnp.ndarray]:
  """A jitted `(variables, images (B,S,S,3) RGB [-1,1]) -> (B, N, 2)` final-stack landmarks.

  Variables are an argument (not baked-in constants) so compilation stays cheap; the function is
  cached per (hashable, immutable) model definition, so equal models share compilations.
  """
  @jax.jit
  def landmarks(variables, images):
    out = model.apply(variables, images, train=False)
    return out.landmarks[-1].astype(jnp.float32)
  return landmarks


def normalize_crops(crops_rgb_u8: np.ndarray) -> np.ndarray:
  """uint8 crops -> float32 in [-1, 1] as the official evaluate.py scales them (`u/255*2-1`)."""
  return np.asarray(crops_rgb_u8, np.float32) / 255.0 * 2.0 - 1.0


# ------------------------------------------------------------------------------------------
# Metrics assembly and outputs
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class EvalResult:
  metrics: dict
  landmarks: np.ndarray        # (M, N, 2) predictions, original pixels, TSV order
  landmarks_gt: np.ndarray     # (M, N, 2)
  nme: np.ndarray              # (M,)
  image_paths: list[str]
  index: np.ndarray            # (M,) TSV rows


def compute_metrics(pred: np.ndarray, gt: np.ndarray, spec: DatasetSpec, *,
                    image_paths: list[str] | None = None, tags: np.ndarray | None = None,
                    image_dir: str | None = None, norm: str = "default",
                    threshold: float | None = None, even_rule: str = "average"
                    ) -> tuple[dict, np.ndarray, dict[str, np.ndarray]]:
  """(metrics dict, per-image NME, subset masks) for predictions against ground truth."""
  threshold = spec.failure_threshold if threshold is None else float(threshold)
  nmes = metrics_lib.nme(pred, gt, spec, norm)
  masks = metrics_lib.subset_masks(spec, image_paths, tags, image_dir=image_dir)
  left, right = spec.norm_indices(norm)
  overall = metrics_lib.summarize(nmes, threshold, even_rule=even_rule)
  result = {
      "dataset": spec.name,
      "norm": norm if norm != "default" else spec.default_norm,
      "norm_indices": [left if isinstance(left, int) else list(left),
                       right if isinstance(right, int) else list(right)],
      "failure_threshold": threshold,
      "auc_even_rule": even_rule,
      "num_images": int(nmes.size),
      **overall,
      "subsets": metrics_lib.subset_metrics(nmes, masks, threshold, even_rule=even_rule),
  }
  return result, nmes, masks


def format_table(metrics: dict) -> str:
  """A console table: one row per subset with NME (%), FR (%), AUC and the image count."""
  def pct(v):
    return "-" if v is None else f"{100 * v:.3f}"

  def num(v):
    return "-" if v is None else f"{v:.4f}"

  rows = [("subset", "images", "NME %", f"FR@{metrics['failure_threshold']:g} %", "AUC")]
  for name, m in metrics["subsets"].items():
    rows.append((name, str(m["count"]), pct(m["nme"]), pct(m["fr"]), num(m["auc"])))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                     enumerate(zip(row, widths))) for row in rows]
  lines.insert(1, "-" * len(lines[0]))
  head = (f"{metrics['dataset']} ({metrics.get('split', 'test')}), NME normalised by "
          f"{metrics['norm']} distance")
  return head + "\n" + "\n".join(lines)


def write_outputs(output_dir: str, result: EvalResult, masks: dict[str, np.ndarray]) -> dict:
  """Writes metrics.json, predictions.npz and ced.png; returns their paths."""
  os.makedirs(output_dir, exist_ok=True)
  paths = {name: os.path.join(output_dir, name)
           for name in ("metrics.json", "predictions.npz", "ced.png")}
  with open(paths["metrics.json"], "w") as f:
    json.dump(result.metrics, f, indent=2)
    f.write("\n")
  np.savez(paths["predictions.npz"], landmarks=result.landmarks.astype(np.float32),
           image_paths=np.array(result.image_paths, dtype=str), nme=result.nme,
           landmarks_gt=result.landmarks_gt.astype(np.float32), index=result.index)
  plots.plot_ced({name: result.nme[mask] for name, mask in masks.items()},
                 result.metrics["failure_threshold"], paths["ced.png"],
                 title=f"{result.metrics['dataset']} {result.metrics.get('split', '')} CED",
                 even_rule=result.metrics["auc_even_rule"])
  return paths


# ------------------------------------------------------------------------------------------
# The evaluation loop
# ------------------------------------------------------------------------------------------

def _progress(iterable: Iterable, total: int | None, enabled: bool, desc: str):
  if not enabled:
    return iterable
  from tqdm import tqdm
  return tqdm(iterable, total=total, desc=desc, unit="batch", file=sys.stderr)


def predict_split(config: Any, loaded: LoadedModel, *, split: str = "test",
                  batch_size: int | None = None, progress: bool = True
                  ) -> dict[str, Any]:
  """Runs the network over a split: predictions and ground truth in original pixels.

  Returns, in TSV order: `landmarks`, `landmarks_gt` (M, N, 2), `index` (M,), `tags` (M, 6),
  `image_paths` (list), `image_dir`. Batches come from the data pipeline's `eval_dataset` (the
  official evaluation crop, for TSV and TFDS sources alike).
  """
  from star_jax.data import pipeline  # pylint: disable=g-import-not-at-top (TensorFlow)
  batch_size = int(batch_size or config.eval_batch_size)
  landmark_fn = loaded.landmark_fn
  if int(config.data.image_size) != loaded.image_size:
    raise ValueError(f"config.data.image_size={config.data.image_size} but the checkpoint "
                     f"expects {loaded.image_size}: pass --config.data.image_size="
                     f"{loaded.image_size}")
  if config.data.source == "tfds":
    image_dir, path_of_row, total = None, None, None
  else:
    annotations, rows = pipeline.split_annotations(config, split)
    image_dir = pipeline.resolve_data(config).image_dir
    path_of_row = dict(zip(np.asarray(rows).tolist(), annotations.image_paths))
    total = -(-len(annotations.image_paths) // batch_size)
  batches = pipeline.eval_dataset(config, split, batch_size=batch_size)
  preds, gts, indices, tags = [], [], [], []
  for batch in _progress(batches, total, progress, f"eval {split}"):
    mask = np.asarray(batch["mask"], bool)
    images = np.asarray(batch["image"], np.float32)
    lm = np.asarray(landmark_fn(loaded.variables, images))
    pred_px = transforms.landmarks_to_original(lm, np.asarray(batch["matrix"]), images.shape[1])
    preds.append(pred_px[mask])
    gts.append(np.asarray(batch["landmarks_px"], np.float32)[mask])
    indices.append(np.asarray(batch["index"], np.int64)[mask])
    tags.append(np.asarray(batch["tags"], np.int32)[mask])
  if not preds:
    raise ValueError(f"the {split} split of {config.dataset} has no images")
  index = np.concatenate(indices)
  order = np.argsort(index, kind="stable")
  if path_of_row is not None:
    image_paths = [path_of_row[i] for i in index[order].tolist()]
  else:
    image_paths = _tfds_image_paths(config, split, index[order])
  return {"landmarks": np.concatenate(preds)[order], "landmarks_gt": np.concatenate(gts)[order],
          "index": index[order], "tags": np.concatenate(tags)[order],
          "image_paths": image_paths, "image_dir": image_dir}


def _tfds_image_paths(config: Any, split: str, index: np.ndarray) -> list[str]:
  """Original image paths of TFDS records (their `image_path` feature), by TSV row `index`.

  Falls back to `tfds:<dataset>/<split>/<row>` names when the records cannot be read.
  """
  try:
    import tensorflow_datasets as tfds
    from star_jax.data import tfds_builders
    data_dir = config.data.get("tfds_data_dir", "") or None
    found = {}
    for name in ("jpeg", "png"):
      builder = tfds_builders.builder_for(config.dataset, data_dir=data_dir, config=name)
      if os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
        ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
        for example in ds.map(lambda e: (e["index"], e["image_path"])).as_numpy_iterator():
          found[int(example[0])] = example[1].decode("utf-8")
        break
    return [found[i] for i in index.tolist()]
  except Exception:  # the paths only label outputs; metrics do not depend on them
    return [f"tfds:{config.dataset}/{split}/{i}" for i in index.tolist()]


def evaluate(config: Any, checkpoint: str | LoadedModel, output_dir: str | None = None, *,
             split: str = "test", norm: str | None = None, weights: str = "default",
             batch_size: int | None = None, threshold: float | None = None,
             even_rule: str = "average", progress: bool = True, verbose: bool = True
             ) -> EvalResult:
  """Evaluates `checkpoint` on `split` of the data `config` describes.

  Args:
    config: a star-jax config (configs/<dataset>.py with overrides); its data section says where
      the images and TSVs are; `config.nme_norm` is the normalisation unless `norm` is given.
    checkpoint: a path for `load_model`, or an already loaded model.
    output_dir: where metrics.json, predictions.npz and ced.png go (None: write nothing).
    split: 'test' or 'val'.
    threshold: FR/AUC threshold (default: the dataset's, 0.05 for 300W, else 0.1).
    even_rule: Simpson rule for even sample counts (see star_jax.metrics).
  """
  host.tune_process()
  logging_utils.quiet_library_logs()
  spec = get_spec(config.dataset)
  loaded = checkpoint if isinstance(checkpoint, LoadedModel) else load_model(checkpoint,
                                                                             weights=weights)
  if loaded.num_points != spec.num_points:
    raise ValueError(f"checkpoint {loaded.source!r} predicts {loaded.num_points} landmarks but "
                     f"config.dataset={config.dataset!r} has {spec.num_points}; pass the config "
                     "of the dataset the checkpoint was trained on")
  norm = norm or config.get("nme_norm", "default")
  out = predict_split(config, loaded, split=split, batch_size=batch_size, progress=progress)
  image_paths = out["image_paths"]
  metrics, nmes, masks = compute_metrics(
      out["landmarks"], out["landmarks_gt"], spec, image_paths=image_paths, tags=out["tags"],
      image_dir=out["image_dir"], norm=norm, threshold=threshold, even_rule=even_rule)
  metrics = {"split": split, "checkpoint": loaded.source, "weights": loaded.weights, **metrics}
  result = EvalResult(metrics, out["landmarks"], out["landmarks_gt"], nmes, image_paths,
                      out["index"])
  if output_dir:
    write_outputs(output_dir, result, masks)
  if verbose:
    print(format_table(metrics))
    if output_dir:
      print(f"wrote {os.path.join(output_dir, 'metrics.json')}, predictions.npz, ced.png")
  return result
