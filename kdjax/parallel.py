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
"""

from typing import Optional, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kdjax.errors import KdjaxError

DATA_AXIS = 'data'


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A one-axis mesh (`'data'`) over `devices` (default: every device JAX sees)."""
  return Mesh(list(devices if devices is not None else jax.devices()), (DATA_AXIS,))


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


def put_replicated(tree, mesh: Mesh):
  return jax.device_put(tree, replicated(mesh))
