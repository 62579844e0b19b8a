"""Device mesh, shardings, and multi-process start-up on JAX's own runtime.

One mesh axis, "data", for synchronous data parallelism: state is
replicated, batches are split along their leading axis, and the compiler
inserts the collectives (an all-reduce of the gradients per step). DiLoCo
(`diloco.py`) puts a "replica" axis before it: each replica is a group of
devices; a batch is split over both axes.
"""
import os
import socket
import threading
import time
from typing import Any

from absl import logging
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from research import errors

DATA_AXIS = "data"
REPLICA_AXIS = "replica"
PyTree = Any
# Set by cluster launchers when a job has several processes; jax.distributed
# reads the details itself (SLURM, Open MPI, TPU pods, ...).
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                "TPU_WORKER_HOSTNAMES")


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None, timeout_s: int = 60) -> None:
    """Joins a multi-process job, from flags or the cluster's environment.

    A no-op for a single process. On CPUs the collectives go through gloo.

    Raises:
      UserError: the coordinator was not reached within `timeout_s`.
    """
    explicit = any(v is not None for v in (coordinator_address, num_processes,
                                           process_id))
    from_env = any(int(os.environ.get(k, "1")) > 1 if k.endswith(("NTASKS", "SIZE"))
                   else k in os.environ for k in _CLUSTER_ENV)
    if not (explicit or from_env):
        return
    if coordinator_address and process_id:
        # JAX aborts the process (no Python error) when the coordinator stays
        # unreachable; probe it first so that this case gets a plain message.
        _wait_for_coordinator(coordinator_address, timeout_s)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # A job that never forms (a process that never starts, a wrong host, some
    # other server at the address) makes JAX abort the process from C++ with
    # a stack trace when its deadline passes; end it first, with one line.
    formed = threading.Event()
    threading.Thread(target=_end_unless_formed, daemon=True, args=(
        formed, timeout_s, coordinator_address, process_id, num_processes)).start()
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address, num_processes=num_processes,
            process_id=process_id, initialization_timeout=timeout_s + 60)
    except Exception as e:  # pylint: disable=broad-except
        raise errors.UserError(
            f"Could not join the distributed job (coordinator {coordinator_address}, "
            f"process {process_id} of {num_processes}) within {timeout_s}s: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Check "
            "that process 0 runs, that the address and port are reachable from "
            "here, and that every process got the same --num_processes.") from None
    finally:
        formed.set()
    logging.info("Process %d of %d; %d local and %d global devices.",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())


def _end_unless_formed(formed: threading.Event, timeout_s: int, address: str | None,
                       process_id: int | None, num_processes: int | None) -> None:
    if not formed.wait(timeout_s):
        errors.exit_now(
            f"The distributed job did not form within {timeout_s}s (coordinator "
            f"{address}, process {process_id} of {num_processes}): start every "
            "process with the same --coordinator_address (process 0's host:port, "
            "with no other server on it) and --num_processes, or raise "
            "--distributed_timeout_s.", 2)


def _wait_for_coordinator(address: str, timeout_s: int) -> None:
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            return
        except (OSError, ValueError) as e:
            if time.monotonic() > deadline:
                raise errors.UserError(
                    f"Could not join the distributed job: the coordinator {address} "
                    f"did not answer within {timeout_s}s ({e}). Start process 0 "
                    "first, and check the address, the port and the firewall."
                ) from None
            time.sleep(0.5)


def create_mesh(num_devices: int = 0, replicas: int = 0) -> jax.sharding.Mesh:
    """A mesh over the first `num_devices` devices (0: all of them): 1-D
    ("data"), or ("replica", "data") with `replicas` >= 1 groups."""
    available = jax.device_count()
    n = num_devices or available
    if n > available:
        raise errors.UserError(
            f"config.num_devices={num_devices} but only {available} devices exist; "
            "pass --config.num_devices=0 to use all of them.")
    if jax.process_count() > 1 and n != available:
        raise errors.UserError("config.num_devices must be 0 (all devices) in a "
                               "multi-process job.")
    # Auto axes: the default Explicit axes break linen Dropout and integer-label
    # cross-entropy under jit.
    if replicas:
        if n % replicas:
            divisors = [str(d) for d in range(1, n + 1) if n % d == 0]
            raise errors.UserError(
                f"config.data_parallel.replicas={replicas} does not divide the {n} "
                f"devices (each replica is a group of devices): pick one of "
                f"{', '.join(divisors)}, or run on more devices (on a CPU: "
                "XLA_FLAGS=--xla_force_host_platform_device_count=N).")
        return jax.make_mesh((replicas, n // replicas), (REPLICA_AXIS, DATA_AXIS),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2,
                             devices=jax.devices()[:n])
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:n])


def batch_axes(mesh: jax.sharding.Mesh) -> str | tuple[str, ...]:
    """The mesh axes a batch is split over: all of them (one name for a 1-D
    mesh, so its shardings stay those of synchronous training)."""
    names = tuple(mesh.axis_names)
    return names[0] if len(names) == 1 else names


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data axes."""
    return NamedSharding(mesh, P(batch_axes(mesh)))


def check_divisible(name: str, batch_size: int, mesh: jax.sharding.Mesh,
                    per: int = 1) -> None:
    """A batch must split evenly over the devices (and micro-batches)."""
    if batch_size % (mesh.size * per):
        extra = f" x {per} micro-batches" if per > 1 else ""
        raise errors.UserError(
            f"config.{name}={batch_size} does not divide across {mesh.size} "
            f"devices{extra}; use a multiple of {mesh.size * per}.")


def put_replicated(tree: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
    """Host arrays (the same on every process) to arrays on every device."""
    sharding = replicated(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
        tree)
