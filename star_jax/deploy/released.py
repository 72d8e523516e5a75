"""The released STAR models by name: `wflw`, `300w` and `cofw`, downloaded once, checked, cached.

The official STAR repository (github ZhenglinZhou/STAR) links one trained checkpoint per dataset
from its README, on Google Drive (with a Baidu mirror). `RELEASES` names them. The first time a
name is asked for (`ensure("wflw")`, or any checkpoint argument: `model_store.load_model`
resolves a bare name that is not an existing path here), the file is fetched with gdown (which
handles Drive's confirmation page for large files), with a progress bar, into

    $STAR_JAX_CACHE/released/<official file name>      (default ~/.cache/star_jax/released/)

written under a temporary name and renamed only once it passed the checks: it must be read by the
safe reader (`star_jax.foreign.official`, data only, nothing in it runs), hold the number of
landmarks of
its name (the official links have been crossed before: its history has a commit "Swap model
download links") and the released architecture (`StackedHGNetV1` of conf/alignment.py: 4 stacks,
4 levels, 256 channels, AAM heads with the dataset's edges). Its sha256 and where it came from go
to `<file>.json` beside it, and every later load checks the file against that record.

A download that cannot happen (no network, refused, a file that fails a check) is one
`CheckpointError` line naming the URL, the file to fetch by hand and the exact place to put it;
`python -m star_jax.released register NAME FILE` checks a file fetched by hand and puts it there.
`STAR_JAX_RELEASES_URL` replaces Google Drive with a plain mirror (`<url>/<file name>`), e.g. a
local copy for machines without internet. The official repository carries no licence file: the
first download says so.

The released HRNetV2-W18 face models of HRNet/HRNet-Facial-Landmark-Detection are named too
(`hrnet-wflw`, `hrnet-300w`, `hrnet-cofw`, `hrnet-aflw`; `HRNET_RELEASES`). Their README links
OneDrive share pages, which a script cannot download: asking for such a name before its file is
in the cache is one `CheckpointError` line naming the page, the file name, the place to put it
and the register command (a `STAR_JAX_RELEASES_URL` mirror is still fetched). Their checks: an
official HRNet face state dict (star_jax.models.hrnet) of the name's landmark count and width 18.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from typing import Any

from star_jax.errors import CheckpointError, UsageError

MIRROR_ENV = "STAR_JAX_RELEASES_URL"
CACHE_SUBDIR = "released"
OFFICIAL_REPOSITORY = "https://github.com/ZhenglinZhou/STAR"
LICENCE_NOTE = (f"note: the official STAR repository ({OFFICIAL_REPOSITORY}) publishes these "
                "weights without a licence file; check the terms with its authors before any use "
                "beyond research")
HRNET_LICENCE_NOTE = ("note: the HRNet face models come from "
                      "https://github.com/HRNet/HRNet-Facial-Landmark-Detection (MIT licence)")
RECORD_SUFFIX = ".json"
_HASH_CHUNK = 1 << 20
# Seconds to wait for a connection and between bytes. No retries: gdown announces each one on
# its own line, and a failure is one line that says what to do (running again resumes nothing
# but costs nothing either).
_TIMEOUT = (20, 120)


@dataclasses.dataclass(frozen=True)
class Release:
  """One released checkpoint of the official STAR repository."""

  name: str            # what a user types: `--checkpoint wflw`
  dataset: str         # the landmark scheme (star_jax.core.schemes.SPECS) it predicts
  num_points: int
  drive_id: str        # Google Drive file id of the official README's link
  baidu_url: str       # the official README's Baidu mirror (with its access code)
  file_name: str       # the file's name as published (and in the cache)
  # conf/alignment.py and lib/backbone/stackedHGNetV1.py of the official code.
  num_stacks: int = 4
  num_levels: int = 4
  channels: int = 256
  use_aam: bool = True
  # "star" (the hourglass above) or "hrnet" (HRNetV2 of the official HRNet face code).
  family: str = "star"
  page_url: str = ""   # hrnet: the OneDrive share page of the official README (manual only)
  width: int = 18      # hrnet: channels of the highest-resolution branch

  @property
  def drive_url(self) -> str:
    """The page a person opens in a browser to download the file by hand."""
    if self.family == "hrnet":
      return self.page_url
    return f"https://drive.google.com/file/d/{self.drive_id}/view"


# File names: WFLW's is the one the official demo.py loads; 300W's and COFW's are those the
# files are known under where they are used (the official README names no file).
RELEASES = {r.name: r for r in (
    Release("wflw", "wflw", 98, "1aOx0wYEZUfBndYy_8IYszLPG_D2fhxrT",
            "https://pan.baidu.com/s/10vvI-ovs3x9NrdmpnXK6sg?pwd=u0yu",
            "WFLW_STARLoss_NME_4_02_FR_2_32_AUC_0_605.pkl"),
    Release("300w", "300w", 68, "1NFcZ9jzql_jnn3ulaSzUlyhS05HWB9n_",
            "https://pan.baidu.com/s/1bjUhLq1zS1XSl1nX78fU7A?pwd=yb2s",
            "300W_STARLoss_NME_2_87.pkl"),
    Release("cofw", "cofw", 29, "1Fiu3hjjkQRdKsWE9IgyNPdiJSz9_MzA5",
            "https://pan.baidu.com/s/1XO6hDZ8siJLTgFcpyu1Tzw?pwd=m57n",
            "COFW_STARLoss_NME_4_62.pkl"),
)}


HRNET_REPOSITORY = "https://github.com/HRNet/HRNet-Facial-Landmark-Detection"
# The official README's model links (OneDrive) and file names; HRNetV2-W18, heatmaps at 1/4.
HRNET_RELEASES = {r.name: r for r in (
    Release("hrnet-wflw", "wflw", 98, "", "", "HR18-WFLW.pth", family="hrnet",
            page_url="https://1drv.ms/u/s!AiWjZ1LamlxzdTsr_9QZCwJsn5U"),
    Release("hrnet-300w", "300w", 68, "", "", "HR18-300W.pth", family="hrnet",
            page_url="https://1drv.ms/u/s!AiWjZ1LamlxzeYLmza1XU-4WhnQ"),
    Release("hrnet-cofw", "cofw", 29, "", "", "HR18-COFW.pth", family="hrnet",
            page_url="https://1drv.ms/u/s!AiWjZ1LamlxzdFIsEUQl8jgUaMk"),
    Release("hrnet-aflw", "aflw", 19, "", "", "HR18-AFLW.pth", family="hrnet",
            page_url="https://1drv.ms/u/s!AiWjZ1Lamlxzc7xumEw810iBLTc"),
)}
RELEASES.update(HRNET_RELEASES)


def names() -> list[str]:
  return list(RELEASES)


def lookup(name: str) -> Release | None:
  """The release a checkpoint argument names ('wflw', 'WFLW', ...), or None."""
  return RELEASES.get(str(name).strip().lower()) if isinstance(name, str) else None


def get(name: str) -> Release:
  release = lookup(name)
  if release is None:
    raise UsageError(f"{name!r} is not a released model; use one of {', '.join(RELEASES)}")
  return release


# ---------------------------------------------------------------------------------------------
# Where things are.

def cache_dir() -> str:
  from star_jax.data import embedded
  return os.path.join(embedded.cache_root(), CACHE_SUBDIR)


def cached_path(release: Release) -> str:
  return os.path.join(cache_dir(), release.file_name)


def record_path(path: str) -> str:
  return path + RECORD_SUFFIX


def download_url(release: Release) -> str:
  """What is fetched: Google Drive, or `$STAR_JAX_RELEASES_URL/<file name>` (a mirror)."""
  mirror = os.environ.get(MIRROR_ENV, "").strip()
  if mirror:
    return f"{mirror.rstrip('/')}/{release.file_name}"
  return f"https://drive.google.com/uc?id={release.drive_id}"


def _page_url(release: Release) -> str:
  """The URL to name to a person: the Drive page, or the mirror's file."""
  return download_url(release) if os.environ.get(MIRROR_ENV, "").strip() else release.drive_url


def manual_hint(release: Release) -> str:
  """How to install the file without this machine downloading it (for error messages)."""
  if release.family == "hrnet":
    return (f"download {release.file_name} by hand from {_page_url(release)} (the official "
            f"HRNet README's link) and put it at {cached_path(release)}, or run `python -m "
            f"star_jax.released register {release.name} FILE`")
  return (f"download {release.file_name} from {_page_url(release)} (or the Baidu mirror "
          f"{release.baidu_url}) and put it at {cached_path(release)}, or run `python -m "
          f"star_jax.released register {release.name} FILE`")


# ---------------------------------------------------------------------------------------------
# Checks.

def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(_HASH_CHUNK), b""):
      digest.update(block)
  return digest.hexdigest()


def check_file(release: Release, path: str) -> None:
  """CheckpointError unless `path` is an official checkpoint of `release`'s scheme and
  architecture (read as data; the weights are not converted here)."""
  from star_jax.foreign import official
  state = official.select_state_dict(official.read_torch_checkpoint(path), path=path)
  if release.family == "hrnet":
    _check_hrnet_state(release, state, path)
    return
  arch = official.infer_architecture(state, path)
  if arch.num_points != release.num_points:
    raise CheckpointError(
        f"{path}: holds a {arch.num_points}-point model, but {release.name!r} is the "
        f"{release.num_points}-point {release.name.upper()} model (the download links may be "
        "crossed)")
  found = {"stacks": arch.num_stacks, "levels": arch.num_levels, "channels": arch.channels,
           "AAM": arch.use_aam, "edges": arch.dataset}
  expected = {"stacks": release.num_stacks, "levels": release.num_levels,
              "channels": release.channels, "AAM": release.use_aam, "edges": release.dataset}
  wrong = [f"{key} {found[key]} (released: {expected[key]})" for key in expected
           if found[key] != expected[key]]
  if wrong:
    raise CheckpointError(f"{path}: not the released {release.name} architecture: "
                          f"{', '.join(wrong)}")


def _check_hrnet_state(release: Release, state: Any, path: str) -> None:
  """CheckpointError unless `state` is an official HRNetV2 face state dict of `release`'s
  landmark count and width (shapes only; the weights are converted when loaded)."""
  from star_jax.foreign import hrnet_layout
  if not hrnet_layout.is_official_state(state):
    markers = ", ".join(hrnet_layout.OFFICIAL_MARKER_KEYS)
    raise CheckpointError(f"{path}: not an official HRNet face-alignment state dict (no "
                          f"{markers}); {release.name!r} is the "
                          f"HRNetV2-W{release.width} {release.dataset.upper()} model")
  head = tuple(state["head.3.weight"].shape)
  width = tuple(state["transition1.0.0.weight"].shape)
  points = head[0] if head else None
  if points != release.num_points:
    raise CheckpointError(
        f"{path}: holds a {points}-point HRNet, but {release.name!r} is the "
        f"{release.num_points}-point {release.dataset.upper()} model (the download links may be "
        "crossed)")
  if not width or width[0] != release.width:
    raise CheckpointError(f"{path}: not the released {release.name} architecture: width "
                          f"{width[0] if width else None} (released: HRNetV2-W{release.width})")


def read_record(path: str) -> dict[str, Any] | None:
  """The download record beside a cached file, or None when there is none."""
  where = record_path(path)
  if not os.path.exists(where):
    return None
  try:
    with open(where, encoding="utf-8") as f:
      record = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{where}: cannot be read ({e}); delete it and {path} to download "
                          "again") from None
  if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
    raise CheckpointError(f"{where}: not a download record (no sha256); delete it and {path} "
                          "to download again")
  return record


def _write_record(path: str, record: dict[str, Any]) -> None:
  _atomic_write_text(record_path(path), json.dumps(record, indent=1, sort_keys=True) + "\n")


def _atomic_write_text(path: str, text: str) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    _remove(tmp)
    raise


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except FileNotFoundError:
    pass


def _install(release: Release, staged: str, sha256: str, source: str, label: str) -> str:
  """Checks `staged` (a file in the cache folder) and renames it into place with its record;
  a failed check names `label` (where the file came from) instead of the staging name."""
  final = cached_path(release)
  try:
    check_file(release, staged)
  except CheckpointError as e:
    reason = str(e).split(": ", 1)[-1] if str(e).startswith(staged) else str(e)
    raise CheckpointError(f"{label}: {reason}; {manual_hint(release)}") from None
  size = os.path.getsize(staged)
  # Killed at any point, the cache holds the old file and record, or a file without a record
  # (checked and recorded on its next use), or the new pair; never a record of another file.
  _remove(record_path(final))
  os.replace(staged, final)
  _write_record(final, {"name": release.name, "file": release.file_name, "sha256": sha256,
                        "source": source, "size": size,
                        "installed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
  return final


# ---------------------------------------------------------------------------------------------
# Download, registration, use.

def _download(release: Release) -> str:
  import gdown
  import requests
  url = download_url(release)
  folder = cache_dir()
  os.makedirs(folder, exist_ok=True)
  fd, staged = tempfile.mkstemp(dir=folder, prefix=f".{release.file_name}.", suffix=".download")
  os.close(fd)
  # Said by gdown once the file itself answers, just before its progress bar: a failure before
  # that is the error line alone.
  start = (f"downloading the released {release.name} model {release.file_name} into {folder}\n"
           f"{LICENCE_NOTE if release.family == 'star' else HRNET_LICENCE_NOTE}\n")
  digest = hashlib.sha256()
  try:
    try:
      gdown.download(url, staged, quiet=False, use_cookies=False, hasher=digest,
                     timeout=_TIMEOUT, log_messages={"start": start, "output": ""})
    except (requests.exceptions.RequestException, gdown.exceptions.DownloadError,
            OSError) as e:
      raise CheckpointError(f"cannot download {url} ({_reason(e)}); "
                            f"{manual_hint(release)}") from None
    return _install(release, staged, digest.hexdigest(), url, url)
  finally:
    _remove(staged)


def _reason(error: BaseException) -> str:
  """A short cause of a failed download (requests nests the useful part deep inside)."""
  import requests
  cause = error
  while cause is not None and not isinstance(cause, requests.exceptions.ConnectionError):
    cause = cause.__cause__ or cause.__context__
  if cause is not None:
    text = str(cause)
    for marker in ("Connection refused", "Name or service not known",
                   "Temporary failure in name resolution", "Network is unreachable",
                   "timed out"):
      if marker in text:
        return f"no connection: {marker.lower()}"
    return "no connection"
  if isinstance(error, requests.exceptions.HTTPError) and error.response is not None:
    return f"HTTP {error.response.status_code}"
  text = " ".join(str(error).split())
  return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


def register(name: str, file: str) -> str:
  """Checks a file downloaded by hand and copies it into the cache as `name`; returns its path.

  An existing cached file is replaced only by one that passed the checks.
  """
  release = get(name)
  file = os.path.abspath(os.path.expanduser(file))
  if not os.path.isfile(file):
    raise UsageError(f"{file}: no such file")
  folder = cache_dir()
  os.makedirs(folder, exist_ok=True)
  fd, staged = tempfile.mkstemp(dir=folder, prefix=f".{release.file_name}.", suffix=".register")
  os.close(fd)
  try:
    shutil.copyfile(file, staged)
    return _install(release, staged, sha256_of(staged), f"registered by hand from {file}", file)
  finally:
    _remove(staged)


def ensure(name: str) -> str:
  """The path of the released checkpoint `name`, downloaded and checked on first use.

  A cached file is checked against its record (sha256); a file put in place by hand without a
  record is checked (scheme, architecture) and recorded. Raises CheckpointError (one line) when
  the file cannot be had or fails a check.
  """
  release = get(name)
  path = cached_path(release)
  if not os.path.isfile(path):
    if release.family == "hrnet" and not os.environ.get(MIRROR_ENV, "").strip():
      raise CheckpointError(f"{release.name}: {release.file_name} is shared on OneDrive, which "
                            f"cannot be downloaded by a script; {manual_hint(release)}")
    return _download(release)
  record = read_record(path)
  if record is None:
    try:
      check_file(release, path)
    except CheckpointError as e:
      raise CheckpointError(f"{e}; {manual_hint(release)}") from None
    _write_record(path, {"name": release.name, "file": release.file_name,
                         "sha256": sha256_of(path), "source": "placed by hand",
                         "size": os.path.getsize(path),
                         "installed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return path
  actual = sha256_of(path)
  if actual != record["sha256"]:
    raise CheckpointError(
        f"{path}: sha256 {actual[:12]}... differs from {record['sha256'][:12]}... recorded in "
        f"{record_path(path)} when it came from {record.get('source', '?')}: the file changed; "
        f"delete both to download again, or {manual_hint(release)}")
  return path


def status(name: str) -> str:
  """One line: where the file of `name` is and where it came from, or that it is not there."""
  release = get(name)
  path = cached_path(release)
  if not os.path.isfile(path):
    url = (release.page_url if release.family == "hrnet"
           and not os.environ.get(MIRROR_ENV, "").strip() else download_url(release))
    return f"{release.name}: not downloaded ({url} -> {path})"
  record = read_record(path) or {}
  return (f"{release.name}: {path} (sha256 {record.get('sha256', 'not recorded')}, from "
          f"{record.get('source', 'unknown')})")
