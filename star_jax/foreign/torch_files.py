"""Reading `torch.save` files as data, without PyTorch: a reader for hostile files.

This module owns the two torch.save formats and their validation; what the objects mean (a STAR
or HRNet state dict) is for the layout readers (`star_jax.foreign.star_layout`,
`star_jax.foreign.hrnet_layout`) and `star_jax.foreign.official`.

A zip file (torch >= 1.6) holds `<name>/data.pkl` (a pickle whose tensors point, by key, at raw
storages) and one `<name>/data/<key>` file of raw bytes per storage; a legacy file is five
pickles followed by the storages' bytes. A restricted unpickler resolves only the few globals a
state dict needs (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`, the typed storage
classes); any other global becomes an inert placeholder, so nothing in the file is executed.
Tensors stay lazy (`LazyTensor`: storage key, offset, shape, strides) until they are read.

The file is treated as hostile until proven otherwise, and every check runs before memory is
touched: the zip directory (no duplicate members, declared sizes within a fixed multiple of the
file's size), the pickle's opcodes (scanned without executing them: memo indices, nesting depth
and the cost of hashing each tuple are bounded, which keeps pickle bombs from exhausting memory,
the C stack or the CPU), every persistent id (a known storage class, a plain key naming a member
whose byte count matches the declared element count, one declaration per storage) and every
tensor header (integer offset, sizes and strides, non-negative, no overlapping elements, all
inside the storage). Whatever fails is a `CheckpointError` naming the file, the tensor (its path
in the checkpoint, e.g. 'net/hgs.0.conv1.conv.weight') and what is wrong. Unlike torch, layouts
whose elements overlap (zero strides of expanded views) are refused: no weight has them.
"""

from __future__ import annotations

import builtins
import collections
import dataclasses
import io
import lzma
import os
import pickle
import pickletools
import re
import reprlib
import struct
import zipfile
import zlib
from typing import Any

import ml_dtypes
import numpy as np

from star_jax.errors import CheckpointError

_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}

# Bounds that keep a hostile file from exhausting memory, the C stack or the CPU; real
# checkpoints stay orders of magnitude below them.
# torch.save stores members uncompressed (ratio 1); a re-zipped file of weights barely shrinks.
MAX_EXPANSION = 64
# Nesting depth of the unpickled objects: a state dict nests about 10 deep, while CPython hashes
# and frees nested tuples and slices recursively in C (a crash at a few 100,000 levels).
MAX_PICKLE_DEPTH = 200
# Objects a tuple holds, counted with repetition: the work of hashing it once. Shared references
# would otherwise let a few bytes build a tuple whose hash never finishes ("billion laughs").
MAX_TUPLE_WEIGHT = 1024
# Globals outside the allowlist each become a placeholder class.
MAX_UNKNOWN_GLOBALS = 1000
MAX_TENSOR_DIMS = 32  # numpy 1.x's limit; weights have at most 4
# torch.save numbers its storages "0", "1", ...; anything that is not a plain name is refused
# (it becomes part of an archive member name).
_STORAGE_KEY = re.compile(r"[0-9A-Za-z_]{1,64}")

# What zipfile and its decompressors raise on damaged or hostile archives.
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError,
               RuntimeError, NotImplementedError, struct.error, zlib.error, lzma.LZMAError,
               OverflowError)
# What the unpickler raises on malformed opcodes or arguments our callables reject.
_UNPICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
                    IndexError, KeyError, LookupError, OverflowError, struct.error)

_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = _SHORT.maxlong = 40
_SHORT.maxlevel = 3


def _short(value: Any) -> str:
  """A bounded, one-line repr of a value taken from the file (it may be huge or hostile)."""
  try:
    return _one_line(_SHORT.repr(value))
  except Exception:  # a placeholder or odd object whose repr fails: describe its type only
    return f"<{_type_name(value)}>"


def _one_line(text: str, limit: int = 200) -> str:
  text = " ".join(str(text).split())
  return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(value: Any) -> str:
  kind = value if isinstance(value, type) else type(value)
  return getattr(kind, "global_name", None) or kind.__name__


def _a_type(value: Any) -> str:
  """'an int', 'a str', 'an os.system' (a placeholder for the global the file named)."""
  name = _type_name(value)
  return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


# ---------------------------------------------------------------------------------------------
# Reading the torch.save zip format without torch.
# ---------------------------------------------------------------------------------------------


class _Immutable:
  """Refuses the pickle BUILD opcode, which would otherwise rewrite a checked object's fields
  (through `__setstate__`, or straight into its `__dict__`) after validation."""

  __slots__ = ()

  def __setstate__(self, state):
    raise pickle.UnpicklingError(f"data.pkl gives state to a {type(self).__name__}")


@dataclasses.dataclass(frozen=True, repr=False)
class _StorageType(_Immutable):
  name: str
  dtype: np.dtype

  def __repr__(self) -> str:
    return f"torch.{self.name}"


# The storage classes a persistent id may name: these exact objects, nothing built by the file.
_STORAGE_TYPES = {name: _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class _StorageRef(_Immutable):
  key: str
  dtype: np.dtype
  numel: int


@dataclasses.dataclass(frozen=True, eq=False)
class _Invalid(_Immutable):
  """A storage or tensor whose header failed validation: reported, with the tensor's path in the
  checkpoint, once the whole pickle is read (the pickle names a tensor only after building it)."""

  problem: str


@dataclasses.dataclass(frozen=True)
class LazyTensor(_Immutable):
  """A tensor of the checkpoint, read from its storage only when `numpy()` is called.

  Built only from validated headers; `numpy()` checks the layout again before reading, so a
  LazyTensor made by hand cannot read outside its storage either."""

  storage: _StorageRef
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]
  reader: "_ArchiveReader" = dataclasses.field(compare=False, repr=False)

  @property
  def dtype(self) -> np.dtype:
    return self.storage.dtype

  def numpy(self) -> np.ndarray:
    problem = _layout_problem(self.offset, self.shape, self.stride, self.storage.numel,
                              self.reader.max_dim)
    if problem:
      raise CheckpointError(f"{self.reader.path}: a tensor on storage data/{self.storage.key}: "
                            f"{problem}")
    flat = self.reader.storage_array(self.storage)
    if 0 in self.shape:
      return np.zeros(self.shape, flat.dtype)
    strides = tuple(s * flat.itemsize for s in self.stride)
    view = np.lib.stride_tricks.as_strided(flat[self.offset:], self.shape, strides,
                                           writeable=False)
    return np.array(view)


def _integer_problem(what: str, value: Any) -> str | None:
  if type(value) is not int:  # bool is an int subclass, and never a size
    return f"{what} {_short(value)} is {_a_type(value)}, not an integer"
  if value < 0:
    return f"{what} {value} is negative"
  return None


def _layout_problem(offset: Any, shape: Any, stride: Any, numel: int, max_dim: int
                    ) -> str | None:
  """What is wrong with a tensor header (storage offset, sizes, strides, in elements) on a
  storage of `numel` elements, or None. Pure arithmetic on Python ints: nothing is read."""
  problem = _integer_problem("storage offset", offset)
  if problem:
    return problem
  for what, values in (("sizes", shape), ("strides", stride)):
    if type(values) not in (tuple, list):
      return f"{what} {_short(values)} are {_a_type(values)}, not a tuple"
  if len(shape) != len(stride):
    return f"{len(shape)} sizes {_short(shape)} but {len(stride)} strides {_short(stride)}"
  if len(shape) > MAX_TENSOR_DIMS:
    return f"{len(shape)} dimensions, more than {MAX_TENSOR_DIMS}"
  for dim, (size, step) in enumerate(zip(shape, stride)):
    problem = (_integer_problem("size", size) or _integer_problem("stride", step))
    if problem:
      return f"{problem} (dimension {dim})"
    if size > max_dim:
      return f"size {size} (dimension {dim}) is larger than the file"
  extent = 0 if 0 in shape else 1 + sum((size - 1) * step for size, step in zip(shape, stride))
  if offset + extent > numel:
    return (f"shape {tuple(shape)} with strides {tuple(stride)} at offset {offset} reaches "
            f"element {offset + extent - 1}, past the end of its storage ({numel} elements)")
  span = 1  # elements covered by the dimensions already checked, smallest stride first
  for step, size in sorted((step, size) for size, step in zip(shape, stride) if size > 1):
    if step < span:
      return (f"strides {tuple(stride)} make elements of shape {tuple(shape)} overlap "
              "(expanded or self-overlapping views are not weights)")
    span += (size - 1) * step
  return None


class _Opaque:
  """Stand-in for any global the checkpoint names that a state dict does not need."""

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    del state

  def __call__(self, *args, **kwargs):
    return _Opaque()


class _OpaqueMeta(type):
  """Placeholder classes cannot be given attributes by the pickle (BUILD on a class)."""

  def __setattr__(cls, name, value):
    raise pickle.UnpicklingError(f"data.pkl sets {name!r} on a placeholder class")


class _ArchiveReader:
  """Owns the open zip archive and the decoded storages (shared between tensors)."""

  def __init__(self, path: str, archive: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo],
               prefix: str, byteorder: str, file_size: int):
    self.path = path
    self.archive = archive
    self.members = members
    self.prefix = prefix
    self.byteorder = byteorder
    # No dimension of a tensor (even an empty one) may exceed the file's size in bytes.
    self.max_dim = file_size
    self._cache: dict[str, np.ndarray] = {}

  legacy = False

  def member(self, key: str) -> str:
    return f"{self.prefix}data/{key}"

  def storage_problem(self, key: str, dtype: np.dtype, numel: int) -> str | None:
    """Checks a declared storage against the archive's directory, before anything is read."""
    member = self.member(key)
    info = self.members.get(member)
    if info is None:
      return f"storage {member} is missing from the archive (truncated or incomplete file)"
    expected = numel * dtype.itemsize
    if info.file_size != expected:
      return (f"storage {member} has {info.file_size} bytes, expected {expected} "
              f"({numel} x {dtype})")
    return None

  def storage_array(self, ref: _StorageRef) -> np.ndarray:
    if ref.key not in self._cache:
      member = self.member(ref.key)
      problem = (self.storage_problem(ref.key, ref.dtype, ref.numel)
                 if _STORAGE_KEY.fullmatch(ref.key) else f"storage key {ref.key!r} is invalid")
      if problem:
        raise CheckpointError(f"{self.path}: {problem}")
      try:
        raw = self.archive.read(member)
      except _ZIP_ERRORS as e:
        raise CheckpointError(f"{self.path}: storage {member} is corrupt "
                              f"({_one_line(e)})") from None
      self._cache[ref.key] = _decode_storage(self.path, member, raw, ref, self.byteorder)
    return self._cache[ref.key]


def _decode_storage(path: str, member: str, raw: bytes, ref: _StorageRef, byteorder: str
                    ) -> np.ndarray:
  """The elements of a storage from its raw bytes, checked against its declaration."""
  expected = ref.numel * ref.dtype.itemsize
  if len(raw) != expected:  # the directory said otherwise: a damaged or forged member
    raise CheckpointError(f"{path}: storage {member} has {len(raw)} bytes, expected "
                          f"{expected} ({ref.numel} x {ref.dtype})")
  dtype = ref.dtype.newbyteorder("<" if byteorder == "little" else ">")
  array = np.frombuffer(raw, dtype).astype(ref.dtype, copy=False)
  if ref.dtype == np.bool_ and np.any(np.frombuffer(raw, np.uint8) > 1):
    raise CheckpointError(f"{path}: storage {member} holds booleans other than 0 and 1")
  return array


class _LegacyReader:
  """The storages of a legacy (pre-1.6) torch.save file: after the pickles, per storage key
  (in the order the last pickle lists them) an 8-byte element count and the raw bytes.

  While the main pickle is read the records are not known yet (`records` is None): storages are
  checked against them once the whole file is walked, before anything is decoded."""

  legacy = True

  def __init__(self, path: str, data: bytes, byteorder: str):
    self.path = path
    self.data = data
    self.byteorder = byteorder
    self.max_dim = len(data)
    self.records: dict[str, tuple[int, int]] | None = None  # key -> (byte offset, numel)
    self._cache: dict[str, np.ndarray] = {}

  def member(self, key: str) -> str:
    return f"data/{key}"

  def storage_problem(self, key: str, dtype: np.dtype, numel: int) -> str | None:
    if self.records is None:
      return None
    record = self.records.get(key)
    if record is None:
      return f"storage {key} has no data in the file (truncated or incomplete file)"
    if record[1] != numel:
      return f"storage {key} holds {record[1]} elements, declared {numel} ({dtype})"
    return None

  def storage_array(self, ref: _StorageRef) -> np.ndarray:
    if ref.key not in self._cache:
      problem = (self.storage_problem(ref.key, ref.dtype, ref.numel) if self.records is not None
                 else "storages are read before the file was checked")
      if problem:
        raise CheckpointError(f"{self.path}: {problem}")
      offset, numel = self.records[ref.key]
      raw = self.data[offset:offset + numel * ref.dtype.itemsize]
      self._cache[ref.key] = _decode_storage(self.path, f"data/{ref.key}", raw, ref,
                                             self.byteorder)
    return self._cache[ref.key]


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles `data.pkl` resolving only what a state dict needs; executes nothing else.

  Malformed storages and tensors do not stop the load: they become `_Invalid` markers, which
  `read_torch_checkpoint` reports with the tensor's place in the checkpoint."""

  def __init__(self, file, reader: _ArchiveReader):
    super().__init__(file)
    self.reader = reader
    self.storages: dict[str, _StorageRef] = {}
    self._opaque_classes: dict[tuple[str, str], type] = {}

  def find_class(self, module: str, name: str):
    if module == "collections" and name in ("OrderedDict", "Counter"):
      return getattr(collections, name)
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return self._rebuild_tensor_v2
    if module == "torch._utils" and name == "_rebuild_tensor":
      return self._rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return self._rebuild_parameter
    if module == "torch._utils" and name == "_rebuild_parameter_with_state":
      return self._rebuild_parameter_with_state
    # Legacy files written from a GPU model name the CUDA storage classes; the bytes are the same.
    if module in ("torch", "torch.cuda") and name in _STORAGE_TYPES:
      return _STORAGE_TYPES[name]
    if module == "builtins" and name in ("set", "frozenset", "slice", "complex"):
      return getattr(builtins, name)
    return self._opaque_class(module, name)

  def _opaque_class(self, module: str, name: str) -> type:
    key = (module, name)
    if key not in self._opaque_classes:
      if len(self._opaque_classes) >= MAX_UNKNOWN_GLOBALS:
        raise CheckpointError(f"{self.reader.path}: data.pkl names more than "
                              f"{MAX_UNKNOWN_GLOBALS} unknown globals")
      global_name = _one_line(f"{module}.{name}", 100)
      self._opaque_classes[key] = _OpaqueMeta(f"Opaque[{global_name}]", (_Opaque,),
                                              {"global_name": global_name})
    return self._opaque_classes[key]

  def persistent_load(self, pid):
    if self.reader.legacy and type(pid) is tuple and len(pid) == 6 and pid[0] == "storage":
      # The legacy format adds view metadata: (view key, offset, size) of a storage that is a
      # slice of another one. torch never writes views for module weights.
      if pid[5] is not None:
        return _Invalid(f"storage {_short(pid[2])} is a view of another storage (legacy view "
                        "metadata), which weights never are")
      pid = pid[:5]
    if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
      return _Invalid(f"persistent id {_short(pid)} is not ('storage', type, key, location, "
                      "numel)")
    _, storage_type, key, location, numel = pid
    if not any(storage_type is known for known in _STORAGE_TYPES.values()):
      return _Invalid(f"storage type {_type_name(storage_type)} is not supported (known: "
                      f"{', '.join(_STORAGE_TYPES)})")
    if type(key) is not str or not _STORAGE_KEY.fullmatch(key):
      return _Invalid(f"storage key {_short(key)} is not a plain name")
    if type(location) is not str:
      return _Invalid(f"storage {key}: location {_short(location)} is not a string")
    problem = _integer_problem(f"storage {key}: element count", numel)
    if problem:
      return _Invalid(problem)
    ref = _StorageRef(key, storage_type.dtype, numel)
    known = self.storages.get(key)
    if known is not None:
      if known != ref:
        return _Invalid(f"storage {self.reader.member(key)} is declared as {known.numel} x "
                        f"{known.dtype} and as {numel} x {ref.dtype}")
      return known
    problem = self.reader.storage_problem(key, ref.dtype, numel)
    if problem:
      return _Invalid(problem)
    self.storages[key] = ref
    return ref

  def _rebuild_tensor_v2(self, *args):
    # (storage, offset, size, stride, requires_grad, backward_hooks[, metadata]): the last ones
    # do not matter for weights.
    if len(args) not in (6, 7):
      return _Invalid(f"_rebuild_tensor_v2 takes 6 or 7 arguments, got {len(args)}")
    return self._tensor(*args[:4])

  def _rebuild_tensor(self, *args):
    if len(args) != 4:
      return _Invalid(f"_rebuild_tensor takes 4 arguments, got {len(args)}")
    return self._tensor(*args)

  def _tensor(self, storage, offset, shape, stride):
    if isinstance(storage, _Invalid):
      return storage
    if type(storage) is not _StorageRef:
      return _Invalid(f"its storage is {_a_type(storage)}, not a storage")
    problem = _layout_problem(offset, shape, stride, storage.numel, self.reader.max_dim)
    if problem:
      return _Invalid(problem)
    return LazyTensor(storage, offset, tuple(shape), tuple(stride), self.reader)

  def _rebuild_parameter(self, *args):
    return self._parameter(args, 3)  # (data, requires_grad, backward_hooks)

  def _rebuild_parameter_with_state(self, *args):
    return self._parameter(args, 4)  # ... + state

  def _parameter(self, args: tuple, count: int) -> Any:
    if len(args) != count:
      return _Invalid(f"a parameter takes {count} arguments, got {len(args)}")
    data = args[0]
    if not isinstance(data, (LazyTensor, _Invalid)):
      return _Invalid(f"a parameter wraps {_a_type(data)}, not a tensor")
    return data


_TUPLE_OPCODES = frozenset({"TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"})
# Opcodes that add to the object below their arguments and leave it in place.
_IN_PLACE_OPCODES = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})
# How an opcode's argument is laid out: a fixed number of bytes, a length prefix of 1, 4
# (signed or not) or 8 bytes, or text up to a newline (parsed by pickletools' own reader).
_LENGTH_PREFIX = {pickletools.TAKEN_FROM_ARGUMENT1: (1, False),
                  pickletools.TAKEN_FROM_ARGUMENT4: (4, True),
                  pickletools.TAKEN_FROM_ARGUMENT4U: (4, False),
                  pickletools.TAKEN_FROM_ARGUMENT8U: (8, False)}
_LEAF, _PUT, _GET, _MARK, _DUP, _POP, _OTHER, _STOP = range(8)


def _opcode_table() -> list[tuple | None]:
  """Per opcode byte: (name, kind, argument layout, has a mark, items taken below the mark or
  from the top, items pushed)."""
  table: list[tuple | None] = [None] * 256
  for op in pickletools.opcodes:
    before, pushed = op.stack_before, len(op.stack_after)
    has_mark = pickletools.markobject in before
    fixed = before.index(pickletools.markobject) if has_mark else len(before)
    kind = {"PUT": _PUT, "BINPUT": _PUT, "LONG_BINPUT": _PUT, "MEMOIZE": _PUT,
            "GET": _GET, "BINGET": _GET, "LONG_BINGET": _GET, "MARK": _MARK, "DUP": _DUP,
            "POP": _POP, "STOP": _STOP}.get(op.name, _LEAF if not before and pushed == 1
                                                 else _OTHER)
    table[op.code.encode("latin-1")[0]] = (op.name, kind, op.arg, has_mark, fixed, pushed)
  return table


_OPCODES = _opcode_table()


def _scan_pickle(data: bytes) -> int:
  """Walks the pickle's opcodes without executing any, tracking for every stack item its
  nesting depth and (tuples) its hashing weight; raises ValueError naming the first opcode that
  is unknown, malformed, or would exceed the bounds above. Memo entries of mutable containers
  keep the depth they had when stored; deeper content added later sits behind a list or dict,
  which CPython frees without recursion and never hashes. Returns the position after STOP."""
  leaf = (0, 1)  # (depth, weight) of an object holding no other
  stack: list[tuple[int, int]] = []
  marks: list[int] = []
  memo: dict[int, tuple[int, int]] = {}
  text = io.BytesIO(data)  # for the protocol-0 arguments, parsed by pickletools
  pos, end, count = 0, len(data), 0
  while True:
    if pos >= end:
      raise ValueError("pickle exhausted before seeing STOP")
    entry = _OPCODES[data[pos]]
    if entry is None:
      raise ValueError(f"opcode {data[pos:pos + 1]!r} unknown at byte {pos}")
    name, kind, arg, has_mark, fixed, pushed = entry
    at, pos, count = pos, pos + 1, count + 1
    value = None
    if arg is not None:
      if arg.n >= 0:
        size = arg.n
        if kind in (_PUT, _GET):
          value = int.from_bytes(data[pos:pos + size], "little")
      elif arg.n in _LENGTH_PREFIX:
        width, signed = _LENGTH_PREFIX[arg.n]
        size = int.from_bytes(data[pos:pos + width], "little", signed=signed)
        if pos + width > end or size < 0:
          raise ValueError(f"{name} at byte {at} has a bad length")
        pos, size = pos + width, size
      else:
        text.seek(pos)
        value = arg.reader(text)
        size = text.tell() - pos
      if pos + size > end:
        raise ValueError(f"{name} at byte {at} expects {size} bytes, only {end - pos} remain")
      pos += size
    fence = marks[-1] if marks else 0
    if kind == _LEAF:
      stack.append(leaf)
    elif kind == _PUT:
      key = len(memo) if name == "MEMOIZE" else value
      # The pickler numbers memo entries 0, 1, 2, ...; a larger index only grows the
      # unpickler's memo table (by 16 bytes per index, before anything is stored).
      if not 0 <= key < count:
        raise ValueError(f"memo index {key} out of range at byte {at}")
      if len(stack) <= fence:
        raise ValueError(f"{name} on an empty stack at byte {at}")
      memo[key] = stack[-1]
    elif kind == _GET:
      if value not in memo:
        raise ValueError(f"memo index {value} is empty at byte {at}")
      stack.append(memo[value])
    elif kind == _MARK:
      marks.append(len(stack))
    elif kind == _DUP:
      if len(stack) <= fence:
        raise ValueError(f"DUP on an empty stack at byte {at}")
      stack.append(stack[-1])
    elif kind == _POP and marks and fence == len(stack):
      marks.pop()  # POP right after MARK discards the mark
    elif kind == _STOP:
      if len(stack) <= fence:
        raise ValueError(f"STOP on an empty stack at byte {at}")
      return pos
    else:
      items: list[tuple[int, int]] = []
      if has_mark:
        if not marks:
          raise ValueError(f"{name} without a MARK at byte {at}")
        items = stack[fence:]
        del stack[fence:]
        marks.pop()
        fence = marks[-1] if marks else 0
      if len(stack) - fence < fixed:
        raise ValueError(f"{name} with too few items on the stack at byte {at}")
      if fixed:
        items = stack[len(stack) - fixed:] + items
        del stack[len(stack) - fixed:]
      if not pushed:
        continue
      if name in _IN_PLACE_OPCODES:
        (depth, weight), added = items[0], items[1:]
        if added:
          depth = max(depth, 1 + max(d for d, _ in added))
      else:
        depth = 1 + max(d for d, _ in items) if items else 0
        weight = 1 + sum(w for _, w in items) if name in _TUPLE_OPCODES else 1
        if weight > MAX_TUPLE_WEIGHT:
          raise ValueError(f"a tuple holding more than {MAX_TUPLE_WEIGHT} objects (counted with "
                           f"repetition) at byte {at}: a pickle bomb")
      if depth > MAX_PICKLE_DEPTH:
        raise ValueError(f"objects nested more than {MAX_PICKLE_DEPTH} deep at byte {at}: a "
                         "pickle bomb")
      stack.extend([(depth, weight)] * pushed)


def _path_name(path: tuple) -> str:
  """'net/hgs.0.conv1.conv.weight' for the entry a marker was found at, quoted (repr: one line
  whatever the keys hold)."""
  parts = [part if type(part) is str else str(part) if type(part) is int else _short(part)
           for part in path]
  return repr(_one_line("/".join(parts), 160))


def _first_invalid(obj: Any) -> tuple[tuple, _Invalid] | None:
  """The first `_Invalid` marker reachable from `obj` (depth first, in file order) and the keys
  leading to it. Iterative, and each container is visited once (the pickle may share or cycle)."""
  todo: list[tuple[tuple, Any]] = [((), obj)]
  seen: set[int] = set()
  while todo:
    path, value = todo.pop()
    if isinstance(value, _Invalid):
      return path, value
    if not isinstance(value, (dict, list, tuple, set, frozenset)) or id(value) in seen:
      continue
    seen.add(id(value))
    if isinstance(value, dict):
      children = []
      for key, item in value.items():
        children += [(path + ("<key>",), key), (path + (key,), item)]
    elif isinstance(value, (list, tuple)):
      children = [(path + (i,), item) for i, item in enumerate(value)]
    else:
      children = [(path + ("<item>",), item) for item in value]
    todo.extend(reversed(children))
  return None


def read_torch_checkpoint(path: str) -> Any:
  """Reads a `torch.save` zip file into Python objects with `LazyTensor` leaves (no torch).

  Every storage and tensor header is validated here, before any storage is read; a problem
  raises `CheckpointError` with one line naming the file, the tensor and what is wrong."""
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file")
  try:
    file_size = os.path.getsize(path)
    archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile:
    with open(path, "rb") as f:
      head = f.read(4)
    if head[:1] == b"\x80":  # a pickle: the legacy (pre-1.6) format
      return _read_legacy(path)
    what = ("a zip archive truncated or damaged" if head.startswith(b"PK")
            else "neither a torch.save zip file (torch >= 1.6) nor a legacy torch.save file")
    raise CheckpointError(f"{path}: {what}") from None
  except _ZIP_ERRORS as e:
    raise CheckpointError(f"{path}: cannot read the zip archive ({_one_line(e)})") from None
  try:
    return _read_archive(path, archive, file_size)
  except BaseException:
    archive.close()  # the tensors keep it open only when the read succeeds
    raise


def _read_archive(path: str, archive: zipfile.ZipFile, file_size: int) -> Any:
  members: dict[str, zipfile.ZipInfo] = {}
  for info in archive.infolist():
    if info.filename in members:
      raise CheckpointError(f"{path}: the archive holds {_short(info.filename)} twice "
                            "(a damaged or tampered file)")
    members[info.filename] = info
  declared = sum(info.file_size for info in members.values())
  if declared > MAX_EXPANSION * max(file_size, 1):
    raise CheckpointError(f"{path}: the archive's members claim {declared} bytes, more than "
                          f"{MAX_EXPANSION} times the file's {file_size} (a zip bomb?)")
  pickles = [n for n in members if n.endswith("/data.pkl") and n.count("/") == 1]
  if not pickles:
    raise CheckpointError(f"{path}: zip archive without <name>/data.pkl: not a torch.save file")
  if len(pickles) > 1:
    raise CheckpointError(f"{path}: zip archive with {len(pickles)} data.pkl files "
                          f"({', '.join(_short(n) for n in pickles[:3])}); torch.save writes one")
  pickle_name = pickles[0]
  prefix = pickle_name[: -len("data.pkl")]

  def read_member(name: str) -> bytes:
    try:
      return archive.read(name)
    except _ZIP_ERRORS as e:
      raise CheckpointError(f"{path}: {name} is corrupt ({_one_line(e)})") from None

  byteorder = "little"  # what torch assumes for files written before it recorded the order
  if prefix + "byteorder" in members:
    size = members[prefix + "byteorder"].file_size
    if size > 16:
      raise CheckpointError(f"{path}: {prefix}byteorder holds {size} bytes, expected 'little' "
                            "or 'big'")
    byteorder = read_member(prefix + "byteorder").decode("ascii", "replace").strip()
    if byteorder not in ("little", "big"):
      raise CheckpointError(f"{path}: {prefix}byteorder is {byteorder!r}, expected 'little' or "
                            "'big'")
  data = read_member(pickle_name)
  try:
    _scan_pickle(data)
  except ValueError as e:
    raise CheckpointError(f"{path}: {pickle_name} is corrupt ({_one_line(e)})") from None

  reader = _ArchiveReader(path, archive, members, prefix, byteorder, file_size)
  unpickler = _RestrictedUnpickler(io.BytesIO(data), reader)
  obj = _load_checked(path, pickle_name, unpickler.load)
  _raise_first_invalid(path, obj)
  return obj


def _load_checked(path: str, pickle_name: str, load) -> Any:
  """`load()` with the unpickler's failures as one-line `CheckpointError`s."""
  try:
    return load()
  except CheckpointError:
    raise
  except RecursionError:
    raise CheckpointError(f"{path}: {pickle_name} nests objects too deeply") from None
  except _UNPICKLE_ERRORS as e:
    raise CheckpointError(f"{path}: {pickle_name} is corrupt "
                          f"({type(e).__name__}: {_one_line(e)})") from None


def _raise_first_invalid(path: str, obj: Any) -> None:
  invalid = _first_invalid(obj)
  if invalid is not None:
    where, marker = invalid
    raise CheckpointError(f"{path}: tensor {_path_name(where)}: {marker.problem}")


# The legacy format's first two pickles (torch/serialization.py, before 1.6).
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
# Storages a legacy file may hold; the key list is a pickle of at most this many names.
MAX_LEGACY_STORAGES = 1 << 16


class _PlainUnpickler(pickle.Unpickler):
  """For the legacy header pickles and the key list: numbers, strings, dicts, lists only."""

  def find_class(self, module: str, name: str):
    raise pickle.UnpicklingError(f"names the global {_one_line(f'{module}.{name}', 100)}")

  def persistent_load(self, pid):
    raise pickle.UnpicklingError("holds a persistent id")


def _read_legacy(path: str) -> Any:
  """Reads a legacy (pre-1.6, non-zip) torch.save file: five pickles (magic number, protocol
  version, system info, the object, its storage keys), then the storages' bytes."""
  with open(path, "rb") as f:
    data = f.read()
  pos = 0

  def next_pickle(what: str, load_with=None) -> Any:
    nonlocal pos
    try:
      end = pos + _scan_pickle(data[pos:])
    except ValueError as e:
      raise CheckpointError(f"{path}: the legacy {what} pickle at byte {pos} is corrupt "
                            f"({_one_line(e)})") from None
    stream = io.BytesIO(data[pos:end])
    unpickler = (load_with or _PlainUnpickler)(stream)
    obj = _load_checked(path, f"the legacy {what} pickle", unpickler.load)
    pos = end
    return obj

  magic = next_pickle("magic-number")
  if type(magic) is not int or magic != LEGACY_MAGIC_NUMBER:
    raise CheckpointError(f"{path}: starts with a pickle but not torch's magic number: not a "
                          "torch.save file")
  version = next_pickle("protocol-version")
  if type(version) is not int or version != LEGACY_PROTOCOL_VERSION:
    raise CheckpointError(f"{path}: legacy protocol version {_short(version)}, expected "
                          f"{LEGACY_PROTOCOL_VERSION}")
  info = next_pickle("system-info")
  if not (type(info) is dict and type(info.get("little_endian")) is bool):
    raise CheckpointError(f"{path}: the legacy system info {_short(info)} lacks little_endian")
  reader = _LegacyReader(path, data, "little" if info["little_endian"] else "big")
  unpicklers: list[_RestrictedUnpickler] = []  # kept to read its declared storages afterwards
  obj = next_pickle("object", lambda stream: unpicklers.append(
      _RestrictedUnpickler(stream, reader)) or unpicklers[-1])
  keys = next_pickle("storage-key")
  if (type(keys) is not list or len(keys) > MAX_LEGACY_STORAGES
      or not all(type(k) is str and _STORAGE_KEY.fullmatch(k) for k in keys)
      or len(set(keys)) != len(keys)):
    raise CheckpointError(f"{path}: the legacy storage keys {_short(keys)} are not a list of "
                          "distinct plain names")
  declared = unpicklers[0].storages
  records = {}
  for key in keys:
    ref = declared.get(key)
    if ref is None:
      raise CheckpointError(f"{path}: storage {key} has data but no tensor declares it")
    if pos + 8 > len(data):
      raise CheckpointError(f"{path}: the file ends before storage {key} (truncated)")
    numel = int.from_bytes(data[pos:pos + 8], reader.byteorder, signed=True)
    size = numel * ref.dtype.itemsize
    if numel != ref.numel:
      raise CheckpointError(f"{path}: storage {key} holds {numel} elements, declared "
                            f"{ref.numel} ({ref.dtype})")
    if pos + 8 + size > len(data):
      raise CheckpointError(f"{path}: storage {key} needs {size} bytes, the file has "
                            f"{len(data) - pos - 8} left (truncated)")
    records[key] = (pos + 8, numel)
    pos += 8 + size
  reader.records = records
  for key, ref in declared.items():
    problem = reader.storage_problem(key, ref.dtype, ref.numel)
    if problem:
      raise CheckpointError(f"{path}: {problem}")
  _raise_first_invalid(path, obj)
  return obj
