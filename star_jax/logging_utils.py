"""Training logs: `<workdir>/metrics.jsonl`, TensorBoard event files, the console progress bar.

Only process 0 writes; other processes get a writer that does nothing, so the training loop
calls the same methods everywhere.
"""

from __future__ import annotations

import json
import logging as py_logging
import math
import os
import sys
from typing import Any, Mapping

from absl import logging
import numpy as np
import tqdm

METRICS_FILE = "metrics.jsonl"


# Libraries whose INFO records drown the console (orbax: several lines per checkpoint file;
# jax: the platforms it probes).
_CHATTY_PATHS = ("/orbax/", "/jax/_src/")


class _DropLibraryChatter(py_logging.Filter):
  """Drops INFO records logged from inside the libraries in _CHATTY_PATHS."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return (record.levelno >= py_logging.WARNING
            or not any(p in record.pathname for p in _CHATTY_PATHS))


def quiet_library_logs() -> None:
  """Keeps the console to our own progress: library INFO records are dropped (warnings stay)."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _DropLibraryChatter) for f in handler.filters):
    handler.addFilter(_DropLibraryChatter())


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


class MetricWriter:
  """Appends one JSON object per call to metrics.jsonl and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a", buffering=1)
    if tensorboard:
      try:
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2
        self._tf = tf
        # Scalar summaries in the TensorBoard "scalars" plugin format, written with TF core only
        # (tf.summary.scalar itself needs the tensorboard package).
        self._scalar_metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
        self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
      except Exception as e:  # pragma: no cover - TensorFlow missing or broken
        logging.warning("TensorBoard logging disabled: %s", e)

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step)}
    record.update({k: _plain(v) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for name, value in scalars.items():
        value = _plain(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
          with self._tb.as_default():
            self._tf.summary.write(name, self._tf.constant(float(value), self._tf.float32),
                                   step=int(step), metadata=self._scalar_metadata)

  def flush(self) -> None:
    if self._jsonl is not None:
      self._jsonl.flush()
      os.fsync(self._jsonl.fileno())
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self.flush()
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def progress_bar(total: int, initial: int, *, enabled: bool = True) -> tqdm.tqdm:
  """A tqdm bar over training steps with rate and ETA (off on processes other than 0)."""
  return tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                   disable=not enabled, file=sys.stderr, smoothing=0.1,
                   mininterval=1.0)
