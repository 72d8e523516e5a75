"""The only place star-jax touches JAX internals, each with a fallback for releases without it.

- `backends_initialised`: whether XLA has already read XLA_FLAGS (so that flags set later would
  be ignored); public JAX has no such query.
- `wait_at_barrier`: a barrier through the `jax.distributed` coordination service, which needs
  the service's client (not exposed publicly). Processes meet there before their first device
  collective, because the CPU (gloo) collectives give up when processes arrive more than ~30 s
  apart (one process compiling slower than another).
"""

from __future__ import annotations

import logging
import sys

_log = logging.getLogger(__name__)


def backends_initialised() -> bool:
  """Whether JAX's backends have started in this process (True when it cannot tell)."""
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge
  except ImportError:
    return True  # unknown internals: assume too late rather than set flags that may not apply
  return bool(getattr(xla_bridge, "_backends", True))


def wait_at_barrier(name: str, timeout_s: float) -> bool:
  """Waits for every process at barrier `name`; False when this JAX offers no such barrier."""
  try:
    from jax._src import distributed
    client = distributed.global_state.client
  except (ImportError, AttributeError):
    client = None
  if client is None:
    _log.debug("no coordination-service barrier available; %s skipped", name)
    return False
  client.wait_at_barrier(f"star_jax_{name}", int(timeout_s * 1000))
  return True
