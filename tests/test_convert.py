"""Official checkpoint import: equivalence with the official outputs, file handling, errors.

The fixture (tests/fixtures/official_wflw_small, see its README) is an official 32-channel WFLW
model with random weights and its outputs computed by the official PyTorch code.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from star_jax.training import model_store
from star_jax.commands import convert
from star_jax.core import schemes as datasets
from star_jax.foreign import official

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "official_wflw_small")
CHECKPOINT = os.path.join(FIXTURE, "checkpoint.pkl")
NETS = (("net", False), ("net_ema", True))


@pytest.fixture(scope="module")
def reference():
  return dict(np.load(os.path.join(FIXTURE, "outputs.npz")))


@pytest.fixture(scope="module")
def images():
  # The official model reads BGR NCHW; ours RGB NHWC.
  return np.load(os.path.join(FIXTURE, "input.npy")).transpose(0, 2, 3, 1)[..., ::-1].copy()


@pytest.fixture(scope="module")
def converted():
  return {key: official.load_official_checkpoint(CHECKPOINT, ema=ema) for key, ema in NETS}


@pytest.fixture(scope="module")
def forward(converted):
  """One jitted function (one compile) shared by both weight sets."""
  model = converted["net"][0]

  @jax.jit
  def run(variables, images, masks):
    out, state = model.apply(variables, images, boundary_masks=masks, mutable=["intermediates"])
    return out, state["intermediates"]["boundary_masks"]

  return run


@pytest.fixture(scope="module")
def outputs_f32(converted, forward, images):
  """Free-running float32 outputs and masks per weight set."""
  return {key: forward(converted[key][1], images, None) for key, _ in NETS}


def _relative(actual, expected):
  return np.max(np.abs(np.asarray(actual, np.float64) / expected - 1))


def _chsum(maps):
  return np.asarray(maps, np.float64).sum(axis=(1, 2))  # (B, H, W, C) -> (B, C)


def test_inferred_architecture(converted):
  model, variables = converted["net"]
  assert (model.num_stacks, model.num_levels, model.channels, model.num_points) == (4, 4, 32, 98)
  assert model.use_aam
  wflw = datasets.get_spec("wflw")
  assert model.edge_points == tuple(edge.points for edge in wflw.edges)
  # The fixture's meta.json: 472,756 parameters counted by PyTorch.
  assert sum(x.size for x in jax.tree_util.tree_leaves(variables["params"])) == 472_756
  chex.assert_trees_all_equal_dtypes(variables, jax.tree_util.tree_map(
      lambda x: np.zeros((), np.float32), variables))


def test_first_conv_reads_rgb(converted):
  _, variables = converted["net"]
  state = official.select_state_dict(official.read_torch_checkpoint(CHECKPOINT))
  weight = state["pre.0.conv.weight"].numpy()  # (64, 6, 7, 7): B, G, R, xx, yy, rr
  ours = np.asarray(variables["params"]["stem_conv"]["kernel"])  # (7, 7, 6, 64): R, G, B, ...
  for ours_channel, official_channel in enumerate((2, 1, 0, 3, 4, 5)):
    np.testing.assert_array_equal(ours[:, :, ours_channel, :],
                                  weight[:, official_channel].transpose(1, 2, 0))


@pytest.mark.parametrize("key", [k for k, _ in NETS])
def test_float32_matches_official(key, outputs_f32, reference):
  out, _ = outputs_f32[key]
  for i in range(3):
    np.testing.assert_allclose(out.landmarks[i], reference[f"{key}/landmarks_{i}"], atol=5e-4,
                               rtol=0, err_msg=f"stack {i}")
    assert _relative(_chsum(out.heatmaps[i]), reference[f"{key}/fusion_heatmaps_{i}_chsum"]) < 1e-3
  # A mask pixel within rounding distance of 0.05 may flip in the last stack (fixture README).
  np.testing.assert_allclose(out.landmarks[3], reference[f"{key}/landmarks_3"], atol=5e-3, rtol=0)
  for i in range(4):
    assert _relative(_chsum(out.pointmaps[i]), reference[f"{key}/pointmaps_{i}_chsum"]) < 1e-3
    assert _relative(_chsum(out.edgemaps[i]), reference[f"{key}/edgemaps_{i}_chsum"]) < 1e-3


@pytest.mark.parametrize("key", [k for k, _ in NETS])
def test_boundary_masks_match_official(key, outputs_f32, reference):
  _, masks = outputs_f32[key]
  assert len(masks) == 3
  for i, mask in enumerate(masks, start=1):
    flips = int(np.sum(np.asarray(mask) != reference[f"{key}/boundary_mask_{i}"].astype(bool)))
    # The fixture lists at most 2 official pixels within 1e-4 of the threshold per stack.
    assert flips <= 2, f"stack {i}: {flips} mask pixels differ"
    assert np.asarray(mask).sum() > 1000  # the switch is really exercised


@pytest.mark.parametrize("key", [k for k, _ in NETS])
def test_float32_with_official_masks_matches_every_stack(key, converted, forward, images,
                                                         reference):
  masks = [reference[f"{key}/boundary_mask_{i}"].astype(bool) for i in (1, 2, 3)]
  out, _ = forward(converted[key][1], images, masks)
  for i in range(4):
    np.testing.assert_allclose(out.landmarks[i], reference[f"{key}/landmarks_{i}"], atol=5e-4,
                               rtol=0, err_msg=f"stack {i}")
    assert _relative(_chsum(out.heatmaps[i]), reference[f"{key}/fusion_heatmaps_{i}_chsum"]) < 1e-3


def test_float64_matches_official_float64(converted, images, reference):
  model, _ = converted["net"]
  with jax.enable_x64(True):
    model64 = model.clone(dtype=jnp.float64)
    run = jax.jit(lambda v, x: model64.apply(v, x))
    x64 = jnp.asarray(images, jnp.float64)
    for key, _ in NETS:
      variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), converted[key][1])
      out = run(variables, x64)
      assert out.landmarks[-1].dtype == jnp.float64
      for i in range(4):
        # Far tighter than float32 (which differs by up to 8e-5 on stacks 0-2 and 3e-3 on 3).
        np.testing.assert_allclose(out.landmarks[i], reference[f"{key}/landmarks_{i}_f64"],
                                   atol=5e-5, rtol=0, err_msg=f"{key} stack {i}")
        for name in ("fusion_heatmaps", "pointmaps", "edgemaps"):
          ours = {"fusion_heatmaps": out.heatmaps, "pointmaps": out.pointmaps,
                  "edgemaps": out.edgemaps}[name][i]
          assert _relative(_chsum(ours), reference[f"{key}/{name}_{i}_chsum_f64"]) < 5e-5, name


# ---------------------------------------------------------------------------------------------
# Files written here in the official format (a zip of pickled storages), without torch.
# ---------------------------------------------------------------------------------------------


class FloatStorage:  # pickled under the name torch.FloatStorage (see _write_torch_zip)
  pass


class LongStorage:
  pass


def _rebuild_tensor_v2(*args):  # pickled as torch._utils._rebuild_tensor_v2
  raise AssertionError("never called: the bytes name torch's function")


class _StorageMarker:
  def __init__(self, key, storage_class, numel):
    self.key, self.storage_class, self.numel = key, storage_class, numel


class _Tensor:
  def __init__(self, marker, shape):
    self.marker, self.shape = marker, shape

  def __reduce__(self):
    strides = [int(np.prod(self.shape[i + 1:])) for i in range(len(self.shape))]
    return (_rebuild_tensor_v2, (self.marker, 0, tuple(self.shape), tuple(strides), False,
                                 collections.OrderedDict()))


class _TorchPickler(pickle.Pickler):
  def persistent_id(self, obj):
    if isinstance(obj, _StorageMarker):
      return ("storage", obj.storage_class, obj.key, "cpu", obj.numel)
    return None


def _write_torch_zip(path, obj):
  """Writes `obj` (dicts of numpy arrays) the way torch.save does (protocol 2, zip)."""
  storages = {}

  def wrap(value):
    if isinstance(value, dict):
      return collections.OrderedDict((k, wrap(v)) for k, v in value.items())
    if isinstance(value, np.ndarray):
      key = str(len(storages))
      cls = FloatStorage if value.dtype == np.float32 else LongStorage
      storages[key] = np.ascontiguousarray(value, np.float32 if cls is FloatStorage else np.int64)
      return _Tensor(_StorageMarker(key, cls, value.size), value.shape)
    return value

  buffer = io.BytesIO()
  _TorchPickler(buffer, protocol=2).dump(wrap(obj))
  data = buffer.getvalue()
  for name, torch_name in ((b"FloatStorage", b"torch\nFloatStorage"),
                           (b"LongStorage", b"torch\nLongStorage"),
                           (b"_rebuild_tensor_v2", b"torch._utils\n_rebuild_tensor_v2")):
    data = data.replace(b"c" + __name__.encode() + b"\n" + name + b"\n", b"c" + torch_name + b"\n")
  assert __name__.encode() not in data
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", data)
    z.writestr("archive/byteorder", "little")
    for key, array in storages.items():
      z.writestr(f"archive/data/{key}", array.tobytes())
    z.writestr("archive/version", "3\n")


@pytest.fixture(scope="module")
def official_state():
  """The fixture's `net` state dict as numpy arrays (read by the converter's own reader: what
  the tests below check is the handling of layouts and errors, not the reader)."""
  state = official.select_state_dict(official.read_torch_checkpoint(CHECKPOINT))
  return collections.OrderedDict((k, v.numpy()) for k, v in state.items())


def _assert_same_variables(a, b):
  chex.assert_trees_all_equal(jax.tree_util.tree_map(np.asarray, a),
                              jax.tree_util.tree_map(np.asarray, b))


def test_bare_state_dict_with_module_prefix(tmp_path, official_state, converted):
  path = str(tmp_path / "bare.pth")
  _write_torch_zip(path, {"module." + k: v for k, v in official_state.items()})
  model, variables = official.load_official_checkpoint(path)
  assert model == converted["net"][0]
  _assert_same_variables(variables, converted["net"][1])
  with pytest.raises(official.CheckpointError, match="bare state dict has no 'net_ema'"):
    official.load_official_checkpoint(path, ema=True)


def test_trainer_checkpoint_with_optimizer_state(tmp_path, official_state, converted):
  # The official trainer also stores optimizer and scheduler state (nested dicts, lists, ...).
  path = str(tmp_path / "best_model.pkl")
  optimizer = {"state": {0: {"step": np.zeros((), np.float32),
                             "exp_avg": np.ones((3,), np.float32)}},
               "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1]}]}
  _write_torch_zip(path, {"net": official_state, "optimizer": optimizer,
                          "scheduler": {"milestones": {200: 1}, "last_epoch": 3}, "epoch": 3})
  _, variables = official.load_official_checkpoint(path)
  _assert_same_variables(variables, converted["net"][1])
  with pytest.raises(official.CheckpointError, match="has no 'net_ema' entry"):
    official.load_official_checkpoint(path, ema=True)


def test_other_point_count_and_depth_convert_without_settings(tmp_path, official_state, images,
                                                             reference):
  """A 1-stack, 40-point variant (later stacks dropped, heads sliced) with edges no known dataset
  has still converts. Its stack depends only on the kept weights, so it must equal the official
  stack-0 outputs on the first 40 channels."""
  k = 40
  state = collections.OrderedDict()
  for name, value in official_state.items():
    module, index = name.split(".")[:2]
    if module.startswith("merge_") or (module in ("hgs", "features", "out_heatmaps",
                                                  "out_pointmaps", "out_edgemaps")
                                       and index != "0"):
      continue  # later stacks, and the merges that only feed them
    if name.startswith(("out_heatmaps", "out_pointmaps", "e2h_transform")):
      value = value[:k]
    state[name] = value
  state["e2h_transform.bias"] = np.zeros((k,), np.float32)  # all 40 points lie on an edge
  path = str(tmp_path / "custom.pkl")
  _write_torch_zip(path, {"net": state})
  model, variables = official.load_official_checkpoint(path)
  assert (model.num_stacks, model.num_points, model.num_edges) == (1, k, 9)
  assert model.edge_points[0] == tuple(range(33)) and model.edge_points[1] == tuple(range(33, 40))
  scheme = model_store.load_model(path).spec
  assert scheme.name == "official_40pt" and scheme.num_points == k and not scheme.flip_pairs
  out = jax.jit(model.apply)(variables, images)
  np.testing.assert_allclose(out.landmarks[0], reference["net/landmarks_0"][:, :k], atol=5e-4)
  assert _relative(_chsum(out.heatmaps[0]), reference["net/fusion_heatmaps_0_chsum"][:, :k]) < 1e-3
  assert _relative(_chsum(out.pointmaps[0]), reference["net/pointmaps_0_chsum"][:, :k]) < 1e-3
  assert _relative(_chsum(out.edgemaps[0]), reference["net/edgemaps_0_chsum"]) < 1e-3


def test_cli_writes_inference_checkpoint(tmp_path, converted, capsys):
  out_dir = str(tmp_path / "converted")
  assert convert.main([CHECKPOINT, "--out", out_dir, "--ema"]) == 0
  assert "scheme=wflw" in capsys.readouterr().out
  loaded = model_store.load_model(out_dir)
  assert loaded.model == converted["net_ema"][0]
  _assert_same_variables(loaded.variables, converted["net_ema"][1])
  assert loaded.spec == datasets.get_spec("wflw") and loaded.model.channels == 32
  assert loaded.image_size == 256 and loaded.model.precision == "highest"


def test_cli_errors_are_one_line(tmp_path, capsys):
  with pytest.raises(SystemExit) as info:
    convert.main([str(tmp_path / "absent.pkl"), "--out", str(tmp_path / "x")])
  assert info.value.code == 1   # a missing input is data, not usage
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1 and "absent.pkl" in err
  bad = tmp_path / "bad.pkl"
  bad.write_bytes(b"not a checkpoint")
  with pytest.raises(SystemExit) as info:
    convert.main([str(bad), "--out", str(tmp_path / "x")])
  assert info.value.code == 1
  assert "neither a torch.save zip file" in capsys.readouterr().err


def test_model_description_round_trip(converted):
  from star_jax import models
  model = converted["net"][0]
  description = models.describe(model)
  assert description["name"] == "stacked_hourglass"
  assert models.from_description(description) == model


# ---------------------------------------------------------------------------------------------
# Malformed files: one-line errors naming what is wrong.
# ---------------------------------------------------------------------------------------------


def _error(path, **kwargs) -> str:
  with pytest.raises(official.CheckpointError) as info:
    official.load_official_checkpoint(path, **kwargs)
  message = str(info.value)
  assert "\n" not in message
  assert str(path) in message
  return message


def test_random_bytes(tmp_path):
  path = tmp_path / "random.pkl"
  path.write_bytes(np.random.default_rng(0).bytes(1000))
  assert "neither a torch.save zip file" in _error(path)


def test_truncated_file(tmp_path):
  path = tmp_path / "truncated.pkl"
  with open(CHECKPOINT, "rb") as f:
    path.write_bytes(f.read()[:2_000_000])
  assert "truncated or damaged" in _error(path)


def test_missing_file(tmp_path):
  assert "no such file" in _error(tmp_path / "absent.pkl")


def _rewrite_zip(src, dst, *, drop=None, cut=None):
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
    for info in zin.infolist():
      if info.filename == drop:
        continue
      data = zin.read(info.filename)
      if info.filename == cut:
        data = data[: len(data) // 2]
      zout.writestr(info.filename, data)


@pytest.mark.parametrize("damage, message", [
    (dict(drop="checkpoint/data/0"), "checkpoint/data/0 is missing"),
    (dict(cut="checkpoint/data/1"), "checkpoint/data/1 has 128 bytes, expected 256"),
    (dict(cut="checkpoint/data.pkl"), "data.pkl is corrupt"),
])
def test_damaged_zip_member(tmp_path, damage, message):
  path = tmp_path / "damaged.pkl"
  _rewrite_zip(CHECKPOINT, path, **damage)
  assert message in _error(path)


def test_not_a_torch_zip(tmp_path):
  path = tmp_path / "plain.zip"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("readme.txt", "hello")
  assert "without <name>/data.pkl" in _error(path)


def test_missing_key(tmp_path, official_state):
  path = tmp_path / "missing_key.pkl"
  state = dict(official_state)
  del state["hgs.2.low1.bn2.running_var"]
  _write_torch_zip(str(path), {"net": state})
  assert "lacks 'hgs.2.low1.bn2.running_var'" in _error(path)


def test_wrong_shape(tmp_path, official_state):
  path = tmp_path / "wrong_shape.pkl"
  state = dict(official_state)
  state["features.1.0.conv2.conv.weight"] = np.zeros((16, 16, 1, 1), np.float32)
  _write_torch_zip(str(path), {"net": state})
  message = _error(path)
  assert "features.1.0.conv2.conv.weight has the wrong shape" in message
  assert "(1, 1, 16, 16)" in message and "(3, 3, 16, 16)" in message


def test_unexpected_key(tmp_path, official_state):
  path = tmp_path / "extra_key.pkl"
  state = dict(official_state)
  state["extra_head.weight"] = np.zeros((3,), np.float32)
  _write_torch_zip(str(path), {"net": state})
  assert "unexpected state-dict entries extra_head.weight" in _error(path)


def test_not_a_state_dict(tmp_path):
  path = tmp_path / "list.pkl"
  _write_torch_zip(str(path), [np.zeros(3, np.float32)])
  assert "not a dict or state dict" in _error(path)


def test_bad_e2h(tmp_path, official_state):
  path = tmp_path / "bad_e2h.pkl"
  state = dict(official_state)
  state["e2h_transform.bias"] = np.ones_like(state["e2h_transform.bias"])
  _write_torch_zip(str(path), {"net": state})
  assert "e2h_transform.bias" in _error(path)
