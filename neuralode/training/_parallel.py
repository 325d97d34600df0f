"""Data parallelism through JAX's own SPMD: the minibatch is sharded along a 1-D mesh of
devices, the training state (parameters, optimiser state, key) is replicated on every
device, and XLA partitions the jitted step, inserting the all-reduce that sums the
gradient over the devices. Nothing here communicates by hand.

Across processes (`jax.distributed.initialize`, one process per host), the mesh takes
the same number of devices from every process. The batch is drawn inside the step from
the replicated key, so every device computes only its own rows of it and the global
batch, and therefore the loss curve, does not depend on the number of devices.
"""

from typing import Any, Literal

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree

from .._checks import as_int

BATCH_AXIS = "batch"

# The batch axis of every leaf of a batch (a prefix tree, as `jax.vmap`'s `in_axes`):
# an int, or None for a leaf every device needs whole.
BatchAxes = Any


def data_parallel_mesh(devices: int | Literal["all"] = 1) -> Mesh:
    """A 1-D mesh (axis `"batch"`) of `devices` devices of every process: `"all"` for
    all of each process's local devices, or a number of them.

    **Raises:**

    `ValueError` if a process has fewer than `devices` devices.
    """
    available = jax.local_device_count()
    if devices == "all":
        count = available
    else:
        count = as_int("fit", "devices", devices)
        if count > available:
            platform = jax.local_devices()[0].platform
            hint = (
                " On a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N, set "
                "before JAX is imported, makes N devices."
                if platform == "cpu"
                else ""
            )
            raise ValueError(
                f"fit: `devices` is {count}, but this process has only {available} "
                f"{platform} device(s): pass `devices='all'` or at most {available}."
                f"{hint}"
            )
    chosen = [
        device
        for process in range(jax.process_count())
        for device in jax.local_devices(process_index=process)[:count]
    ]
    return Mesh(np.array(chosen), (BATCH_AXIS,))


def batch_shardings(batch: PyTree, batch_axes: BatchAxes, mesh: Mesh) -> PyTree:
    """The `NamedSharding` of every leaf of `batch` (arrays or `jax.ShapeDtypeStruct`s):
    split along its batch axis over the mesh, or replicated where the axis is None.

    **Raises:**

    `ValueError` if a batch axis does not exist or its size is not divisible by the
    number of devices.
    """

    def sharding(axis: int | None, leaf: Any) -> NamedSharding:
        shape = np.shape(leaf)
        if axis is None:
            return replicated(mesh)
        if not 0 <= axis < len(shape):
            raise ValueError(
                f"fit: `batch_axes` gives axis {axis} for a batch array of shape "
                f"{shape}, which has no such axis."
            )
        if shape[axis] % mesh.size:
            raise ValueError(
                f"fit: the batch (axis {axis} of an array of shape {shape}) has "
                f"{shape[axis]} rows, which {mesh.size} devices cannot share equally. "
                f"Use a batch size divisible by {mesh.size}, or fewer devices."
            )
        return NamedSharding(mesh, PartitionSpec(*[None] * axis, BATCH_AXIS))

    # Each leaf of `batch_axes` stands for the whole subtree of `batch` at its place.
    axes = jax.tree.broadcast(batch_axes, batch, is_leaf=lambda x: x is None)
    return jax.tree.map(lambda leaf, axis: sharding(axis, leaf), batch, axes)


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of the training state: a whole copy on every device of `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """`tree` copied to every device of `mesh`, as global arrays. Across processes,
    every process must pass the same values (JAX checks it)."""
    return jax.device_put(tree, replicated(mesh))


def local_copy(tree: PyTree) -> PyTree:
    """This process's own copy of a replicated `tree`: its arrays on one local device,
    usable in computations of this process alone (evaluation, saving)."""
    return jax.tree_util.tree_map(lambda x: x.addressable_shards[0].data, tree)


def is_writer() -> bool:
    """Whether this process writes the run's files: process 0, or the only one."""
    return jax.process_index() == 0


def device_counts(mesh: Mesh) -> dict[str, int]:
    """What `metrics.json` records of the run's devices."""
    return {"devices": mesh.size, "processes": jax.process_count()}
