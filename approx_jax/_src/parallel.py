"""Helpers for data-parallel training with approximate multipliers.

Data parallelism in JAX needs no special training code: put the batch on a
mesh sharded along its leading axis, replicate the parameters, and call the
ordinary ``jax.jit``-compiled train step. XLA partitions the step; the
approx_jax custom calls carry partitioning rules
(``approx_jax._src.partitioning``) so every device multiplies only its own
rows of the batch, and the weight gradient (a product contracting over the
batch) becomes a per-device partial product plus one all-reduce, exactly the
data-parallel gradient all-reduce. Activations are never all-gathered.

Typical use::

    mesh = data_parallel_mesh()
    params, opt_state = replicate((params, opt_state), mesh)
    for x, y in batches:
        x, y = shard_batch((x, y), mesh)
        params, opt_state, loss = train_step(params, opt_state, x, y, mult)

The same code runs on one host with several devices (or with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` on a CPU) and on
several hosts after ``jax.distributed.initialize()``: the mesh spans
``jax.devices()`` (all processes' devices), and :func:`shard_batch` takes
each process's *local* part of the global batch.

Why Auto mesh axes: ``jax.make_mesh`` defaults to Explicit axes in jax 0.10,
under which every array type carries its sharding and operations that cannot
infer an output sharding (for example a reshape merging a sharded batch axis
with another axis, as in flattening conv features) raise a
``ShardingTypeError`` unless the caller annotates them. With Auto axes the
partitioner propagates the batch sharding through unchanged model code. The
approx_jax ops work with both kinds, so pass ``axis_type=AxisType.Explicit``
if your model is written for explicit sharding.

Numerics: every simulated product and every sum a kernel computes is
bit-identical to a single-device run (each output row is produced by one
kernel call over the full contraction). Weight gradients sum per-device
partial sums, so they differ from a single-device run by float32 rounding
only; batch-mean losses likewise. The model's native ops are XLA's: a
partitioned program may compile them differently (measured: softmax and
normalisations inside attention layers a few ulps apart in some elements of
the input gradient), and a simulated multiplier then carries such
differences on. LeNet-style models' forward passes and input gradients have
matched bit for bit.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def data_parallel_mesh(
    num_devices: int | None = None,
    axis_name: str = "data",
    axis_type: AxisType = AxisType.Auto,
) -> Mesh:
    """Returns a 1-D device mesh for data-parallel training.

    Args:
      num_devices: Number of devices to use; ``None`` uses all of
        ``jax.devices()`` (every device of every process in a multi-host
        run). In a multi-host run it must be ``None`` or the global device
        count, since every process must take part.
      axis_name: Name of the mesh axis the batch is split over.
      axis_type: ``AxisType.Auto`` (default: the partitioner propagates the
        batch sharding through unchanged model code; see the module
        docstring) or ``AxisType.Explicit`` (every array type carries its
        sharding).

    Returns:
      A ``jax.sharding.Mesh`` of shape ``(num_devices,)`` with axis
      ``axis_name``.

    Raises:
      TypeError: If ``num_devices`` is neither ``None`` nor an int.
      ValueError: If ``num_devices`` is not in ``[1, len(jax.devices())]``,
        or is a strict subset of the devices in a multi-host run, or
        ``axis_type`` is neither Auto nor Explicit.
    """
    if axis_type not in (AxisType.Auto, AxisType.Explicit):
        # A Manual mesh is shard_map's inside view, not one to place data on.
        raise ValueError(f"axis_type must be AxisType.Auto or AxisType.Explicit, got {axis_type}")
    # int() would silently truncate 2.7 to 2 devices; bool is an int subclass
    # but True/False as a device count is a caller bug.
    if num_devices is not None and (
        isinstance(num_devices, bool) or not isinstance(num_devices, int | np.integer)
    ):
        raise TypeError(
            f"num_devices must be an int or None, got {type(num_devices).__name__} {num_devices!r}"
        )
    devices = jax.devices()
    n = len(devices) if num_devices is None else int(num_devices)
    if not 1 <= n <= len(devices):
        raise ValueError(
            f"num_devices must be between 1 and {len(devices)} (the devices JAX sees), got {n}"
        )
    if jax.process_count() > 1 and n != len(devices):
        raise ValueError(
            f"in a multi-host run ({jax.process_count()} processes) the mesh must use all "
            f"{len(devices)} devices, got num_devices={n}"
        )
    return jax.make_mesh((n,), (axis_name,), axis_types=(axis_type,), devices=devices[:n])


def _axis_name(mesh: Mesh, axis_name: str | None) -> str:
    if axis_name is not None:
        if axis_name not in mesh.axis_names:
            raise ValueError(f"mesh has axes {mesh.axis_names}, not {axis_name!r}")
        return axis_name
    if len(mesh.axis_names) != 1:
        raise ValueError(
            f"mesh has several axes {mesh.axis_names}; pass axis_name= to pick the batch axis"
        )
    return mesh.axis_names[0]


def batch_sharding(mesh: Mesh, axis_name: str | None = None) -> NamedSharding:
    """Sharding that splits an array's leading (batch) axis over the mesh.

    Args:
      mesh: The data-parallel mesh (see :func:`data_parallel_mesh`).
      axis_name: Mesh axis to split over; ``None`` for a 1-D mesh's only axis.

    Returns:
      ``NamedSharding(mesh, P(axis_name))``, usable as a ``jax.jit``
      ``in_shardings``/``out_shardings`` entry.
    """
    return NamedSharding(mesh, P(_axis_name(mesh, axis_name)))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy of an array on every device of ``mesh``.

    Args:
      mesh: The mesh.

    Returns:
      ``NamedSharding(mesh, P())``.
    """
    return NamedSharding(mesh, P())


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    if isinstance(x, jax.Array) and (jax.process_count() == 1 or not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    # Host data: each process contributes its local part (the whole array
    # for replicated shardings). With one process this is a device_put.
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))


def shard_batch(batch: Any, mesh: Mesh, axis_name: str | None = None) -> Any:
    """Splits a batch over the mesh along the leading axis of every leaf.

    In a single-process run each leaf is the global batch. In a multi-host
    run each process passes *its own* slice of the global batch (for
    example, the rows ``process_index::process_count`` of the dataset); the
    result is one global array whose leading axis is the concatenation of the
    processes' slices.

    Args:
      batch: A pytree of arrays (NumPy or JAX) with a common leading batch
        axis, e.g. ``(images, labels)``.
      mesh: The data-parallel mesh.
      axis_name: Mesh axis to split over; ``None`` for a 1-D mesh's only axis.

    Returns:
      The same pytree of global ``jax.Array``\\ s sharded along axis 0.

    Raises:
      ValueError: If a leaf is a scalar or its (global) leading size is not
        divisible by the number of devices on the batch axis.
    """
    sharding = batch_sharding(mesh, axis_name)
    shards = mesh.shape[sharding.spec[0]]
    local_shards = shards // jax.process_count() if jax.process_count() > 1 else shards

    def put(x):
        shape = np.shape(x)
        if not shape:
            raise ValueError("shard_batch needs arrays with a leading batch axis, got a scalar")
        if shape[0] % max(local_shards, 1):
            raise ValueError(
                f"batch size {shape[0]} is not divisible by the {local_shards} devices "
                f"{'of this process ' if jax.process_count() > 1 else ''}on mesh axis "
                f"{sharding.spec[0]!r}; drop or pad the last batch"
            )
        return _put(x, sharding)

    return jax.tree.map(put, batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a full copy of every leaf on every device of the mesh.

    Use it for parameters, optimizer state and multipliers (their LUTs) in
    data-parallel training. In a multi-host run every process must pass the
    same values (e.g. parameters initialised from the same seed).

    Args:
      tree: A pytree of arrays (NumPy or JAX); ``Multiplier`` objects are
        pytrees and can be passed too.
      mesh: The mesh.

    Returns:
      The same pytree of replicated global ``jax.Array``\\ s.
    """
    sharding = replicated_sharding(mesh)
    return jax.tree.map(lambda x: _put(x, sharding), tree)


__all__ = [
    "batch_sharding",
    "data_parallel_mesh",
    "replicate",
    "replicated_sharding",
    "shard_batch",
]
