"""Device mesh, shardings and multi-process set-up.

One code path for one CPU, eight fake CPU devices, a GPU node and a multi-host pod: a 1-D
`Mesh` over all (global) devices with axis "data"; batches are split along their leading axis,
parameters and optimiser state are replicated.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed(dist_config) -> None:
  """Calls `jax.distributed.initialize` when the config (or JAX's env vars) asks for it.

  `dist_config` fields: coordinator_address ('' = single process), num_processes, process_id.
  On CPU the collectives go through gloo.
  """
  addr = dist_config.get("coordinator_address", "") if dist_config else ""
  if not addr:
    return
  if jax.distributed.is_initialized():
    return
  # Only affects the CPU backend (cross-process CPU collectives); must be set before JAX
  # initialises any backend, so the backend cannot be queried here.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=addr,
                             num_processes=int(dist_config.num_processes),
                             process_id=int(dist_config.process_id))


def make_mesh(devices=None) -> Mesh:
  """A 1-D data-parallel mesh over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.array(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def local_batch_slice(global_batch: int, mesh: Mesh) -> slice:
  """Which examples of the global batch this process feeds (its devices' contiguous share)."""
  n_proc = jax.process_count()
  if n_proc == 1:
    return slice(0, global_batch)
  per = global_batch // n_proc
  pid = jax.process_index()
  return slice(pid * per, (pid + 1) * per)


def global_batch(local: dict, mesh: Mesh) -> dict:
  """Assembles process-local numpy arrays into global jax Arrays sharded along the batch."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
