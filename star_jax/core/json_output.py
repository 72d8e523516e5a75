"""JSON files that star-jax writes for people and programs (predictions, metrics): always JSON.

Python's `json` writes a NaN or an infinity as a bare `NaN` / `Infinity`, which is not JSON and
which strict parsers (browsers, `jq`, most languages) refuse. Here every non-finite number
becomes `null`, and the writer is told where, so that it can report it in one warning line.
"""

from __future__ import annotations

import logging
import json
import math
from typing import Any, Callable

import numpy as np

_log = logging.getLogger(__name__)


def _stderr(message: str) -> None:
  _log.warning(message)


def finite(value: Any, path: str = "") -> tuple[Any, list[str]]:
  """`value` with every non-finite float (numpy too) replaced by None, and the JSON paths of the
  replaced ones (`faces[0].landmarks[3][1]`)."""
  found: list[str] = []

  def clean(v: Any, where: str) -> Any:
    if isinstance(v, np.ndarray):
      v = v.tolist()
    elif isinstance(v, np.generic):
      v = v.item()
    if isinstance(v, float):
      if math.isfinite(v):
        return v
      found.append(where or "(top level)")
      return None
    if isinstance(v, dict):
      return {k: clean(item, f"{where}.{k}" if where else str(k)) for k, item in v.items()}
    if isinstance(v, (list, tuple)):
      return [clean(item, f"{where}[{i}]") for i, item in enumerate(v)]
    return v

  return clean(value, path), found


def dumps(value: Any, *, where: str, warn: Callable[[str], None] | None = _stderr,
          **kwargs: Any) -> str:
  """`json.dumps(value, **kwargs)` with non-finite numbers as null; `warn` (default: stderr) gets
  one line naming `where` (the file) and the first replaced value, when there is any."""
  clean, found = finite(value)
  if found and warn is not None:
    warn(nonfinite_warning(where, found))
  return json.dumps(clean, allow_nan=False, **kwargs)


def nonfinite_warning(where: str, found: list[str]) -> str:
  more = f" (first: {found[0]})" if found else ""
  return (f"warning: {where}: {len(found)} non-finite value(s) (NaN or infinity) written as "
          f"null{more}")
