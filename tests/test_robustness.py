"""Hostile files, bad input, interrupts and a shared workdir: one line, the right exit code.

The cases of the reliability review, and where each is tested:

| case                                                     | test                           |
|----------------------------------------------------------|--------------------------------|
| 1 model.json naming code (`os.system`)                   | here (CLI), test_checkpointing |
| 2 .pkl tensor headers (strides, offsets, sizes)          | test_official_fuzz             |
| 3 resume with another model rewrites config.json, aborts | test_train (M)                 |
| 4 truncated / empty / non-image file named in a TSV      | here (eval.py), test_pipeline  |
| 5 two train.py runs on one workdir                       | test_train (L)                 |
| 6 SIGTERM / SIGINT during training                       | test_train (E), here (signals) |
| 7 header-less TSV whose first row has a bad number       | here                           |
| 8 orbax fallback noise on an unreadable checkpoint       | here                           |
| 9 eval.py checks --output_dir only after evaluating      | here                           |
| 10 predictor flags, colliding output names               | test_predict                   |
| 11 absurd values: scale/centre 1e30, landmarks far       | here                           |
|    outside, tags not 0/1, --threshold -1, a binary TSV   |                                |
"""

from __future__ import annotations

from tests.limits import LAST_GUARD_S

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from star_jax.data.annotations import AnnotationError, read_tsv
from star_jax.core.schemes import get_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "official_wflw_data")
CHECKPOINT = os.path.join(ROOT, "tests", "fixtures", "official_wflw_small", "checkpoint.pkl")
WFLW = get_spec("wflw")


def _env(**extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("STAR_JAX_DEBUG", None)
  env.update(extra)
  return env


def _run(args, timeout=LAST_GUARD_S, **env):
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, env=_env(**env), check=False)


def _one_line_error(proc, code, *fragments):
  """The contract: exit `code`, `error: ...` as the only line of stderr that is ours, no
  traceback."""
  assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, proc.stderr[-3000:]
  for fragment in fragments:
    assert fragment in errors[0], errors[0]
  return errors[0]


def _fixture_rows():
  rows = open(os.path.join(FIXTURE, "test_noheader.tsv")).read().splitlines()
  return [r.split("\t") for r in rows]


def _write_tsv(path, rows):
  path.write_text("\n".join("\t".join(r) for r in rows) + "\n")
  return str(path)


def _copy_images(tmp_path):
  for name in os.listdir(os.path.join(FIXTURE, "images")):
    shutil.copy(os.path.join(FIXTURE, "images", name), tmp_path / name)
  return [[os.path.basename(r[0])] + r[1:] for r in _fixture_rows()]


# --------------------------------------------------------------------------------------------
# 1: a checkpoint directory naming code.

@pytest.mark.slow
def test_checkpoint_naming_code_is_refused_by_predict_and_eval(tmp_path):
  import json
  from star_jax.training import model_store
  loaded = model_store.load_model(CHECKPOINT)
  ckpt = model_store.save_for_inference(str(tmp_path / "ckpt"), loaded.model, loaded.variables,
                                          spec=loaded.spec, image_size=256)
  record_file = next(p for p in (tmp_path / "ckpt" / "model").iterdir() if p.is_file())
  record = json.loads(record_file.read_text())
  marker = tmp_path / "pwned"
  record["model"] = {"class": "os.system", "fields": {"command": f"touch {marker}"}}
  record_file.write_text(json.dumps(record))
  image = os.path.join(FIXTURE, "images", os.listdir(os.path.join(FIXTURE, "images"))[0])
  proc = _run(["-m", "star_jax.predict", "--checkpoint", ckpt, image, "--out",
               str(tmp_path / "out")])
  _one_line_error(proc, 1, "os.system", "not a star-jax model")
  proc = _run(["eval.py", "--config", "configs/wflw.py", "--checkpoint", ckpt, "--output_dir",
               str(tmp_path / "eval"), f"--config.data.test_tsv={FIXTURE}/test.tsv",
               f"--config.data.image_dir={FIXTURE}"])
  _one_line_error(proc, 1, "not a star-jax model")
  assert not marker.exists()


# --------------------------------------------------------------------------------------------
# 4, 9, 11: eval.py on bad data and bad flags.

@pytest.mark.slow
def test_eval_names_an_unreadable_image_by_tsv_line_before_evaluating(tmp_path):
  rows = _copy_images(tmp_path)
  bad = tmp_path / rows[2][0]
  bad.write_bytes(bad.read_bytes()[:500])          # truncated JPEG
  (tmp_path / rows[1][0]).write_bytes(b"")         # empty file
  tsv = _write_tsv(tmp_path / "test.tsv", rows)
  proc = _run(["eval.py", "--config", "configs/wflw.py", "--checkpoint", CHECKPOINT,
               "--output_dir", str(tmp_path / "out"), f"--config.data.test_tsv={tsv}",
               f"--config.data.image_dir={tmp_path}"])
  line = _one_line_error(proc, 1, f"{tsv}:2: ", "empty file", "and 1 more")
  assert f"{tsv}:3: " in proc.stderr and line
  assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("flag, fragment", [
    ("--threshold=-1", "--threshold -1.0: must be in (0, 1]"),
    ("--batch_size=0", "--batch_size: must be at least 1, got 0"),
    ("--norm=nope", "--norm: invalid choice: 'nope'"),
    ("--config.data.image_size=abc", "--config.data.image_size: 'abc' is not an integer"),
    ("--check_images=perhaps", "--check_images: 'perhaps' is not a boolean"),
    ("--no_such_flag", "no_such_flag"),
])
def test_eval_usage_errors(tmp_path, flag, fragment):
  proc = _run(["eval.py", "--config", "configs/wflw.py", "--checkpoint", CHECKPOINT,
               "--output_dir", str(tmp_path / "out"), f"--config.data.test_tsv={FIXTURE}/test.tsv",
               f"--config.data.image_dir={FIXTURE}", flag])
  _one_line_error(proc, 2, fragment)


@pytest.mark.slow
def test_eval_checks_output_dir_before_any_work(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  proc = _run(["eval.py", "--config", "configs/wflw.py", "--checkpoint", CHECKPOINT,
               "--output_dir", str(blocker), f"--config.data.test_tsv={FIXTURE}/test.tsv",
               f"--config.data.image_dir={FIXTURE}"])
  _one_line_error(proc, 2, "--output_dir", "not a directory")
  assert "NME" not in proc.stdout  # refused before evaluating


@pytest.mark.slow
def test_debug_switch_shows_the_traceback(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  proc = _run(["eval.py", "--config", "configs/wflw.py", "--checkpoint", CHECKPOINT,
               "--output_dir", str(blocker)], STAR_JAX_DEBUG="1")
  assert proc.returncode != 0 and "Traceback" in proc.stderr


# --------------------------------------------------------------------------------------------
# 7, 11: annotation values.

def _row(**changes):
  row = [os.path.join(FIXTURE, _fixture_rows()[0][0])] + _fixture_rows()[0][1:]
  for index, value in changes.items():
    row[int(index[1:])] = value
  return row


@pytest.mark.parametrize("row, fragment", [
    # 7: a first row with one malformed number is data, not a header.
    (_row(c2=",".join(v if i != 6 else "1.2.3" for i, v in enumerate(_row()[2].split(",")))),
     ":1: landmark column: value 7 ('1.2.3') is not a number"),
    (_row(c3="1e30"), ":1: scale 1e+30 gives a"),
    (_row(c3="0.00001"), ":1: scale 1e-05 gives a"),
    (_row(c4="1e30"), ":1: centre (1e+30"),
    (_row(c5="-5e6"), ":1: centre ("),
    (_row(c6="0,2,0,0,1,0"), ":1: tag column: attribute tags must be 0 or 1"),
    (_row(c3="nan"), ":1: scale: value 1 ('nan') is not finite"),
])
def test_absurd_annotation_values_are_errors_naming_the_line(tmp_path, row, fragment):
  path = _write_tsv(tmp_path / "a.tsv", [row])
  with pytest.raises(AnnotationError, match=None) as info:
    read_tsv(path, WFLW)
  assert fragment in str(info.value) and str(info.value).startswith(path)


def test_landmarks_far_outside_the_image_are_an_error_slightly_outside_a_warning(tmp_path,
                                                                                  caplog):
  rows = _copy_images(tmp_path)
  lm = np.array(rows[0][2].split(","), np.float64).reshape(-1, 2)
  far = lm + [5000.0, 0.0]
  scale, cx = rows[0][3], float(rows[0][4]) + 5000.0
  far_row = rows[0][:2] + [",".join(f"{v:.3f}" for v in far.ravel()), scale, f"{cx:.3f}",
                           rows[0][5]] + rows[0][6:]
  with pytest.raises(AnnotationError, match="image sizes outside"):
    read_tsv(_write_tsv(tmp_path / "far.tsv", [far_row]), WFLW, image_dir=str(tmp_path))
  near = lm.copy()
  near[0] = (-3.0, near[0, 1])   # one point just left of the image: WFLW has such faces
  near_row = rows[0][:2] + [",".join(f"{v:.3f}" for v in near.ravel())] + rows[0][3:]
  with caplog.at_level("WARNING"):
    ann = read_tsv(_write_tsv(tmp_path / "near.tsv", [near_row]), WFLW, image_dir=str(tmp_path))
  assert len(ann) == 1 and "outside their image" in caplog.text


def test_binary_file_as_tsv(tmp_path):
  path = tmp_path / "binary.tsv"
  path.write_bytes(bytes(range(256)) * 4)
  with pytest.raises(AnnotationError, match=r"binary.tsv: not a text TSV file"):
    read_tsv(str(path), WFLW)


# --------------------------------------------------------------------------------------------
# 8: falling back from an unreadable checkpoint is one warning line, not a flood.

def test_unreadable_checkpoint_fallback_is_one_warning_line(tmp_path):
  script = textwrap.dedent(f"""
      import os, numpy as np
      from star_jax.training import checkpointing, model_store
      from star_jax.commands import host
      host.configure_process()  # what every entry point does first
      tree = lambda s: {{"w": np.full((4, 3), s, np.float32), "step": np.asarray(s, np.int32)}}
      c = checkpointing.TrainCheckpoints({str(tmp_path)!r}, keep=3)
      c.save(1, tree(1), {{}}); c.save(2, tree(2), {{}}); c.close()
      for root, _, files in os.walk({str(tmp_path / "checkpoints" / "2" / "state")!r}):
        for f in files:
          if os.path.basename(root) == "d":
            open(os.path.join(root, f), "wb").close()
      c = checkpointing.TrainCheckpoints({str(tmp_path)!r}, keep=3)
      print("restored", c.restore_latest(tree(0))[1]["step"])
      c.close()
  """)
  proc = _run(["-c", script])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "restored 1" in proc.stdout
  assert "Event loop is closed" not in proc.stderr and "Traceback" not in proc.stderr
  warnings = [line for line in proc.stderr.splitlines() if "falling back" in line]
  assert len(warnings) == 1 and "checkpoints/2" in warnings[0]


# --------------------------------------------------------------------------------------------
# 6: the signal handling every long command shares.

def test_first_signal_asks_to_stop_a_second_one_exits_at_once():
  script = textwrap.dedent("""
      import os, signal, sys, time
      from star_jax.commands import cli
      with cli.graceful_stop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        print("stop requested:", stop(), stop.exit_code, flush=True)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
        print("not reached", flush=True)
  """)
  proc = _run(["-c", script], timeout=LAST_GUARD_S)
  assert "stop requested: True 130" in proc.stdout and "not reached" not in proc.stdout
  assert proc.returncode == 130
  assert "SIGINT again: exiting now" in proc.stderr


@pytest.mark.slow
def test_train_py_usage_errors(tmp_path):
  proc = _run(["train.py", "--config", "configs/demo.py", "--workdir", str(tmp_path / "w"),
               "--config.batch_size=0"])
  _one_line_error(proc, 2, "config.batch_size must be positive")
  assert not (tmp_path / "w" / "config.json").exists()
  proc = _run(["train.py", "--config", "configs/nope.py", "--workdir", str(tmp_path / "w")])
  _one_line_error(proc, 2, "configs/nope.py")
  proc = _run(["train.py", "--config", "configs/demo.py", "--workdir", str(tmp_path / "w"),
               "--config.distributed=True"])
  _one_line_error(proc, 2, "coordinator_address")
  proc = _run(["train.py", "--config", "configs/demo.py", "--workdir", str(tmp_path / "w"),
               "--config.optim.lrr=0.1"])
  _one_line_error(proc, 2, "--config.optim.lrr: no such config field")
  (tmp_path / "a_file").write_text("")
  proc = _run(["train.py", "--config", "configs/demo.py", "--workdir", str(tmp_path / "a_file")])
  _one_line_error(proc, 2, "a_file: exists and is not a directory")
