"""Training logs: `<workdir>/metrics.jsonl`, TensorBoard event files, the console progress bar.

Writers are CLU metric writers (`clu.metric_writers`): TensorBoard through CLU's SummaryWriter,
and a small JSONL writer of ours, so that runs can be read back (and compared in tests) without
TensorBoard. Only process 0 writes. `tensorboard --logdir <workdir>/tensorboard` shows the
curves.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Mapping

from clu import metric_writers
from clu.metric_writers import SummaryWriter
import numpy as np
import tqdm

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _plain(value: Any) -> Any:
  """A JSON-serialisable Python scalar for numpy / JAX scalars."""
  if isinstance(value, (np.generic, np.ndarray)):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return repr(value)  # 'nan' / 'inf': JSON has no literal for them.
  return value


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All records of `<workdir>/metrics.jsonl`, in order."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(workdir: str, last_step: int) -> None:
  """Drops records with `step > last_step`: a resumed run re-logs the steps it repeats."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut short by a kill
      if record.get("step", -1) <= last_step:
        kept.append(line if line.endswith("\n") else line + "\n")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)


class _TensorBoardWriter(SummaryWriter):
  """CLU's TensorBoard writer, given only the numeric scalars (not the JSONL's flags)."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    numeric = {k: float(v) for k, v in ((k, _plain(v)) for k, v in scalars.items())
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if numeric:
      super().write_scalars(step, numeric)


class JsonlWriter(metric_writers.MetricWriter):
  """CLU metric writer appending one JSON object per `write_scalars` call to metrics.jsonl.

  Only scalars are written (the other kinds are TensorBoard's business); non-finite values are
  stored as the strings 'nan' / 'inf' (JSON has no literal for them). Lines are flushed as
  written, and `flush` also syncs the file, so a killed run loses at most the current line.
  """

  def __init__(self, workdir: str):
    os.makedirs(workdir, exist_ok=True)
    self._file = open(os.path.join(workdir, METRICS_FILE), "a", buffering=1, encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    record = {"step": int(step)}
    record.update({k: _plain(v) for k, v in scalars.items()})
    self._file.write(json.dumps(record) + "\n")

  def write_summaries(self, step, values, metadata=None):
    del step, values, metadata

  def write_images(self, step, images):
    del step, images

  def write_videos(self, step, videos):
    del step, videos

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate

  def write_texts(self, step, texts):
    del step, texts

  def write_histograms(self, step, arrays, num_buckets=None):
    del step, arrays, num_buckets

  def write_pointcloud(self, step, point_clouds, *, point_colors=None, configs=None):
    del step, point_clouds, point_colors, configs

  def write_hparams(self, hparams):
    del hparams

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()
      os.fsync(self._file.fileno())

  def close(self) -> None:
    if self._file is not None:
      self.flush()
      self._file.close()
      self._file = None


def create_writer(workdir: str, *, enabled: bool = True) -> metric_writers.MetricWriter:
  """metrics.jsonl + TensorBoard event files under `<workdir>/tensorboard` (process 0 only;
  elsewhere a writer that does nothing, so the loop calls the same methods everywhere)."""
  if not enabled:
    return metric_writers.MultiWriter([])
  return metric_writers.MultiWriter([
      JsonlWriter(workdir), _TensorBoardWriter(os.path.join(workdir, TENSORBOARD_DIR))])


# The bar while the first steps compile: no rate or ETA, which would be those of compilation.
_COMPILING_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, compiling{postfix}]"


class TrainingBar(tqdm.tqdm):
  """A tqdm bar over training steps whose rate, ETA and elapsed time start once the first
  `warmup_steps` steps (XLA compiles the step on the first call, and the first read-back waits
  for it) are done; until then it says 'compiling'."""

  def __init__(self, *args, warmup_steps: int = 2, **kwargs):
    self._warmup_left = int(warmup_steps)
    if self._warmup_left > 0:
      kwargs["bar_format"] = _COMPILING_FORMAT
    super().__init__(*args, **kwargs)

  def update(self, n: float = 1):
    if self._warmup_left <= 0:
      return super().update(n)
    self._warmup_left -= n
    if self._warmup_left > 0:
      return super().update(n)
    done = self.n + n
    # Timing starts here: tqdm's own reset, with the count (and its origin) kept.
    self.reset()
    self.n = self.last_print_n = self.initial = done
    self.bar_format = None
    self.refresh()
    return True


def progress_bar(total: int, initial: int, *, enabled: bool = True,
                 warmup_steps: int = 2) -> TrainingBar:
  """A bar over training steps with rate and ETA, both leaving out the first `warmup_steps`
  steps' compilation (off on processes other than 0)."""
  return TrainingBar(total=total, initial=initial, unit="step", dynamic_ncols=True,
                     disable=not enabled, file=sys.stderr, smoothing=0.1, mininterval=1.0,
                     warmup_steps=warmup_steps)


def format_validation(step: int, result: Mapping[str, Any]) -> str:
  """The console line of one validation: NME in % as `eval.py` prints it."""
  return (f"step {step}: validation NME {100 * result['val_nme']:.3f} % (EMA weights), "
          f"{100 * result['val_nme_raw']:.3f} % (raw weights) on {result['val_images']} images")


def above_bars():
  """A context in which console lines are written on their own line, above any progress bar
  (the bars are cleared and redrawn after)."""
  return tqdm.tqdm.external_write_mode(file=sys.stderr)
