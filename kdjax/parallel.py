"""Data parallelism over every device: one `Mesh` with a `data` axis, batches sharded on it.

kdjax's train and eval steps are `jax.jit` programs written for the *global* batch. Their inputs
carry `NamedSharding`s: batch rows are split over the `data` axis, while parameters, optimiser
state, batch-norm statistics and the device-resident dataset are replicated. XLA's SPMD
partitioner then runs each device on its B/D rows and inserts the all-reduces that the global
program implies: the gradient mean, the batch mean and variance inside BatchNorm (so batch
statistics are synchronised over the whole batch, not per device), and the metrics' means.
D-way training therefore computes the same function as one device, up to the order of float sums
(`tests/parallel_test.py` checks this on 8 simulated CPU devices).

This is the mechanism `jax.pmap` itself is now built on, and the one JAX recommends for new code
("Distributed arrays and automatic parallelization"); the same step runs unchanged on 1 CPU,
8 GPUs, or a TPU slice, where `jax.devices()` lists every chip of every host.

Several processes (JAX's multi-controller runtime, `jax.distributed.initialize`): the mesh spans
every process's devices and every process runs the same program. Host data enters as global
arrays built from each process's own part (`global_batch`: a process passes only its devices'
rows of a batch; `put_replicated`: from the process's own copy, with no cross-process equality
check), never with `device_put` of a host array onto devices of other processes.
"""

from typing import Optional, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from kdjax.errors import KdjaxError

DATA_AXIS = 'data'


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A one-axis mesh (`'data'`) over `devices` (default: every device of every process).

  Ordered by process, so that each process's devices hold one contiguous block of a batch's rows
  (what `global_batch` passes for it).
  """
  devices = list(devices if devices is not None else jax.devices())
  return Mesh(sorted(devices, key=lambda d: (d.process_index, d.id)), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (parameters, optimiser state, the dataset)."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh, axis: int = 0) -> NamedSharding:
  """The batch axis (`axis`, default the leading one) split over the `data` axis; others whole."""
  return NamedSharding(mesh, PartitionSpec(*([None] * axis), DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, setting: str = 'batch_size') -> None:
  """Raises unless the global `batch_size` splits evenly over the mesh's devices."""
  devices = mesh.devices.size
  if batch_size % devices:
    raise KdjaxError(
        f'{setting} {batch_size} does not split evenly over the {devices} devices of the '
        f'data-parallel mesh; use a multiple of {devices} (the global batch is divided into '
        f'{devices} equal shards).')


def is_primary() -> bool:
  """Whether this is process 0, the one that writes a run's files."""
  return jax.process_index() == 0


def put_replicated(tree, mesh: Mesh):
  """Every leaf whole on every device of `mesh`.

  A host value (or a process-local array) is copied from this process's own copy to its own
  devices (`make_array_from_callback`): every process must hold the same value, which kdjax's
  callers guarantee (the same data, seeds and programs everywhere), and no cross-process
  equality check is paid. A global array is resharded by a jitted identity.
  """
  sharding = replicated(mesh)

  def put(leaf):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      return jax.jit(lambda x: x, out_shardings=sharding)(leaf)
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree_util.tree_map(put, tree)


def global_batch(rows, mesh: Mesh) -> jax.Array:
  """`rows` (`[B, ...]`, the same on every process) as a global array split over the `data` axis.

  Each process passes only the rows its own devices hold
  (`jax.make_array_from_process_local_data`), so no process puts the whole batch on device.
  """
  rows = np.asarray(rows)
  return global_rows(process_rows(rows, mesh), mesh, rows.shape[0])


def process_rows(rows, mesh: Mesh):
  """The part of a global batch `rows` (`[B, ...]`) that this process's devices hold."""
  if jax.process_count() == 1:
    return rows
  shape = np.shape(rows)
  spans = [index[0].indices(shape[0])[:2]
           for index in batch_sharded(mesh).addressable_devices_indices_map(shape).values()]
  return rows[min(start for start, _ in spans):max(stop for _, stop in spans)]


def global_rows(local, mesh: Mesh, batch_size: int, axis: int = 0) -> jax.Array:
  """This process's rows `local` of a global batch of `batch_size` rows on `axis` (0, or 1 for
  per-replica `[R, B, ...]` rows), as the global array split over the `data` axis (the other
  processes pass theirs)."""
  local = np.asarray(local)
  shape = list(local.shape)
  shape[axis] = batch_size
  return jax.make_array_from_process_local_data(batch_sharded(mesh, axis=axis), local,
                                                tuple(shape))


def to_host(x: jax.Array) -> np.ndarray:
  """A global array's values on the host of every process (each holds only its rows of a batch
  split over the mesh: with several processes they are gathered)."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def sync_processes(name: str) -> None:
  """Waits until every process reaches this point (nothing to wait for with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
