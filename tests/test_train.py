"""End-to-end training runs of a tiny model on synthetic batches (tests/train_harness.py).

Each run is a subprocess (device counts are fixed when JAX starts). The runs share a
compilation cache so the identical single-device programs compile once. Runs:
  A  1 device, uninterrupted (the reference)
  B  2 devices (XLA_FLAGS=--xla_force_host_platform_device_count=2), same global batch
  C  1 device, killed with SIGKILL after its first checkpoint, then resumed to the end
  D  2 processes x 1 device with jax.distributed (gloo collectives on 127.0.0.1)
  E  2 devices, sent SIGTERM mid-epoch (between checkpoints), then resumed to the end
  N  1 device with a NaN injected into one batch
  L  a second run on E's workdir while E runs (refused by the lock)
  M  A's workdir resumed with another model width (refused before anything is written)
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from star_jax.training import model_store
from star_jax.training import logging_utils
from tests.limits import LAST_GUARD_S

pytestmark = pytest.mark.slow

HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_harness.py")
STEPS = 6
# Different device/process counts reduce in a different order. The tiny model computes in
# float64 (float32 parameters). Adam still amplifies float32 parameter rounding in elements whose
# gradient is ~0 (measured after 6 steps at lr 1e-3: max 1.1e-4, mean 8e-7), so the parameters
# (and EMA, BatchNorm statistics) must agree to half of one Adam step (lr / 2) in the worst
# element and to 5e-6 on average; the first logged losses agree to 1e-7 relative.
DEVICE_COUNT_MAX_ATOL = 5e-4
DEVICE_COUNT_MEAN_ATOL = 5e-6
START_TIMEOUT_S = LAST_GUARD_S


def _env(cache_dir, **extra):
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("XLA_FLAGS", None)
  env.update(extra)
  return env


def _start(tmp, name, env, *extra_args, workdir=None):
  workdir = workdir or os.path.join(tmp, name)
  log = open(os.path.join(tmp, name + ".log"), "w")
  proc = subprocess.Popen([sys.executable, HARNESS, workdir, os.path.join(tmp, name + ".npz"),
                           "--steps", str(STEPS), *extra_args],
                          stdout=log, stderr=subprocess.STDOUT, env=env)
  proc.log_path = log.name
  log.close()  # the child holds its own descriptor
  return proc


def _wait(proc, timeout=START_TIMEOUT_S):
  try:
    rc = proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    rc = proc.wait()
  return rc


def _log_tail(proc, n=40):
  with open(proc.log_path) as f:
    return "".join(f.readlines()[-n:])


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp("train_runs"))
  cache = os.path.join(tmp, "jax_cache")
  results = {"tmp": tmp}

  # Phase 1: the reference and the two-device run, side by side.
  a = _start(tmp, "A", _env(cache))
  b = _start(tmp, "B", _env(cache, XLA_FLAGS="--xla_force_host_platform_device_count=2"))
  results["A"] = (_wait(a), a)
  results["B"] = (_wait(b), b)

  # Phase 2: the killed run (cached programs) beside the two-process run.
  c = _start(tmp, "C", _env(cache, STAR_TEST_SLOW_FROM_STEP="3"))
  port = _free_port()
  d = [_start(tmp, f"D{i}" if i else "D", _env(cache), "--coordinator", f"127.0.0.1:{port}",
              "--num_processes", "2", "--process_id", str(i)) for i in range(2)]
  # Kill C as soon as its first checkpoint (step 3) is committed.
  first_ckpt = os.path.join(tmp, "C", "checkpoints", "3")
  deadline = time.time() + START_TIMEOUT_S
  while not os.path.isdir(first_ckpt) and c.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  killed_running = c.poll() is None
  c.send_signal(signal.SIGKILL)
  c.wait()
  results["C_killed"] = (killed_running, c)
  results["C_steps_at_kill"] = sorted(
      int(n) for n in os.listdir(os.path.join(tmp, "C", "checkpoints")) if n.isdigit())
  c2 = _start(tmp, "C", _env(cache))  # same workdir: resumes
  results["C"] = (_wait(c2), c2)
  results["D"] = ([_wait(p) for p in d], d)

  # Phase 3: SIGTERM mid-epoch on two devices, a second run on its workdir, divergence.
  two = dict(XLA_FLAGS="--xla_force_host_platform_device_count=2")
  pause = os.path.join(tmp, "E.pause")
  open(pause, "w").close()
  e = _start(tmp, "E", _env(cache, STAR_TEST_SLOW_FROM_STEP="4", STAR_TEST_PAUSE_FILE=pause,
                            **two))
  n = _start(tmp, "N", _env(cache, STAR_TEST_NAN_AT_STEP="1"))
  # E holds before its fifth batch (checkpoint at 3, log at 4) while the pause file exists.
  deadline = time.time() + START_TIMEOUT_S
  while e.poll() is None and time.time() < deadline and not any(
      r.get("step") == 4 and "train_loss" in r
      for r in logging_utils.read_metrics(os.path.join(tmp, "E"))):
    time.sleep(0.05)
  lock_probe = _start(tmp, "L", _env(cache), workdir=os.path.join(tmp, "E"))
  results["L"] = (_wait(lock_probe), lock_probe)
  results["E_running_at_term"] = e.poll() is None
  e.send_signal(signal.SIGTERM)
  time.sleep(0.5)
  os.remove(pause)
  results["E_term"] = (_wait(e), e)
  results["E_term_log"] = _log_tail(e, 10_000)
  results["E_steps_at_term"] = sorted(
      int(n) for n in os.listdir(os.path.join(tmp, "E", "checkpoints")) if n.isdigit())
  e2 = _start(tmp, "E", _env(cache, **two))
  results["E"] = (_wait(e2), e2)
  results["N"] = (_wait(n), n)

  # Phase 4: resuming A's finished workdir with another model width.
  config_before = open(os.path.join(tmp, "A", "config.json")).read()
  m = _start(tmp, "M", _env(cache), "--channels", "16", workdir=os.path.join(tmp, "A"))
  results["M"] = (_wait(m), m)
  results["M_config_unchanged"] = open(os.path.join(tmp, "A", "config.json")).read() == \
      config_before
  return results


def _load(tmp, name):
  with np.load(os.path.join(tmp, name + ".npz")) as f:
    return {k: f[k] for k in f.files}


def _assert_ok(runs, name):
  rc, proc = runs[name]
  assert rc == 0, f"run {name} failed (rc={rc}):\n{_log_tail(proc)}"


def _assert_close_across_device_counts(x, y):
  assert x.keys() == y.keys()
  diffs = np.concatenate([np.abs(x[k].astype(np.float64) - y[k]).ravel() for k in x])
  assert diffs.max() < DEVICE_COUNT_MAX_ATOL, diffs.max()
  assert diffs.mean() < DEVICE_COUNT_MEAN_ATOL, diffs.mean()


def test_reference_run_learns_and_logs(runs):
  _assert_ok(runs, "A")
  tmp = runs["tmp"]
  records = logging_utils.read_metrics(os.path.join(tmp, "A"))
  train = [r for r in records if "train_loss" in r]
  val = [r for r in records if "val_nme" in r]
  assert [r["step"] for r in train] == [2, 4, 6]
  assert [r["step"] for r in val] == [0, 3, 6]
  for r in train:
    assert {"lr", "examples_per_sec", "train_loss_star", "train_loss_pointmap",
            "train_loss_edgemap"} <= r.keys()
    parts = r["train_loss_star"] + r["train_loss_pointmap"] + r["train_loss_edgemap"]
    assert r["train_loss"] == pytest.approx(parts, rel=1e-5)
  # lr drops by gamma at epoch 1 (= step 6); steps 1..6 all belong to epoch 0.
  assert train[-1]["lr"] == pytest.approx(1e-3)
  assert os.listdir(os.path.join(tmp, "A", "tensorboard"))
  with open(os.path.join(tmp, "A", "config.json")) as f:
    assert json.load(f)["num_train_steps"] == STEPS
  # keep_checkpoints=2 with saves at steps 3 and 6.
  assert sorted(os.listdir(os.path.join(tmp, "A", "checkpoints"))) == ["3", "6"]
  final = _load(tmp, "A")
  assert int(final["step"]) == STEPS


def _first_loss(tmp, name):
  records = logging_utils.read_metrics(os.path.join(tmp, name))
  return next(r["train_loss"] for r in records if "train_loss" in r)


def test_two_devices_match_one_device(runs):
  _assert_ok(runs, "A")
  _assert_ok(runs, "B")
  tmp = runs["tmp"]
  assert _first_loss(tmp, "B") == pytest.approx(_first_loss(tmp, "A"), rel=1e-7)
  a, b = _load(tmp, "A"), _load(tmp, "B")
  assert "devices=2" in _log_tail(runs["B"][1], 10_000).replace("local_devices=2", "devices=2")
  _assert_close_across_device_counts(a, b)


def test_two_processes_train_together(runs):
  _assert_ok(runs, "A")
  rcs, procs = runs["D"]
  for rc, proc in zip(rcs, procs):
    assert rc == 0, f"distributed process failed (rc={rc}):\n{_log_tail(proc)}"
  assert "process=1/2" in _log_tail(procs[1], 10_000)
  assert _first_loss(runs["tmp"], "D") == pytest.approx(_first_loss(runs["tmp"], "A"), rel=1e-7)
  a, d = _load(runs["tmp"], "A"), _load(runs["tmp"], "D")
  _assert_close_across_device_counts(a, d)


def test_sigkill_then_resume_is_exact(runs):
  _assert_ok(runs, "A")
  killed_running, _ = runs["C_killed"]
  assert killed_running, "the run finished before it could be killed"
  assert runs["C_steps_at_kill"] == [3]
  _assert_ok(runs, "C")
  tmp = runs["tmp"]
  a, c = _load(tmp, "A"), _load(tmp, "C")
  for k in a:
    np.testing.assert_array_equal(c[k], a[k], err_msg=k)
  assert _strip_timing(logging_utils.read_metrics(os.path.join(tmp, "C"))) == _strip_timing(
      logging_utils.read_metrics(os.path.join(tmp, "A")))


def test_nan_loss_stops_with_step_and_batch(runs):
  rc, proc = runs["N"]
  assert rc != 0
  log = _log_tail(proc, 10_000)
  assert "TrainingDiverged" in log and "at step 2" in log
  path = os.path.join(runs["tmp"], "N", "nan_batch_step2.npz")
  with np.load(path) as batch:
    assert np.isnan(batch["image"]).any()
    assert batch["landmarks"].shape[1:] == (98, 2)


def test_load_model_from_training_runs(runs):
  _assert_ok(runs, "A")
  tmp = runs["tmp"]
  final = _load(tmp, "A")
  ema = {k: v for k, v in final.items() if k.startswith("['ema_params']")}
  # The latest step of checkpoints/ holds the final EMA weights.
  loaded = model_store.load_model(os.path.join(tmp, "A", "checkpoints"))
  assert loaded.config.num_train_steps == STEPS and loaded.model.num_stacks == 1
  assert loaded.model.bn_axis_name is None and loaded.image_size == 32
  assert loaded.spec.name == "wflw" and loaded.extra["step"] == STEPS
  for key, value in ema.items():
    leaf = loaded.variables
    for part in key[2:-2].split("']['"):
      leaf = leaf[part if part != "ema_params" else "params"]
    np.testing.assert_array_equal(leaf, value)
  raw = model_store.load_model(os.path.join(tmp, "A", "checkpoints", "6"), weights="raw")
  np.testing.assert_array_equal(raw.variables["params"]["heatmap_head0"]["kernel"],
                                final["['params']['heatmap_head0']['kernel']"])
  # The workdir resolves to the best model (the one with the lowest validation NME).
  best = model_store.read_best_meta(os.path.join(tmp, "A"))
  val = {r["step"]: r["val_nme"] for r in logging_utils.read_metrics(os.path.join(tmp, "A"))
         if "val_nme" in r}
  assert best["val_nme"] == pytest.approx(min(val.values()))
  assert best["step"] == min(val, key=val.get)
  loaded = model_store.load_model(os.path.join(tmp, "A"))
  assert loaded.extra["step"] == best["step"]
  assert "params" in loaded.variables and "batch_stats" in loaded.variables


def _strip_timing(records):
  return [{k: v for k, v in r.items() if k not in ("examples_per_sec", "val_seconds")}
          for r in records]


def test_sigterm_mid_epoch_then_resume_matches_an_uninterrupted_run(runs):
  _assert_ok(runs, "B")
  assert runs["E_running_at_term"], "the run finished before it could be signalled"
  rc, proc = runs["E_term"]
  assert rc == 143, runs["E_term_log"][-3000:]
  assert "SIGTERM: finishing the current step" in runs["E_term_log"]
  # Stopped between the checkpoints of steps 3 and 6, with a checkpoint where it stopped.
  steps = runs["E_steps_at_term"]
  assert steps[0] == 3 and 3 < steps[-1] < STEPS, steps
  _assert_ok(runs, "E")
  tmp = runs["tmp"]
  b, e = _load(tmp, "B"), _load(tmp, "E")
  for k in b:
    np.testing.assert_array_equal(e[k], b[k], err_msg=k)
  final = lambda name, key: [r[key] for r in logging_utils.read_metrics(os.path.join(tmp, name))
                             if key in r][-1]
  assert final("E", "train_loss") == final("B", "train_loss")
  assert final("E", "val_nme") == final("B", "val_nme")
  assert _strip_timing(logging_utils.read_metrics(os.path.join(tmp, "E"))) == _strip_timing(
      logging_utils.read_metrics(os.path.join(tmp, "B")))


def test_second_run_on_a_workdir_is_refused_by_the_lock(runs):
  rc, proc = runs["L"]
  log = _log_tail(proc, 200)
  assert rc == 1, log
  assert "is in use by another training run (pid" in log and "Traceback" not in log


def test_resume_with_another_model_is_refused_before_writing(runs):
  rc, proc = runs["M"]
  log = _log_tail(proc, 200)
  assert rc == 1, log
  assert "model.channels: 8 -> 16" in log and "Traceback" not in log
  assert runs["M_config_unchanged"]
