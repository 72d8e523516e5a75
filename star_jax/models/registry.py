"""The registry of landmark networks: registry name -> flax module class.

A network module registers its class with `@register("<name>")`; `star_jax.models` looks names
up here (see its docstring for how a new network is added). One `star_jax.registry.Registry`.
"""

from __future__ import annotations

from typing import Callable

from star_jax.registry import Registry

MODELS: Registry[type] = Registry("model")


def register(name: str) -> Callable[[type], type]:
  """Class decorator: makes a network available as `config.model.name = name`."""
  def add(cls: type) -> type:
    MODELS.register(name, cls)
    cls.registry_name = name
    return cls
  return add


def lookup(name: str) -> type | None:
  return MODELS.lookup(name)


def names() -> list[str]:
  return MODELS.names()
