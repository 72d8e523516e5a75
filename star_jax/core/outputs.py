"""What a command may write: an output never replaces what a user owns.

Every command that writes files (`predict --out`, `eval.py --output_dir`, `convert --out`,
`export --out`) checks all its outputs here before any work:

- an output that is one of the command's inputs (the same file, or a folder holding it) is
  refused;
- an existing file or folder that star-jax did not write is refused (an empty folder is fine);
- what star-jax wrote there before may be written again, so reruns work.

"Written by star-jax" is recorded, never guessed from a name:
- a folder of outputs (predict, eval) holds a manifest, `.star_jax_outputs.json`, listing the
  names written there; each name is added before its file is written, so a run killed while
  writing leaves nothing the next run refuses;
- an export is star-jax's when its sidecar `OUT.json` names it (`star_jax.deploy.runtime.contract`);
- a converted checkpoint folder is star-jax's when its model record says it was converted.

A refusal is a `UsageError` (exit 2): one line naming the flag and both paths.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterable, Sequence

from star_jax.errors import UsageError

MANIFEST = ".star_jax_outputs.json"
_MANIFEST_KIND = "star-jax outputs"


def _real(path: str) -> str:
  return os.path.realpath(os.path.abspath(path))


def _overlaps(target: str, source: str) -> bool:
  """Whether writing `target` (a file, or a folder replaced as a whole) touches `source`."""
  if not os.path.lexists(source):
    return False
  real_target, real_source = _real(target), _real(source)
  if real_target == real_source or real_source.startswith(real_target.rstrip(os.sep) + os.sep):
    return True
  try:
    return os.path.samefile(target, source)   # a hard link of the input
  except OSError:
    return False


def _is_empty_folder(path: str) -> bool:
  return os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)


def check_outputs(flag: str, targets: Iterable[str], *, inputs: Sequence[str] = (),
                  is_own: Callable[[str], bool], shown: str | None = None) -> None:
  """UsageError unless every path of `targets` may be (over)written.

  `is_own(path)` says whether an existing `path` was written by star-jax; `shown` is the flag's
  value in messages (default: the target itself).
  """
  inputs = [os.fspath(p) for p in inputs if p]
  for target in targets:
    where = f"{flag} {shown if shown is not None else target}"
    for source in inputs:
      if _overlaps(target, source):
        raise UsageError(f"{where}: writing {target} would overwrite the input {source}; "
                         "choose another output")
    if os.path.lexists(target) and not _is_empty_folder(target) and not is_own(target):
      raise UsageError(f"{where}: {target} exists and was not written by star-jax; move it or "
                       "choose another output")


def check_folder(flag: str, folder: str) -> None:
  """UsageError unless `folder` is a folder or can be made one: not a file, and it (or its
  nearest existing parent) is writable."""
  if os.path.exists(folder) and not os.path.isdir(folder):
    raise UsageError(f"{flag} {folder}: exists and is not a directory")
  existing = os.path.abspath(folder)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.access(existing, os.W_OK | os.X_OK):
    raise UsageError(f"{flag} {folder}: {existing} is not writable")


def written_here(folder: str) -> set[str]:
  """The names star-jax's manifest in `folder` lists (empty without one). A manifest that is
  not star-jax's is a UsageError: it may be a user's file of that name."""
  path = os.path.join(folder, MANIFEST)
  if not os.path.lexists(path):
    return set()
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
  except (OSError, ValueError):
    record = None
  if (not isinstance(record, dict) or record.get("kind") != _MANIFEST_KIND
      or not isinstance(record.get("files"), list)):
    raise UsageError(f"{path}: not a star-jax output manifest; move it or choose another "
                     "output folder")
  return {str(name) for name in record["files"]}


def check_folder_outputs(flag: str, folder: str, names: Iterable[str], *,
                         inputs: Sequence[str] = ()) -> None:
  """The checks for files `names` written into `folder`: `check_folder`, then
  `check_outputs` with the folder's manifest as the record of what star-jax wrote."""
  check_folder(flag, folder)
  own = written_here(folder) if os.path.isdir(folder) else set()
  check_outputs(flag, (os.path.join(folder, name) for name in names), inputs=inputs,
                is_own=lambda path: os.path.basename(path) in own and os.path.isfile(path),
                shown=folder)


def record_folder_outputs(folder: str, names: Iterable[str]) -> None:
  """Adds `names` to `folder`'s manifest (creating both); call before writing the files."""
  os.makedirs(folder, exist_ok=True)
  files = written_here(folder) | {os.path.basename(n) for n in names}
  path = os.path.join(folder, MANIFEST)
  temporary = f"{path}.{os.getpid()}.tmp"
  with open(temporary, "w", encoding="utf-8") as f:
    json.dump({"kind": _MANIFEST_KIND, "files": sorted(files)}, f, indent=0)
    f.write("\n")
  os.replace(temporary, path)
