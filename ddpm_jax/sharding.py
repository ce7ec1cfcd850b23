"""Data parallelism: one mesh axis over every device of every process.

Parameters and optimizer state are replicated; batches are split along their first axis.
Each process supplies its own slice of the global batch as host NumPy.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ddpm_jax.errors import UserError

DATA_AXIS = "data"


def make_mesh(devices=None):
    """A 1-D mesh named 'data' over the given devices (default: all devices, all hosts)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh):
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh):
    """Split the leading (batch) axis over the mesh; other axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def global_batch(host_batch, mesh):
    """This process's slice of a batch (a pytree of NumPy) -> sharded global jax.Arrays."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, a), host_batch)


def per_process_batch_size(global_batch_size):
    """The share of the global batch that this process reads."""
    count = jax.process_count()
    if global_batch_size % count:
        raise UserError(
            f"global batch size {global_batch_size} is not divisible by the number of "
            f"processes ({count}); set --config.training.batch_size to a multiple of {count}"
        )
    return global_batch_size // count
