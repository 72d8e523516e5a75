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
import logging as py_logging
import os
import sys
from typing import Any, Callable, Iterable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from star_jax.training import model_store
from star_jax.core import json_output
from star_jax.core import metrics as metrics_lib
from star_jax.core import outputs
from star_jax.training import plots
from star_jax.training.model_store import LoadedModel
from star_jax.data import transforms
from star_jax.core.schemes import DatasetSpec, get_spec
from star_jax.errors import DataError, UsageError

_log = py_logging.getLogger(__name__)

TTA_MODES = ("none", "flip")


# ------------------------------------------------------------------------------------------
# Checkpoints and inference
# ------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def make_landmark_fn(model: Any, tta: str = "none", flip_permutation: tuple[int, ...] = ()
                     ) -> Callable[[Any, jnp.ndarray], jnp.ndarray]:
  """A jitted `(variables, images (B,S,S,3) RGB [-1,1]) -> (B, N, 2)` final-stack landmarks.

  `tta='flip'`: test-time flip augmentation, the mean of the prediction and the un-flipped
  prediction of the mirrored crop (mirroring a crop maps normalised x to -x, and the points
  swap by `flip_permutation`, the scheme's flip pairs). Variables are an argument (not baked-in
  constants) so compilation stays cheap; the function is cached per (hashable, immutable) model
  definition, so equal models share compilations.
  """
  if tta not in TTA_MODES:
    raise UsageError(f"tta={tta!r}: use one of {', '.join(TTA_MODES)}")
  perm = np.asarray(flip_permutation, np.int32)

  def final(variables, images):
    return model.apply(variables, images, train=False).landmarks[-1].astype(jnp.float32)

  @jax.jit
  def landmarks(variables, images):
    out = final(variables, images)
    if tta == "none":
      return out
    mirrored = final(variables, images[:, :, ::-1])[:, perm]
    return 0.5 * (out + mirrored * jnp.asarray([-1.0, 1.0], jnp.float32))
  return landmarks


def landmark_fn_for(loaded: LoadedModel, tta: str = "none"):
  """`make_landmark_fn` for a loaded checkpoint (its scheme's flip pairs for `tta='flip'`)."""
  perm = tuple(int(i) for i in loaded.spec.flip_permutation()) if tta == "flip" else ()
  if tta == "flip" and not loaded.spec.flip_pairs:
    raise UsageError(f"--tta flip: scheme {loaded.spec.name!r} has no flip pairs")
  return make_landmark_fn(loaded.model, tta, perm)


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
  ends = spec.norm_indices(norm)
  overall = metrics_lib.summarize(nmes, threshold, even_rule=even_rule)
  result = {
      "dataset": spec.name,
      "norm": spec.resolve_norm(norm),
      "norm_indices": None if ends is None else [
          e if isinstance(e, int) else list(e) for e in ends],
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
  outputs.record_folder_outputs(output_dir, OUTPUT_NAMES)
  paths = {name: os.path.join(output_dir, name) for name in OUTPUT_NAMES}
  with open(paths["metrics.json"], "w") as f:
    f.write(json_output.dumps(result.metrics, where=paths["metrics.json"], indent=2) + "\n")
  np.savez(paths["predictions.npz"], landmarks=result.landmarks.astype(np.float32),
           image_paths=np.array(result.image_paths, dtype=str), nme=result.nme,
           landmarks_gt=result.landmarks_gt.astype(np.float32), index=result.index)
  metrics = result.metrics
  data = metrics.get("data") or f"{metrics['dataset']} {metrics.get('split', 'test')}"
  plots.plot_ced({name: result.nme[mask] for name, mask in masks.items()},
                 metrics["failure_threshold"], paths["ced.png"], title=f"CED on {data}",
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
                  batch_size: int | None = None, progress: bool = True, tta: str = "none",
                  source=None, landmark_fn=None, report_unreadable: bool = False,
                  log=None) -> dict[str, Any]:
  """Runs the network over a split: predictions and ground truth in original pixels.

  Returns, in TSV order: `landmarks`, `landmarks_gt` (M, N, 2), `index` (M,), `tags` (M, T),
  `image_paths` (as the TSV writes them) and `image_dir`. Batches come from the data
  pipeline's `eval_dataset` (the official evaluation crop, for every source alike).
  `landmark_fn(variables, images)` replaces the network (e.g. an exported model's runner).
  `report_unreadable`: the decode that feeds the network also checks every image; all the
  unreadable ones are passed to `log` (one `file:line: image: reason` line each) and the pass
  ends in a DataError naming the first (the network stops at the first, the check goes on).
  """
  from star_jax.data import pipeline
  from star_jax.data import sources
  source = source or sources.source_for(config)
  batch_size = int(batch_size or config.eval_batch_size)
  landmark_fn = landmark_fn or landmark_fn_for(loaded, tta)
  if int(config.data.image_size) != loaded.image_size:
    if loaded.config is not None:  # a star-jax run knows the size it was trained at
      raise UsageError(f"config.data.image_size={config.data.image_size} but the checkpoint "
                       f"was trained at {loaded.image_size}: pass --config.data.image_size="
                       f"{loaded.image_size}")
    logging.warning("evaluating %s at %d pixels; it was trained at %d", loaded.source,
                    int(config.data.image_size), loaded.image_size)
  total = -(-source.num_examples(split) // batch_size)
  batches = pipeline.eval_dataset(config, split, batch_size=batch_size, source=source,
                                  report_unreadable=report_unreadable)
  parts: dict[str, list] = {k: [] for k in ("landmarks", "landmarks_gt", "index", "tags", "path")}
  unreadable: list[str] = []
  for batch in _progress(batches, total, progress, f"eval {split}"):
    mask = np.asarray(batch["mask"], bool)
    for position, problem in zip(batch["position"][mask], batch["problem"][mask]):
      if problem:
        unreadable.append(f"{source.describe(split, int(position))}: {problem.decode('utf-8')}")
        if log is not None:
          log(unreadable[-1])
    if unreadable:
      continue  # the evaluation fails: only the check goes on
    images = np.asarray(batch["image"], np.float32)
    lm = np.asarray(landmark_fn(loaded.variables, images))
    pred_px = transforms.landmarks_to_original(lm, np.asarray(batch["matrix"]), images.shape[1])
    parts["landmarks"].append(pred_px[mask])
    parts["landmarks_gt"].append(np.asarray(batch["landmarks_px"], np.float32)[mask])
    parts["index"].append(np.asarray(batch["index"], np.int64)[mask])
    parts["tags"].append(np.asarray(batch["tags"], np.int32)[mask])
    parts["path"].append(np.asarray(batch["path"])[mask])
  if unreadable:
    more = f" (and {len(unreadable) - 1} more, listed above)" if len(unreadable) > 1 else ""
    raise DataError(f"{unreadable[0]}{more}")
  out = {k: np.concatenate(v) for k, v in parts.items()}
  order = np.argsort(out["index"], kind="stable")
  paths = [p.decode("utf-8") if isinstance(p, bytes) else str(p) for p in out["path"][order]]
  return {"landmarks": out["landmarks"][order], "landmarks_gt": out["landmarks_gt"][order],
          "index": out["index"][order], "tags": out["tags"][order], "image_paths": paths,
          "image_dir": source.image_dir()}


OUTPUT_NAMES = ("metrics.json", "predictions.npz", "ced.png")


def check_output_dir(output_dir: str | None, inputs: Sequence[str] = ()) -> None:
  """Fails before any work when `output_dir` cannot be written, or when an output would
  replace an input or a file star-jax did not write there (`star_jax.core.outputs`)."""
  if output_dir:
    outputs.check_folder_outputs("--output_dir", output_dir, OUTPUT_NAMES, inputs=inputs)


def inputs_of(config: Any, checkpoint: Any) -> list[str]:
  """The files an evaluation reads: the checkpoint and the TSVs."""
  data = config.get("data", {})
  names = [checkpoint if isinstance(checkpoint, str) else ""]
  return [p for p in names + [str(data.get(k, "") or "") for k in ("train_tsv", "val_tsv",
                                                                    "test_tsv")] if p]


def evaluate(config: Any, checkpoint: str | LoadedModel, output_dir: str | None = None, *,
             split: str = "test", norm: str | None = None, weights: str = "default",
             batch_size: int | None = None, threshold: float | None = None,
             even_rule: str = "average", progress: bool = True, verbose: bool = True,
             tta: str = "none", check_images: bool = False) -> EvalResult:
  """Evaluates `checkpoint` on `split` of the data `config` describes.

  Args:
    config: a star-jax config (configs/<dataset>.py with overrides); its data section says where
      the images and TSVs are; `config.nme_norm` is the normalisation unless `norm` is given.
    checkpoint: a path for `model_store.load_model`, or an already loaded model.
    output_dir: where metrics.json, predictions.npz and ced.png go (None: write nothing).
    split: 'test' or 'val'.
    threshold: FR/AUC threshold in (0, 1] (default: the dataset's, 0.05 for 300W, else 0.1).
    even_rule: Simpson rule for even sample counts (see star_jax.core.metrics).
    tta: 'none' or 'flip' (test-time flip augmentation, see `make_landmark_fn`).
    check_images: report every unreadable image (the decode that feeds the network checks
      each image; nothing is written when one fails).
  """
  from star_jax.data import sources
  check_output_dir(output_dir, inputs_of(config, checkpoint))
  if threshold is not None and not 0 < float(threshold) <= 1:
    raise UsageError(f"--threshold {threshold}: must be in (0, 1] (a fraction of the "
                     "normalising distance)")
  if split not in ("val", "test"):
    raise UsageError(f"--split {split!r}: use 'test' or 'val'")
  spec = get_spec(config.dataset)
  norm = norm or config.get("nme_norm", "default")
  spec.resolve_norm(norm)
  loaded = (checkpoint if isinstance(checkpoint, LoadedModel)
            else model_store.load_model(checkpoint, weights=weights))
  if loaded.num_points != spec.num_points:
    raise UsageError(f"checkpoint {loaded.source!r} predicts {loaded.num_points} landmarks but "
                     f"config.dataset={config.dataset!r} has {spec.num_points}; pass the config "
                     "of the dataset the checkpoint was trained on")
  source = sources.source_for(config)
  out = predict_split(config, loaded, split=split, batch_size=batch_size, progress=progress,
                      tta=tta, source=source, report_unreadable=check_images,
                      log=lambda line: _log.warning(f"unreadable: {line}"))
  image_paths = out["image_paths"]
  metrics, nmes, masks = compute_metrics(
      out["landmarks"], out["landmarks_gt"], spec, image_paths=image_paths, tags=out["tags"],
      image_dir=out["image_dir"], norm=norm, threshold=threshold, even_rule=even_rule)
  metrics = {"split": split, "data": source.label(split), "checkpoint": loaded.source,
             "weights": loaded.weights, "tta": tta, **metrics}
  result = EvalResult(metrics, out["landmarks"], out["landmarks_gt"], nmes, image_paths,
                      out["index"])
  if output_dir:
    write_outputs(output_dir, result, masks)
  if verbose:  # eval.py prints the same on stdout itself
    _log.info(format_table(metrics))
    if output_dir:
      _log.info(f"wrote {os.path.join(output_dir, 'metrics.json')}, predictions.npz, ced.png")
  return result
