"""Every shell command of the README runs as written.

The commands are the lines of README.md's ```bash blocks (continuation lines joined). They run,
in README order, with bash in a sandbox folder that holds tiny stand-ins for what they name:
the original WFLW / 300W / COFW files (made from the embedded synthetic faces), an official
`.pkl` (the 32-channel fixture under the released file names), a photo, a folder and a clip.
The only changes to the commands themselves:

- absolute dataset paths of the README (`/path/to/300W`, `/data/...`) point into the sandbox;
- `python` is a wrapper that adds small-network overrides to `train.py` and `eval.py` (fewer
  steps, a smaller network, 64-pixel crops), so each trains in seconds; the flags written in the
  README are all passed;
- commands that serve until stopped (`tensorboard`, `python -m star_jax.web`) are started,
  checked to print their address, and stopped.

Not run, with the reason: `make demo` and `make test` (the quick start: `make test` is what runs
this file; `make demo` trains for minutes, and its steps, train.py, eval.py, a generated clip
and the predictor on it, run here on tiny data through the README's own commands), `make web`
(run by `make test` before the suite), `--camera` (no camera here), registering a hand-downloaded
released file (the fixture is not the released architecture), and benchmark commands that
need an official STAR checkout or a GPU.
"""

from __future__ import annotations

from tests.limits import LAST_GUARD_S

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests import tiny_data

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_PKL = os.path.join(ROOT, "tests", "fixtures", "official_wflw_small", "checkpoint.pkl")
# Files of the repository the commands use by relative path.
LINKED = ("train.py", "eval.py", "configs", "benchmarks", "Makefile", "pyproject.toml", "web")
SKIPPED = {
    "make demo": "the quick start's first command (run on a fresh clone, not inside the suite)",
    "make test": "runs the quick tier of this suite",
    "make test-all": "runs this very test suite",
    "make web": "`make test` runs it before the suite when npm is present",
    "--camera": "no camera on this machine",
    "--official_repo": "needs a checkout of the official STAR code",
    "gpu.sh": "needs a GPU",
    "pip install": ("installs into an environment; tests/test_light_install.py and "
                    "benchmarks/light_install.py check the inference-only install"),
    "star_jax.released register": "needs the released file itself (the fixture standing in "
                                  "for it is not the released architecture)",
}
SERVERS = ("tensorboard ", "python -m star_jax.web")
# Overrides the `python` wrapper adds: a network and a schedule a CPU trains in seconds.
TINY_TRAINING = ["--config.data.image_size=64", "--config.batch_size=4",
                 "--config.eval_batch_size=4", "--config.num_train_steps=2",
                 "--config.log_every_steps=1", "--config.eval_every_steps=2",
                 "--config.checkpoint_every_steps=2"]
TINY_NETWORK = ["--config.model.num_stacks=1", "--config.model.num_levels=2",
                "--config.model.channels=8"]
TINY_EVAL = ["--config.data.image_size=64", "--config.eval_batch_size=4"]

_WRAPPER = """#!{python}
import os, sys
args = sys.argv[1:]
script = os.path.basename(args[0]) if args else ""
extra = []
if script == "train.py":
  extra = {training!r}
  if not any(a.startswith("--config.init_from") for a in args):
    extra += {network!r}
elif script == "eval.py":
  extra = {evaluation!r}
os.execv({python!r}, [{python!r}] + args + extra)
"""


def readme_commands(text: str) -> list[str]:
  """The shell commands of the ```bash blocks, continuation lines joined, comments dropped."""
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    joined = re.sub(r"\\\n\s*", " ", block)
    current = []
    for line in joined.splitlines():
      code = line.split("  #")[0].rstrip() if not line.lstrip().startswith("#") else ""
      if not code:
        continue
      # A `for ...; do` loop runs until its `done`.
      current.append(code)
      text_so_far = "\n".join(current)
      if re.search(r"\bdo\b", text_so_far) and not re.search(r"\bdone\b", text_so_far):
        continue
      commands.append(text_so_far)
      current = []
  return commands


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
  root = tmp_path_factory.mktemp("readme")
  for name in LINKED:
    if os.path.exists(os.path.join(ROOT, name)):
      os.symlink(os.path.join(ROOT, name), root / name)
  faces = tiny_data.wflw(str(root / "faces"), counts=(24, 8, 8))
  tiny_data.wflw_release(str(root), faces)
  tiny_data.w300_release(str(root), faces)
  tiny_data.cofw_release(str(root), faces)
  scheme = tiny_data.scheme29(str(root / "data" / "face29"), faces)
  assert os.path.basename(scheme) == "face29.json"
  for name in ("best_model.pkl", "WFLW_STARLoss_NME_4_02_FR_2_32_AUC_0_605.pkl"):
    shutil.copy(FIXTURE_PKL, root / name)
  # `--checkpoint wflw`: the cache as a first download leaves it (file and record), with the
  # fixture standing in for the released file (tests/test_released.py runs the download).
  released_dir = root / "cache" / "released"
  released_dir.mkdir(parents=True)
  shutil.copy(FIXTURE_PKL, released_dir / "WFLW_STARLoss_NME_4_02_FR_2_32_AUC_0_605.pkl")
  with open(FIXTURE_PKL, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  with open(released_dir / "WFLW_STARLoss_NME_4_02_FR_2_32_AUC_0_605.pkl.json", "w") as f:
    json.dump({"name": "wflw", "sha256": digest, "source": "tests/test_readme.py"}, f)
  import cv2
  from skimage import data as skdata
  cv2.imwrite(str(root / "photo.jpg"), skdata.astronaut()[..., ::-1])
  (root / "folder").mkdir()
  (root / "photos").mkdir()
  for k, image in enumerate(sorted(os.listdir(os.path.join(faces.image_dir, "test")))[:2]):
    shutil.copy(os.path.join(faces.image_dir, "test", image), root / "folder" / f"{k}.jpg")
    shutil.copy(os.path.join(faces.image_dir, "test", image), root / "photos" / f"{k}.jpg")
  from star_jax.commands import clips as clips_command
  clips_command.main(["--out", str(root / "clip.mp4"), "--frames", "12", "--faces", "1"])
  bin_dir = root / "bin"
  bin_dir.mkdir()
  wrapper = bin_dir / "python"
  wrapper.write_text(_WRAPPER.format(python=sys.executable, training=TINY_TRAINING,
                                     network=TINY_NETWORK, evaluation=TINY_EVAL))
  wrapper.chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.path.dirname(sys.executable)}:"
                              f"{os.environ.get('PATH', '')}",
             STAR_JAX_CACHE=str(root / "cache"), TFDS_DATA_DIR=str(root / "tfds"),
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("XLA_FLAGS", None)
  return root, env


def _two_processes_trained(root) -> None:
  """The background processes of the multi-process recipe: `wait` alone hides their status."""
  from star_jax.training import logging_utils
  records = logging_utils.read_metrics(str(root / "runs" / "two_processes"))
  assert any(r.get("step") == 2 and "train_loss" in r for r in records), records
  assert os.path.isdir(root / "runs" / "two_processes" / "checkpoints" / "2")


# Checks after commands whose exit status does not tell (substring of the command -> check).
AFTER = {"--config.distributed=True": _two_processes_trained}


def _prepare(command: str, root) -> str:
  command = command.replace("/path/to/300W", "300W").replace("/data/", f"{root}/data_abs/")
  return command


def _serve(command: str, root, env) -> None:
  """Starts a command that serves until stopped; it must print an http address, then stops."""
  proc = subprocess.Popen(["bash", "-c", command], cwd=root, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          start_new_session=True)
  seen, deadline = "", time.time() + 180
  try:
    while time.time() < deadline and proc.poll() is None:
      line = proc.stdout.readline()
      seen += line
      if "http://" in line:
        break
    assert "http://" in seen, f"{command!r} printed no address:\n{seen[-3000:]}"
  finally:
    # Only the address is checked; a server slow to stop (tensorboard's reload thread under
    # load) is killed.
    os.killpg(proc.pid, signal.SIGTERM)
    try:
      proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait(timeout=30)


def test_readme_lists_commands():
  commands = readme_commands(open(os.path.join(ROOT, "README.md")).read())
  assert any(c.startswith("python train.py") for c in commands)
  assert any("star_jax.export" in c for c in commands)


def test_every_readme_command_runs(sandbox):
  root, env = sandbox
  commands = readme_commands(open(os.path.join(ROOT, "README.md")).read())
  ran = []
  for command in commands:
    reason = next((why for key, why in SKIPPED.items() if key in command), None)
    if reason:
      print(f"not run ({reason}): {command}")
      continue
    command = _prepare(command, root)
    started = time.time()
    if command.startswith(SERVERS):
      _serve(command, root, env)
      ran.append(f"{command}  ({time.time() - started:.0f} s)")
      continue
    proc = subprocess.run(["bash", "-c", command], cwd=root, env=env, capture_output=True,
                          text=True, timeout=LAST_GUARD_S)
    assert proc.returncode == 0, (f"README command failed (rc {proc.returncode}): {command}\n"
                                  f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    for key, check in AFTER.items():
      if key in command:
        check(root)
    ran.append(f"{command}  ({time.time() - started:.0f} s)")
  assert len(ran) >= 15, ran
  print("ran:", *ran, sep="\n  ")
