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


def progress_bar(total: int, initial: int, *, enabled: bool = True) -> tqdm.tqdm:
  """A tqdm bar over training steps with rate and ETA (off on processes other than 0)."""
  return tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                   disable=not enabled, file=sys.stderr, smoothing=0.1,
                   mininterval=1.0)
