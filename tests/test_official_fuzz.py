"""Hostile official checkpoints: forged tensor headers, pickle and zip bombs, random byte flips.

The official fixture's `data.pkl` is parsed here by the standard unpickler (tensor headers
recorded, nothing resolved) and written again opcode by opcode (protocol 2, as torch.save
writes it) with one header edited, into a fresh zip with valid CRCs, so each case reaches the
reader's checks. Expected values come from the archive's raw bytes, never from the reader.

Byte flips run in a child process (`python tests/test_official_fuzz.py flips ...`), so a crash
of the interpreter shows as a failing exit code instead of killing the test run.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import time
import warnings
import zipfile
from typing import Any

import numpy as np
import pytest

from star_jax.foreign import official, torch_files
from star_jax.errors import CheckpointError

if __name__ == "__main__":  # run as a script by the byte-flip test: the repository on the path
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.limits import LAST_GUARD_S  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "official_wflw_small",
                       "checkpoint.pkl")
PREFIX = "checkpoint/"
TARGET = "pre.0.conv.weight"  # (64, 6, 7, 7) float32 on storage "0", strides (294, 49, 7, 1)
SMALL = 7  # the small checkpoint holds the first 7 tensors of "net" (one of them 0-d, int64)


# ---------------------------------------------------------------------------------------------
# The fixture's tensor headers, read by the standard unpickler.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Header:
  """A tensor as torch.save pickles it: persistent id fields, then the _rebuild_tensor_v2
  arguments that matter."""

  storage_class: Any
  key: Any
  location: Any
  numel: Any
  offset: Any
  shape: Any
  stride: Any


class _HeaderUnpickler(pickle.Unpickler):
  def find_class(self, module, name):
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return lambda storage, offset, shape, stride, *rest: Header(*storage, offset, shape, stride)
    if module == "torch":
      return name
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    raise AssertionError(f"unexpected global {module}.{name} in the fixture")

  def persistent_load(self, pid):
    assert pid[0] == "storage"
    return pid[1:]


def _load_fixture_zip():
  """The fixture's checkpoint with `Header` leaves, and its members' bytes by name."""
  with zipfile.ZipFile(FIXTURE) as z:
    members = {name: z.read(name) for name in z.namelist()}
  checkpoint = _HeaderUnpickler(io.BytesIO(members[PREFIX + "data.pkl"])).load()
  return checkpoint, members


@pytest.fixture(scope="module")
def fixture_zip():
  return _load_fixture_zip()


def _raw_array(members, header: Header, byteorder: str = "<") -> np.ndarray:
  """The tensor straight from its storage's bytes (the fixture's tensors are contiguous)."""
  dtype = {"FloatStorage": "f4", "LongStorage": "i8"}[header.storage_class]
  flat = np.frombuffer(members[f"{PREFIX}data/{header.key}"], byteorder + dtype)
  count = int(np.prod(header.shape))
  expected_strides = tuple(int(np.prod(header.shape[i + 1:])) for i in range(len(header.shape)))
  assert header.stride == expected_strides and header.offset == 0
  return flat[:count].reshape(header.shape)


# ---------------------------------------------------------------------------------------------
# Writing data.pkl opcode by opcode (protocol 2), so any value can sit anywhere.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Global:
  module: str
  name: str


@dataclasses.dataclass(frozen=True)
class Call:  # REDUCE: func(*args)
  func: Any
  args: Any


@dataclasses.dataclass(frozen=True)
class PersistentId:  # BINPERSID
  value: Any


@dataclasses.dataclass(frozen=True)
class Build:  # BUILD: obj.__setstate__(state)
  obj: Any
  state: Any


@dataclasses.dataclass(frozen=True)
class Raw:
  data: bytes


class ODict(tuple):
  """An OrderedDict of these (key, value) pairs, written as torch writes state dicts."""


def _emit(value: Any, out: bytearray) -> None:
  if isinstance(value, Raw):
    out += value.data
  elif isinstance(value, Global):
    out += b"c" + value.module.encode() + b"\n" + value.name.encode() + b"\n"
  elif isinstance(value, Call):
    _emit(value.func, out)
    _emit(value.args, out)
    out += b"R"
  elif isinstance(value, PersistentId):
    _emit(value.value, out)
    out += b"Q"
  elif isinstance(value, Build):
    _emit(value.obj, out)
    _emit(value.state, out)
    out += b"b"
  elif isinstance(value, ODict):
    _emit(Call(Global("collections", "OrderedDict"), ()), out)
    if value:
      out += b"("
      for key, item in value:
        _emit(key, out)
        _emit(item, out)
      out += b"u"
  elif value is None:
    out += b"N"
  elif isinstance(value, bool):
    out += b"\x88" if value else b"\x89"
  elif isinstance(value, int):
    if 0 <= value < 256:
      out += b"K" + bytes([value])
    elif -2 ** 31 <= value < 2 ** 31:
      out += b"J" + struct.pack("<i", value)
    else:
      encoded = pickle.encode_long(value)
      out += b"\x8a" + bytes([len(encoded)]) + encoded
  elif isinstance(value, float):
    out += b"G" + struct.pack(">d", value)
  elif isinstance(value, str):
    encoded = value.encode()
    out += b"X" + struct.pack("<I", len(encoded)) + encoded
  elif isinstance(value, tuple):
    out += b"(" if value else b")"
    for item in value:
      _emit(item, out)
    out += b"t" if value else b""
  elif isinstance(value, list):
    out += b"]"
    if value:
      out += b"("
      for item in value:
        _emit(item, out)
      out += b"e"
  elif isinstance(value, dict):
    out += b"}"
    if value:
      out += b"("
      for key, item in value.items():
        _emit(key, out)
        _emit(item, out)
      out += b"u"
  else:
    raise TypeError(value)


def _pickle(value: Any) -> bytes:
  out = bytearray(b"\x80\x02")
  _emit(value, out)
  return bytes(out + b".")


def _tensor(header: Header, **edits) -> Call:
  """The opcodes torch.save writes for a tensor; `edits` replace header fields, or whole parts:
  `pid` (the persistent id), `storage` (the first argument), `args` (all arguments), `func`."""
  h = dataclasses.replace(header, **{k: v for k, v in edits.items()
                                     if k in Header.__dataclass_fields__})
  storage_class = (h.storage_class if not isinstance(h.storage_class, str)
                   else Global("torch", h.storage_class))
  pid = edits.get("pid", ("storage", storage_class, h.key, h.location, h.numel))
  storage = edits.get("storage", PersistentId(pid))
  args = edits.get("args", (storage, h.offset, h.shape, h.stride, False,
                            Call(Global("collections", "OrderedDict"), ())))
  return Call(edits.get("func", Global("torch._utils", "_rebuild_tensor_v2")), args)


def _write_zip(path, pickle_data: bytes, storages: dict[str, bytes], *, byteorder=b"little",
               extra=(), compression=zipfile.ZIP_STORED) -> str:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # zipfile warns about the duplicate-member case
    with zipfile.ZipFile(path, "w") as z:
      z.writestr(PREFIX + "data.pkl", pickle_data)
      if byteorder is not None:
        z.writestr(PREFIX + "byteorder", byteorder)
      for key, raw in storages.items():
        z.writestr(f"{PREFIX}data/{key}", raw, compress_type=compression)
      z.writestr(PREFIX + "version", "3\n")
      for name, data, *how in extra:
        z.writestr(name, data() if callable(data) else data,
                   compress_type=how[0] if how else zipfile.ZIP_STORED)
  return str(path)


def _small(fixture_zip, tmp_path, edits=None, *, target=TARGET, pickle_data=None, **zip_options
           ) -> str:
  """The first SMALL tensors of "net" and their storages, `edits` applied to `target`."""
  checkpoint, members = fixture_zip
  headers = list(checkpoint["net"].items())[:SMALL]
  state = ODict((name, _tensor(h, **(edits or {}) if name == target else {}))
                for name, h in headers)
  storages = {h.key: members[f"{PREFIX}data/{h.key}"] for _, h in headers}
  data = pickle_data if pickle_data is not None else _pickle({"net": state, "epoch": 1})
  return _write_zip(tmp_path / "edited.pkl", data, storages, **zip_options)


def _error(path) -> str:
  with pytest.raises(CheckpointError) as info:
    checkpoint = official.read_torch_checkpoint(path)
    for tensor in official.select_state_dict(checkpoint, path=path).values():
      tensor.numpy()
  message = str(info.value)
  assert "\n" not in message and message.startswith(f"{path}: ")
  return message


def _all_tensors(obj, prefix=""):
  for key, value in (obj.items() if isinstance(obj, dict) else ()):
    if isinstance(value, dict):
      yield from _all_tensors(value, f"{prefix}{key}/")
    elif isinstance(value, official.LazyTensor):
      yield f"{prefix}{key}", value


# ---------------------------------------------------------------------------------------------
# Untouched files load, and equal the raw bytes.
# ---------------------------------------------------------------------------------------------


def test_untouched_fixture_equals_its_raw_storages(fixture_zip):
  checkpoint, members = fixture_zip
  loaded = official.read_torch_checkpoint(FIXTURE)
  assert loaded["epoch"] == 1 and set(loaded) == {"net", "net_ema", "epoch"}
  tensors = dict(_all_tensors(loaded))
  assert len(tensors) == 2 * 1450
  for net in ("net", "net_ema"):
    for name, header in checkpoint[net].items():
      array = tensors[f"{net}/{name}"].numpy()
      expected = _raw_array(members, header)
      assert array.dtype == expected.dtype.newbyteorder("=")
      np.testing.assert_array_equal(array, expected, err_msg=f"{net}/{name}")


def test_rewritten_small_checkpoint_loads(fixture_zip, tmp_path):
  """The control for the edits below: written here without edits, it reads back exactly."""
  checkpoint, members = fixture_zip
  loaded = official.read_torch_checkpoint(_small(fixture_zip, tmp_path))
  assert list(loaded["net"]) == list(checkpoint["net"])[:SMALL] and loaded["epoch"] == 1
  for name, tensor in loaded["net"].items():
    np.testing.assert_array_equal(tensor.numpy(), _raw_array(members, checkpoint["net"][name]))


@pytest.mark.parametrize("zip_options", [
    dict(compression=zipfile.ZIP_DEFLATED),  # re-zipped by a tool
    dict(byteorder=None),  # written before torch recorded the byte order: little-endian
])
def test_other_valid_archives_load(fixture_zip, tmp_path, zip_options):
  checkpoint, members = fixture_zip
  loaded = official.read_torch_checkpoint(_small(fixture_zip, tmp_path, **zip_options))
  for name, tensor in loaded["net"].items():
    np.testing.assert_array_equal(tensor.numpy(), _raw_array(members, checkpoint["net"][name]))


def test_big_endian_byteorder_is_honoured(fixture_zip, tmp_path):
  checkpoint, members = fixture_zip
  loaded = official.read_torch_checkpoint(_small(fixture_zip, tmp_path, byteorder=b"big"))
  weight = loaded["net"][TARGET].numpy()
  np.testing.assert_array_equal(weight, _raw_array(members, checkpoint["net"][TARGET], ">"))
  assert weight.dtype == np.float32  # native order, whatever the file's


def test_legitimate_views_load(fixture_zip, tmp_path):
  """Views torch writes for shared or sliced storages: one storage under two tensors, an offset,
  a transposed layout, a v1 rebuild call and a parameter wrapper."""
  checkpoint, members = fixture_zip
  weight = checkpoint["net"][TARGET]
  flat = np.frombuffer(members[f"{PREFIX}data/0"], "<f4")
  cases = {
      "shared": (_tensor(weight, shape=(64,), stride=(1,)), flat[:64]),
      "offset": (_tensor(weight, offset=18816 - 10, shape=(10,), stride=(1,)), flat[-10:]),
      "transposed": (_tensor(weight, shape=(294, 64), stride=(1, 294)),
                     flat.reshape(64, 294).T),
      "empty": (_tensor(weight, offset=18816, shape=(0, 5), stride=(5, 1)),
                np.zeros((0, 5), np.float32)),
      "v1": (_tensor(weight, func=Global("torch._utils", "_rebuild_tensor"),
                     args=(PersistentId(("storage", Global("torch", "FloatStorage"), "0", "cpu",
                                         18816)), 0, (3,), (1,))), flat[:3]),
      "parameter": (Call(Global("torch._utils", "_rebuild_parameter"),
                         (_tensor(weight), True, Call(Global("collections", "OrderedDict"), ()))),
                    flat.reshape(64, 6, 7, 7)),
  }
  path = _write_zip(tmp_path / "views.pkl",
                    _pickle(ODict((name, tensor) for name, (tensor, _) in cases.items())),
                    {"0": members[f"{PREFIX}data/0"]})
  loaded = official.read_torch_checkpoint(path)
  for name, (_, expected) in cases.items():
    np.testing.assert_array_equal(loaded[name].numpy(), expected, err_msg=name)


# ---------------------------------------------------------------------------------------------
# Forged tensor headers: each is one line naming the tensor and what is wrong.
# ---------------------------------------------------------------------------------------------

FLOAT = Global("torch", "FloatStorage")
HEADER_CASES = [
    # storage offset
    ("offset_negative", dict(offset=-1), "storage offset -1 is negative"),
    ("offset_past_end", dict(offset=1), "reaches element 18816, past the end of its storage "
                                        "(18816 elements)"),
    ("offset_huge", dict(offset=10 ** 12), "past the end of its storage"),
    ("offset_bignum", dict(offset=2 ** 80), "past the end of its storage"),
    ("offset_float", dict(offset=0.0), "storage offset 0.0 is a float, not an integer"),
    ("offset_str", dict(offset="0"), "storage offset '0' is a str, not an integer"),
    ("offset_bool", dict(offset=False), "storage offset False is a bool, not an integer"),
    ("offset_none", dict(offset=None), "storage offset None is a NoneType"),
    # strides
    ("stride_negative", dict(stride=(294, 49, 7, -1)), "stride -1 is negative (dimension 3)"),
    ("stride_zero", dict(stride=(294, 49, 0, 1)), "make elements of shape (64, 6, 7, 7) overlap"),
    ("stride_overlap", dict(stride=(294, 49, 6, 1)), "overlap"),
    ("stride_huge", dict(stride=(294, 49, 7, 2 ** 40)), "past the end of its storage"),
    ("stride_float", dict(stride=(294, 49, 7, 1.0)), "stride 1.0 is a float, not an integer"),
    ("stride_count", dict(stride=(294, 49, 7)), "4 sizes (64, 6, 7, 7) but 3 strides"),
    ("stride_str", dict(stride="abc"), "strides 'abc' are a str, not a tuple"),
    # sizes
    ("size_negative", dict(shape=(64, 6, 7, -7)), "size -7 is negative (dimension 3)"),
    ("size_past_end", dict(shape=(65, 6, 7, 7)), "past the end of its storage"),
    ("size_huge", dict(shape=(10 ** 15, 6, 7, 7)), "size 1000000000000000 (dimension 0) is "
                                                    "larger than the file"),
    ("size_huge_empty", dict(shape=(0, 2 ** 62), stride=(1, 1)), "larger than the file"),
    ("size_str", dict(shape=("64", 6, 7, 7)), "size '64' is a str, not an integer"),
    ("size_int", dict(shape=64, stride=1), "sizes 64 are an int, not a tuple"),
    ("too_many_dims", dict(shape=(1,) * 40, stride=(1,) * 40), "40 dimensions, more than 32"),
    # storage declared by the persistent id
    ("numel_over_bytes", dict(numel=18817), "storage checkpoint/data/0 has 75264 bytes, "
                                            "expected 75268 (18817 x float32)"),
    ("numel_terabytes", dict(numel=10 ** 12), "has 75264 bytes, expected 4000000000000"),
    ("numel_negative", dict(numel=-1), "storage 0: element count -1 is negative"),
    ("numel_float", dict(numel=18816.0), "element count 18816.0 is a float"),
    ("key_missing", dict(key="999"), "storage checkpoint/data/999 is missing from the archive"),
    ("key_path", dict(key="../data.pkl"), "storage key '../data.pkl' is not a plain name"),
    ("key_int", dict(key=0), "storage key 0 is not a plain name"),
    ("dtype_wider", dict(storage_class="DoubleStorage"),
     "has 75264 bytes, expected 150528 (18816 x float64)"),
    ("dtype_unknown", dict(storage_class="ComplexFloatStorage"),
     "storage type torch.ComplexFloatStorage is not supported"),
    ("dtype_not_a_class", dict(storage_class=Raw(b"X\x0c\x00\x00\x00FloatStorage")),
     "storage type str is not supported"),
    ("location_int", dict(location=0), "location 0 is not a string"),
    ("pid_short", dict(pid=("storage", FLOAT, "0", "cpu")), "persistent id ("),
    ("pid_tag", dict(pid=("module", FLOAT, "0", "cpu", 18816)), "is not ('storage', type, key"),
    ("pid_str", dict(pid="storage"), "persistent id 'storage' is not ('storage'"),
    # the rebuild call
    ("args_too_few", dict(args=(0, 0, 0)), "_rebuild_tensor_v2 takes 6 or 7 arguments, got 3"),
    ("args_too_many", dict(args=(0,) * 8), "_rebuild_tensor_v2 takes 6 or 7 arguments, got 8"),
    ("args_no_storage", dict(storage=7), "its storage is an int, not a storage"),
    ("args_opaque_storage", dict(storage=Call(Global("os", "system"), ("true",))),
     "its storage is an os.system, not a storage"),
    ("v1_args", dict(func=Global("torch._utils", "_rebuild_tensor")),
     "_rebuild_tensor takes 4 arguments, got 6"),
]


@pytest.mark.parametrize("edits, fragment", [c[1:] for c in HEADER_CASES],
                         ids=[c[0] for c in HEADER_CASES])
def test_forged_header(fixture_zip, tmp_path, edits, fragment):
  message = _error(_small(fixture_zip, tmp_path, edits))
  assert f"tensor 'net/{TARGET}': " in message and fragment in message, message


def test_storage_declared_twice_differently(fixture_zip, tmp_path):
  # pre.0.conv.bias points at the weight's storage "0" but declares 64 elements.
  message = _error(_small(fixture_zip, tmp_path, dict(key="0"), target="pre.0.conv.bias"))
  assert ("tensor 'net/pre.0.conv.bias': storage checkpoint/data/0 is declared as 18816 x "
          "float32 and as 64 x float32") in message


def test_parameter_wrapping_a_non_tensor(fixture_zip, tmp_path):
  data = _pickle({"net": ODict([("w", Call(Global("torch._utils", "_rebuild_parameter"),
                                           ("weights", True, None)))])})
  assert "tensor 'net/w': a parameter wraps a str, not a tensor" in _error(
      _small(fixture_zip, tmp_path, pickle_data=data))


@pytest.mark.parametrize("target", [TARGET, "FloatStorage"])
def test_state_given_after_validation_is_refused(fixture_zip, tmp_path, target):
  """BUILD would write straight into a checked object's fields (here: offset -1)."""
  checkpoint, _ = fixture_zip
  obj = (_tensor(checkpoint["net"][TARGET]) if target == TARGET else FLOAT)
  data = _pickle({"net": ODict([(TARGET, Build(obj, {"offset": -1, "dtype": None}))])})
  message = _error(_small(fixture_zip, tmp_path, pickle_data=data))
  assert "data.pkl is corrupt" in message and "gives state to a" in message


def test_integer_storage_under_a_weight_is_refused_by_the_converter(fixture_zip, tmp_path):
  """Same element size, so the bytes fit: the reader cannot tell, the converter refuses
  non-float weights (and the conversion stops at the first one)."""
  checkpoint, members = fixture_zip
  state = ODict((name, _tensor(h, storage_class="IntStorage") if name == TARGET else _tensor(h))
                for name, h in checkpoint["net"].items())
  storages = {h.key: members[f"{PREFIX}data/{h.key}"] for h in checkpoint["net"].values()}
  path = _write_zip(tmp_path / "int.pkl", _pickle({"net": state}), storages)
  with pytest.raises(CheckpointError, match=f"{TARGET} has dtype int32, expected floating"):
    official.load_official_checkpoint(path)


def test_code_named_by_the_file_is_not_run(fixture_zip, tmp_path):
  marker = tmp_path / "ran"
  data = _pickle({"net": ODict([(TARGET, Call(Global("os", "system"), (f"touch {marker}",)))])})
  message = _error(_small(fixture_zip, tmp_path, pickle_data=data))
  assert f"state-dict entry '{TARGET}' is an os.system, not a tensor" in message
  assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Archives: byte order, duplicates, zip bombs.
# ---------------------------------------------------------------------------------------------


ARCHIVE_CASES = [
    ("byteorder_garbage", dict(byteorder=b"garbage"),
     "checkpoint/byteorder is 'garbage', expected 'little' or 'big'"),
    ("byteorder_huge", dict(byteorder=b"little" * 100),
     "checkpoint/byteorder holds 600 bytes, expected 'little' or 'big'"),
    ("duplicate_member", dict(extra=[(PREFIX + "data/0", b"\0" * 75264)]),
     "the archive holds 'checkpoint/data/0' twice"),
    ("two_pickles", dict(extra=[("other/data.pkl", b"\x80\x02N.")]), "with 2 data.pkl files"),
    # 16 MB of zeros, which deflate shrinks about 1000 times
    ("zip_bomb", dict(extra=[(PREFIX + "padding", lambda: bytes(16 << 20), zipfile.ZIP_DEFLATED)]),
     "times the file's"),
]


@pytest.mark.parametrize("zip_options, fragment", [c[1:] for c in ARCHIVE_CASES],
                         ids=[c[0] for c in ARCHIVE_CASES])
def test_forged_archive(fixture_zip, tmp_path, zip_options, fragment):
  assert fragment in _error(_small(fixture_zip, tmp_path, **zip_options))


def test_pickle_bomb_deflated(fixture_zip, tmp_path):
  checkpoint, members = fixture_zip
  data = b"\x80\x02" + b"N0" * (32 << 20) + b"N."  # 64 MB of push/pop: huge, harmless opcodes
  with zipfile.ZipFile(tmp_path / "bomb.pkl", "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr(PREFIX + "data.pkl", data)
  assert "a zip bomb" in _error(tmp_path / "bomb.pkl")


# ---------------------------------------------------------------------------------------------
# Pickle bombs and malformed opcodes (two of these crash CPython when unpickled unchecked).
# ---------------------------------------------------------------------------------------------

_SLICE = b"cbuiltins\nslice\nq\x00"


def _laughs(levels: int) -> bytes:
  """t0 = (0, 0), t(i+1) = (t(i), t(i)), ...: a few bytes per level, 2**levels objects to hash."""
  body = b"K\x00K\x00\x86q\x00"
  for level in range(1, levels + 1):
    body += b"h" + bytes([level - 1]) + b"h" + bytes([level - 1]) + b"\x86q" + bytes([level])
  return body


PICKLE_CASES = [
    # 10**6 nested 1-tuples used as a dict key: hashing recurses in C (segfault unchecked).
    ("deep_tuple_key", b"}K\x00" + b"\x85" * 10 ** 6 + b"K\x01s", "nested more than 200 deep"),
    # 3 * 10**5 nested slices: freed recursively in C (segfault unchecked).
    ("deep_slices", _SLICE + b"h\x00" * (3 * 10 ** 5 - 1) + b"K\x00" + b"\x85R" * 3 * 10 ** 5,
     "nested more than 200 deep"),
    ("deep_lists", b"]" * 10 ** 5 + b"a" * (10 ** 5 - 1), "nested more than 200 deep"),
    ("billion_laughs", b"}" + _laughs(60) + b"K\x01s",
     "a tuple holding more than 1024 objects"),
    ("memo_index", b"N" + b"r" + struct.pack("<I", 2 ** 30), "memo index 1073741824 out of range"),
    ("memo_missing", b"h\x05", "memo index 5 is empty"),
    ("unknown_opcode", b"N\xff", "opcode b'\\xff' unknown"),
    ("string_length", b"X" + struct.pack("<I", 2 ** 31) + b"abc",
     "expects 2147483648 bytes, only 4 remain"),
    ("no_mark", b"K\x01t", "TUPLE without a MARK"),
    ("underflow", b"s", "SETITEM with too few items on the stack"),
    ("no_stop", b"\x80\x02N", "pickle exhausted before seeing STOP"),
    ("reduce_not_a_tuple", _SLICE + b"K\x01R", "corrupt (TypeError"),
    ("protocol_9", b"\x80\x09N.", "corrupt (ValueError: unsupported pickle protocol: 9)"),
]


@pytest.mark.parametrize("opcodes, fragment", [c[1:] for c in PICKLE_CASES],
                         ids=[c[0] for c in PICKLE_CASES])
def test_malformed_pickle(fixture_zip, tmp_path, opcodes, fragment):
  data = opcodes if opcodes.startswith(b"\x80") else b"\x80\x02" + opcodes + b"."
  message = _error(_small(fixture_zip, tmp_path, pickle_data=data))
  assert "checkpoint/data.pkl" in message and fragment in message, message


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_scanner_accepts_ordinary_pickles(protocol):
  """Every protocol's opcodes for the values a trainer checkpoint holds (optimizer and
  scheduler state: nested dicts, lists, tuples, sets, numbers, strings, bytes)."""
  shared = [1.5, "x" * 300]
  value = {"epoch": 3, "big": 2 ** 100, "neg": -7, "flags": (True, False, None),
           "lr": [1e-3, float("inf")], "names": {"a", "b"}, "frozen": frozenset({1, 2}),
           "text": "caf\u00e9\n", "raw": b"\x00\xff" * 200, "bytes": bytearray(b"ab"),
           "nested": collections.OrderedDict([("s", shared), ("t", (shared, shared))]),
           "milestones": collections.Counter({200: 1}), "deep": [[[[[0]]]]]}
  torch_files._scan_pickle(pickle.dumps(value, protocol=protocol))


def test_too_many_unknown_globals(fixture_zip, tmp_path):
  data = b"\x80\x02" + b"".join(b"cm\ng%d\n0" % i for i in range(1001)) + b"N."
  assert "more than 1000 unknown globals" in _error(_small(fixture_zip, tmp_path,
                                                          pickle_data=data))


# ---------------------------------------------------------------------------------------------
# Random byte flips, in a child process.
# ---------------------------------------------------------------------------------------------

FLIP_SEED = 20240611
ZIP_FLIPS = 24  # the whole fixture, read in full each time: about 0.5 s each
PICKLE_FLIPS = 400  # a small data.pkl: milliseconds each


def _flip_regions(raw: bytes) -> dict[str, list[tuple[int, int]]]:
  """Byte ranges of the zip structure (headers and directory, outside the CRCs) and of
  data.pkl, where flips are most interesting; storage bytes are the rest."""
  with zipfile.ZipFile(io.BytesIO(raw)) as z:
    headers = [(info.header_offset, info.header_offset + 30 + len(info.filename) + 64)
               for info in z.infolist()]
    pickle_info = z.getinfo(PREFIX + "data.pkl")
    directory = [(z.start_dir, len(raw))]
  start = pickle_info.header_offset + 30 + len(pickle_info.filename)
  return {"headers": headers, "directory": directory,
          "pickle": [(start, start + pickle_info.compress_size + 64)], "anywhere": [(0, len(raw))]}


def _mutate(data: bytearray, rng, low: int, high: int, *, resize: bool) -> None:
  """Changes one byte in [low, high): flips a bit or sets a random value (or, with `resize`,
  inserts or deletes a byte)."""
  position = int(rng.integers(low, min(high, len(data))))
  how = rng.integers(4 if resize else 2)
  if how == 0:
    data[position] ^= 1 << int(rng.integers(8))
  elif how == 1:
    data[position] = int(rng.integers(256))
  elif how == 2:
    data.insert(position, int(rng.integers(256)))
  else:
    del data[position]


def _read_all(path: str) -> dict[str, tuple]:
  """Every tensor of the checkpoint as (dtype, shape, bytes), plus the epoch."""
  loaded = official.read_torch_checkpoint(path)
  summary = {}
  for name, tensor in _all_tensors(loaded):
    array = tensor.numpy()
    assert array.shape == tensor.shape and array.dtype == tensor.dtype, name
    summary[name] = (array.dtype, array.shape, array.tobytes())
  summary["epoch"] = loaded.get("epoch") if isinstance(loaded, dict) else loaded
  return summary


def _run_flips(seed: int, zip_flips: int, pickle_flips: int, workdir: str) -> dict[str, int]:
  """Zip flips: 1-3 bytes of the fixture changed; the read must give the original tensors
  exactly or a CheckpointError. Pickle flips: 1-4 bytes of a small data.pkl changed (inserted,
  deleted) and the zip rebuilt with valid CRCs; a consistent header may now describe other
  values, so the read must give readable tensors or a CheckpointError. Anything else (another
  exception, different weights, a crash) makes the exit code non-zero."""
  rng = np.random.default_rng(seed)
  outcomes: dict[str, int] = collections.Counter()
  path = os.path.join(workdir, "flipped.pkl")

  def attempt(what: str, data: bytes, expected: dict | None) -> None:
    if what.startswith("zip"):
      with open(path, "wb") as f:
        f.write(data)
    else:
      _write_zip(path, data, storages)
    try:
      got = _read_all(path)
    except CheckpointError as e:
      message = str(e)
      assert "\n" not in message and message.startswith(path), message
      outcomes[f"{what}: error"] += 1
      return
    if expected is not None and got != expected:
      print(f"{what} attempt: weights differ without an error", flush=True)
      sys.exit(1)
    outcomes[f"{what}: loaded"] += 1

  with open(FIXTURE, "rb") as f:
    original = f.read()
  expected = _read_all(FIXTURE)
  regions = _flip_regions(original)
  for index in range(zip_flips):
    data = bytearray(original)
    where = list(regions)[index % len(regions)]
    for _ in range(rng.integers(1, 4)):
      low, high = regions[where][rng.integers(len(regions[where]))]
      _mutate(data, rng, low, high, resize=False)
    attempt(f"zip {where}", bytes(data), expected)

  checkpoint, members = _load_fixture_zip()
  headers = list(checkpoint["net"].items())[:SMALL]
  storages = {h.key: members[f"{PREFIX}data/{h.key}"] for _, h in headers}
  small = _pickle({"net": ODict((name, _tensor(h)) for name, h in headers), "epoch": 1})
  for _ in range(pickle_flips):
    data = bytearray(small)
    for _ in range(rng.integers(1, 5)):
      _mutate(data, rng, 0, len(data), resize=True)
    attempt("pickle", bytes(data), None)
  return dict(outcomes)


def test_random_byte_flips_never_crash_or_corrupt(tmp_path):
  start = time.monotonic()
  result = subprocess.run([sys.executable, __file__, "flips", str(FLIP_SEED), str(ZIP_FLIPS),
                           str(PICKLE_FLIPS), str(tmp_path)],
                          capture_output=True, text=True, timeout=LAST_GUARD_S)
  assert result.returncode == 0, (f"rc {result.returncode}\n{result.stdout[-3000:]}\n"
                                  f"{result.stderr[-3000:]}")
  outcomes = json.loads(result.stdout.strip().splitlines()[-1])
  by_kind = collections.Counter()
  for key, count in outcomes.items():
    by_kind[key.split(":")[0].split()[0]] += count
  assert by_kind == {"zip": ZIP_FLIPS, "pickle": PICKLE_FLIPS}, outcomes
  # The flips do reach the checks, and the loop does see files that load.
  assert sum(v for k, v in outcomes.items() if k.endswith("error")) >= (ZIP_FLIPS
                                                                          + PICKLE_FLIPS) // 4
  assert outcomes.get("pickle: loaded", 0) > 0 and outcomes.get("pickle: error", 0) > 0
  print(f"byte flips: {outcomes} in {time.monotonic() - start:.1f} s")


if __name__ == "__main__":
  if sys.argv[1:2] == ["flips"]:
    seed, zip_flips, pickle_flips, workdir = sys.argv[2:]
    print(json.dumps(_run_flips(int(seed), int(zip_flips), int(pickle_flips), workdir)))
