"""Data-parallel training helpers (meshes, batch sharding, replication).

Example:
  >>> from approx_jax import parallel
  >>> mesh = parallel.data_parallel_mesh()          # all devices, one "data" axis
  >>> params = parallel.replicate(params, mesh)
  >>> batch = parallel.shard_batch((x, y), mesh)    # split along the leading axis
"""

from approx_jax._src.parallel import (
    batch_sharding,
    data_parallel_mesh,
    replicate,
    replicated_sharding,
    shard_batch,
)

__all__ = [
    "batch_sharding",
    "data_parallel_mesh",
    "replicate",
    "replicated_sharding",
    "shard_batch",
]
