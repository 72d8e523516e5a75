"""One way to make a thing available by name: models, loss terms, detectors, export formats
and data sources each keep one `Registry`.

A registry maps a name to an entry (a class, a function or a small record). Adding a kind of
thing is one module that calls `REGISTRY.register("<name>")` on it; a registry given a
`lazy_package` imports `<lazy_package>.<name>` the first time an unknown name is asked for, so a
user's own module is found without being imported by hand.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, TypeVar

from star_jax.errors import UsageError

T = TypeVar("T")


class Registry(Generic[T]):
  """Name -> entry, for one kind of thing (`kind` names it in error messages)."""

  def __init__(self, kind: str, *, lazy_package: str | None = None) -> None:
    self.kind = kind
    self.lazy_package = lazy_package
    self._entries: dict[str, T] = {}

  def register(self, name: str, entry: T | None = None) -> Callable[[T], T] | T:
    """`@registry.register("name")` as a decorator, or `registry.register("name", entry)`.

    Registering a second, different entry under a name already taken is an error; registering
    the same entry again (a module imported twice) is not.
    """
    def add(value: T) -> T:
      if name in self._entries and self._entries[name] is not value:
        raise ValueError(f"{self.kind} name {name!r} is already registered to "
                         f"{self._entries[name]!r}")
      self._entries[name] = value
      return value
    return add if entry is None else add(entry)

  def _import_lazily(self, name: str) -> None:
    if name in self._entries or self.lazy_package is None or not name.isidentifier():
      return
    try:
      importlib.import_module(f"{self.lazy_package}.{name}")
    except ModuleNotFoundError as error:
      # Only a missing module of that very name means "no such entry"; a module that exists
      # but fails on one of its own imports is the user's bug and must surface as such.
      if error.name != f"{self.lazy_package}.{name}":
        raise

  def lookup(self, name: str) -> T | None:
    """The entry for `name`, or None (after trying the lazy import)."""
    self._import_lazily(name)
    return self._entries.get(name)

  def get(self, name: str, *, what: str | None = None) -> T:
    """The entry for `name`; a UsageError listing the known names when there is none."""
    entry = self.lookup(name)
    if entry is None:
      where = f"{what}={name!r}" if what else f"{self.kind} {name!r}"
      known = ", ".join(self.names()) or "none registered"
      raise UsageError(f"{where}: unknown {self.kind}; use one of {known}")
    return entry

  def names(self) -> list[str]:
    return sorted(self._entries)

  def items(self) -> Iterator[tuple[str, T]]:
    return iter(sorted(self._entries.items()))

  def __getitem__(self, name: str) -> T:
    """`registry[name]`: as `get` (a UsageError listing the known names when there is none)."""
    return self.get(name)

  def __contains__(self, name: object) -> bool:
    return isinstance(name, str) and self.lookup(name) is not None
