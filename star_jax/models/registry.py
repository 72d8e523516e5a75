"""The registry of landmark networks: registry name -> flax module class.

A network module registers its class with `@register("<name>")`; `star_jax.models` looks names
up here (see its docstring for how a new network is added).
"""

from __future__ import annotations

from typing import Callable

_REGISTRY: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
  """Class decorator: makes a network available as `config.model.name = name`."""
  def add(cls: type) -> type:
    if name in _REGISTRY and _REGISTRY[name] is not cls:
      raise ValueError(f"model name {name!r} is already registered to {_REGISTRY[name]}")
    _REGISTRY[name] = cls
    cls.registry_name = name
    return cls
  return add


def lookup(name: str) -> type | None:
  return _REGISTRY.get(name)


def names() -> list[str]:
  return sorted(_REGISTRY)
