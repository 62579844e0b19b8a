"""A split spread over the devices of a mesh: each process holds only its rows.

Training rows are one global array whose leading axis is split over the `data`
axis: process p's devices hold process p's share, padded to equal lengths.
A batch is gathered on device from global example numbers, so the data order
is the same for any device or process count; each device contributes the rows
it holds and one reduce-scatter hands every device its slice of the batch
(the batch's bytes cross the network once, as with a host-side loader).
Evaluation batches are laid out so that each device scores rows it holds.
"""
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from research.data import input_pipeline
from research import mesh as mesh_lib

Batch = dict[str, jax.Array]


def _local_devices(mesh: jax.sharding.Mesh) -> int:
    return mesh.size // jax.process_count()


def place_rows(shard: input_pipeline.Shard, mesh: jax.sharding.Mesh
               ) -> tuple[Batch, jax.Array]:
    """This process's rows to its devices, as one array split over the mesh.

    Returns:
      (rows, row_of): `rows` [processes * per_process, ...] split along the
      data axis (zero padding after each process's share), and `row_of`
      [examples] int32, replicated: the row that holds example i of the split.
    """
    per_device = -(-max(shard.counts) // _local_devices(mesh))
    per_process = per_device * _local_devices(mesh)
    n = shard.counts[jax.process_index()]
    local = {k: np.concatenate([v, np.zeros((per_process - n,) + v.shape[1:],
                                            v.dtype)])
             for k, v in shard.rows.items()}
    sharding = NamedSharding(mesh, P(mesh_lib.batch_axes(mesh)))
    rows = {k: jax.make_array_from_process_local_data(
        sharding, v, (per_process * len(shard.counts),) + v.shape[1:])
        for k, v in local.items()}
    row_of = np.concatenate([p * per_process + np.arange(c, dtype=np.int32)
                             for p, c in enumerate(shard.counts)])
    return rows, mesh_lib.put_replicated(row_of, mesh)


def place_eval(shard: input_pipeline.Shard, batch_size: int,
               mesh: jax.sharding.Mesh) -> Batch:
    """Evaluation batches [num_batches, batch_size, ...] with a `mask`, the
    batch axis split over the mesh; device d's columns hold only its rows.

    Each process's rows are split evenly over its devices; a device scores its
    own rows, `batch_size / devices` at a time. Rows may carry their own
    `mask` (e.g. per character); padding rows are masked out.
    """
    local_devices = _local_devices(mesh)
    per_batch = batch_size // mesh.size
    split = input_pipeline.even_bounds
    device_counts = [np.diff(split(c, local_devices)) for c in shard.counts]
    num_batches = max(1, -(-int(np.max(device_counts)) // per_batch))
    bounds = split(shard.counts[jax.process_index()], local_devices)
    columns = []
    for d in range(local_devices):
        part = {k: v[bounds[d]:bounds[d + 1]] for k, v in shard.rows.items()}
        count = bounds[d + 1] - bounds[d]
        if "mask" not in part:
            part["mask"] = np.ones(count, bool)
        columns.append(input_pipeline.pad_to_batches(part, per_batch, num_batches))
    local = {k: np.concatenate([c[k] for c in columns], axis=1) for k in columns[0]}
    sharding = NamedSharding(mesh, P(None, mesh_lib.batch_axes(mesh)))
    return {k: jax.make_array_from_process_local_data(
        sharding, v, (num_batches, batch_size) + v.shape[2:])
        for k, v in local.items()}


def gather_rows(rows: Batch, idx: jax.Array, mesh: jax.sharding.Mesh) -> Batch:
    """`rows[idx]`, split over the mesh like a batch; call inside jit.

    On one device a plain gather. On several, each device picks the wanted
    rows it holds (zeros elsewhere) and a reduce-scatter sums them: exact,
    since every element has a single non-zero contributor.
    """
    if mesh.size == 1:
        return jax.tree.map(lambda a: jnp.take(a, idx, axis=0), rows)

    def local_gather(local: Batch, idx: jax.Array) -> Batch:
        n = next(iter(local.values())).shape[0]
        pos = idx - lax.axis_index(mesh_lib.batch_axes(mesh)) * n
        held = (pos >= 0) & (pos < n)
        pos = jnp.clip(pos, 0, n - 1)

        def one(a: jax.Array) -> jax.Array:
            picked = jnp.take(a, pos, axis=0)
            picked = jnp.where(held.reshape(held.shape + (1,) * (a.ndim - 1)),
                               picked, jnp.zeros((), a.dtype))
            return lax.psum_scatter(picked, mesh_lib.batch_axes(mesh),
                                    scatter_dimension=0, tiled=True)
        return jax.tree.map(one, local)

    spec: Any = P(mesh_lib.batch_axes(mesh))
    return jax.shard_map(local_gather, mesh=mesh, in_specs=(spec, P()),
                         out_specs=spec)(rows, idx)
