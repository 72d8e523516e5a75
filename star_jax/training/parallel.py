"""Data parallelism: the device mapping of the per-device step, host<->device helpers, multi-host.

The training step is written per device and names its batch axis `AXIS_NAME`; collectives
(`lax.pmean` of gradients, synchronised BatchNorm statistics) refer to that name.
`map_over_devices` is the single place that turns such a function into a multi-device one. It
uses `jax.pmap` today; JAX keeps pmap in maintenance mode (implemented on top of `shard_map`),
so a move to `shard_map`/`jit` only has to touch this function and the sharding helpers below.

With several processes (`jax.distributed`), each process feeds its own local devices and the
collectives span every device of every process.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from star_jax.core import jax_compat
from star_jax.errors import UsageError

AXIS_NAME = "batch"

PyTree = Any


def map_over_devices(fn: Callable[..., Any], *, donate_argnums: Sequence[int] = ()
                     ) -> Callable[..., Any]:
  """Runs the per-device `fn` on every local device, with `AXIS_NAME` naming the device axis.

  Every argument and result carries a leading axis of size `jax.local_device_count()`.
  `donate_argnums` lets XLA reuse those input buffers for the outputs (the train state).
  """
  return jax.pmap(fn, axis_name=AXIS_NAME, donate_argnums=tuple(donate_argnums))


def per_device_batch_size(global_batch_size: int, *, process_count: int | None = None,
                          local_device_count: int | None = None) -> int:
  """Examples per device for a fixed global batch; raises if it does not divide evenly."""
  process_count = jax.process_count() if process_count is None else process_count
  local_device_count = (jax.local_device_count() if local_device_count is None
                        else local_device_count)
  devices = process_count * local_device_count
  if global_batch_size % devices:
    raise UsageError(
        f"config.batch_size={global_batch_size} must be divisible by the number of devices "
        f"({process_count} process(es) x {local_device_count} local device(s) = {devices}); "
        "the global batch stays fixed whatever the device count")
  return global_batch_size // devices


def shard(batch: PyTree, num_devices: int | None = None) -> PyTree:
  """Splits the leading axis of every host array into `(num_devices, b // num_devices, ...)`."""
  num_devices = jax.local_device_count() if num_devices is None else num_devices

  def split(x):
    x = np.asarray(x)
    if x.shape[0] % num_devices:
      raise ValueError(f"a batch of {x.shape[0]} cannot be split over {num_devices} devices")
    return x.reshape((num_devices, x.shape[0] // num_devices) + x.shape[1:])

  return jax.tree.map(split, batch)


def unshard(tree: PyTree) -> PyTree:
  """Inverse of `shard` for per-device results: host numpy arrays with the device axis merged.

  Only this process's devices are read, so it also works when the arrays span several processes.
  """
  def merge(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      parts = [np.asarray(s.data) for s in sorted(x.addressable_shards,
                                                  key=lambda s: s.index[0].start or 0)]
      x = np.concatenate(parts, axis=0)
    x = np.asarray(x)
    return x.reshape((-1,) + x.shape[2:])

  return jax.tree.map(merge, tree)


def replicate(tree: PyTree) -> PyTree:
  """Copies a host pytree onto every local device (leading axis = local device count).

  Each device receives its own copy directly, so the host never holds `devices` copies.
  """
  devices = jax.local_devices()
  sharding = NamedSharding(Mesh(np.array(devices), (AXIS_NAME,)), PartitionSpec(AXIS_NAME))

  def put(x):
    x = np.asarray(x)[None]
    return jax.make_array_from_single_device_arrays(
        (len(devices),) + x.shape[1:], sharding, [jax.device_put(x, d) for d in devices])

  return jax.tree.map(put, tree)


def unreplicate(tree: PyTree) -> PyTree:
  """Host numpy copy of a replicated pytree (the first local device's copy)."""
  def first(x):
    if isinstance(x, jax.Array):
      return np.asarray(x.addressable_data(0))[0]
    return np.asarray(x)[0]

  return jax.tree.map(first, tree)


def initialize_distributed(config) -> None:
  """`jax.distributed.initialize` for a multi-process run (`config.distributed=True`).

  Where each process's place comes from:
    - `config.coordinator_address` ('host:port' of process 0), `config.num_processes` and
      `config.process_id` when set (> 0 processes, >= 0 id);
    - otherwise JAX's own detection: the JAX_COORDINATOR_ADDRESS environment variable, and
      SLURM, Open MPI or TPU environments for the process count and id.
  On CPUs the cross-process collectives use gloo. Called by train.py before any other JAX
  call touches the devices; a missing setting is a one-line usage error.
  """
  if not bool(config.get("distributed", False)):
    return
  address = str(config.get("coordinator_address", "") or "") or None
  count = int(config.get("num_processes", -1))
  index = int(config.get("process_id", -1))
  kwargs = {"coordinator_address": address,
            "num_processes": count if count > 0 else None,
            "process_id": index if index >= 0 else None}
  if kwargs["num_processes"] is not None and kwargs["process_id"] is not None and not (
      kwargs["process_id"] < kwargs["num_processes"]):
    raise UsageError(f"config.process_id={index} must be below config.num_processes={count}")
  if jax.config.jax_platforms in (None, "", "cpu") and not _has_accelerator_plugin():
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, TypeError) as e:
    raise UsageError(
        f"config.distributed=True: {e} Set --config.coordinator_address=HOST:PORT "
        "--config.num_processes=N --config.process_id=I (or JAX_COORDINATOR_ADDRESS and a "
        "SLURM/Open MPI launch); see the README, 'Several processes'") from None
  logging.info("jax.distributed initialised: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def _has_accelerator_plugin() -> bool:
  """Whether a GPU/TPU JAX plugin is installed (then its own collectives are used)."""
  import importlib.util
  return any(importlib.util.find_spec(name) is not None
             for name in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu"))


def sync_processes(name: str, timeout_s: float = 3600.0) -> None:
  """Waits until every process reaches this point (no-op with one process); see
  `star_jax.core.jax_compat.wait_at_barrier` for why processes meet before their first
  collective."""
  if jax.process_count() == 1:
    return
  jax_compat.wait_at_barrier(name, timeout_s)


def describe_devices() -> str:
  """One line naming the backend, devices and processes (printed at the start of training)."""
  devices = jax.local_devices()
  kinds = sorted({d.device_kind for d in devices})
  return (f"backend={jax.default_backend()} process={jax.process_index()}/{jax.process_count()} "
          f"local_devices={len(devices)} global_devices={jax.device_count()} "
          f"kind={','.join(kinds)}")
