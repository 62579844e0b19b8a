"""Communication-efficient data parallelism: DiLoCo (Douillard et al. 2023,
arXiv:2311.08105) on the device mesh.

K replicas, each a group of devices on the mesh's `replica` axis, train
their own copy of the model (inner steps with the config's optimizer, each
on its share of every global batch) and talk only every H steps: then the
average of their parameter changes, the "outer gradient", updates the shared
(outer) parameters with Nesterov SGD, and every replica restarts from them;
the inner optimizer states are kept (as in the paper and MaxText). Between
syncs nothing crosses replicas: the inner steps are `vmap`ped over the
replica axis (`shard_map`, manual over `replica` only), so each replica's
gradients are reduced over its own devices only.

`delayed=True` overlaps the outer update with the next inner steps: the outer
gradient of period p is applied at the end of period p + 1 (its all-reduce
has a whole period to finish), and the replicas start period p + 1 from the
outer parameters as they were, so every outer step uses a pseudo-gradient
computed at parameters one outer step old (staleness 1).

Evaluation and the checkpoint's `model` item use the outer parameters (with
the replicas' averaged BatchNorm statistics).
"""
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from research import errors
from research import parallel
from research import state as state_lib

PyTree = Any
REPLICA_AXIS = parallel.REPLICA_AXIS
SCHEMES = ("sync", "diloco")


@dataclasses.dataclass(frozen=True)
class Options:
    """`config.data_parallel` for DiLoCo."""
    replicas: int
    sync_every: int
    outer_learning_rate: float
    outer_momentum: float
    delayed: bool


def options(config: ml_collections.ConfigDict) -> Options | None:
    """The DiLoCo options, or None for synchronous data parallelism.

    Raises:
      UserError: an unknown scheme or bad numbers.
    """
    dp = config.get("data_parallel")
    if dp is None:
        return None
    if dp.scheme not in SCHEMES:
        raise errors.UserError(f"config.data_parallel.scheme={dp.scheme!r}; choose "
                               f"from {SCHEMES}.")
    if dp.scheme == "sync":
        return None
    if dp.replicas < 1 or dp.sync_every < 1:
        raise errors.UserError("config.data_parallel needs replicas >= 1 and "
                               "sync_every >= 1.")
    if not (dp.outer_learning_rate > 0 and 0 <= dp.outer_momentum < 1):
        raise errors.UserError("config.data_parallel needs outer_learning_rate > 0 "
                               "and outer_momentum in [0, 1).")
    if config.batch_size % dp.replicas:
        raise errors.UserError(
            f"config.batch_size={config.batch_size} does not split into "
            f"{dp.replicas} replicas' batches; use a multiple of {dp.replicas}.")
    # Per-replica extras would need their own outer rule (an EMA of which
    # weights?); pruning masks would be undone by the outer step.
    unsupported = [name for name, on in (
        ("ema_decay", config.get("ema_decay")),
        ("lookahead.every", config.get("lookahead", {}).get("every")),
        ("prune.sparsity", config.get("prune", {}).get("sparsity")),
        ("grad_accum_steps > 1", config.get("grad_accum_steps", 1) > 1)) if on]
    if unsupported:
        raise errors.UserError(
            f"config.data_parallel.scheme='diloco' does not combine with "
            f"{', '.join(unsupported)}; turn them off or use scheme='sync'.")
    return Options(dp.replicas, dp.sync_every, dp.outer_learning_rate,
                   dp.outer_momentum, dp.delayed)


def replicas(config: ml_collections.ConfigDict) -> int:
    """K for the mesh: the config's replicas under DiLoCo, else 1."""
    opts = options(config)
    return 1 if opts is None else opts.replicas


class DilocoState(struct.PyTreeNode):
    """The replicas' train states and the shared (outer) model.

    `inner` is a `TrainState` whose leaves have a leading [replicas] axis,
    split over the mesh's replica axis; `pending` holds the outer gradient
    waiting to be applied (delayed mode). It maps itself to and from the
    checkpoint (`state.checkpoint_items` calls these methods).
    """
    inner: state_lib.TrainState
    outer_params: PyTree
    outer_model_state: PyTree
    outer_opt_state: PyTree
    pending: PyTree
    options: Options = struct.field(pytree_node=False)

    @property
    def step(self) -> jax.Array:
        return self.inner.step[0]

    @property
    def params(self) -> PyTree:
        return self.outer_params

    @property
    def opt_state(self) -> PyTree:
        return self.inner.opt_state

    @property
    def variables(self) -> dict[str, PyTree]:
        return {"params": self.outer_params, **self.outer_model_state}

    @property
    def eval_variables(self) -> dict[str, PyTree]:
        return self.variables

    def checkpoint_items(self, loop: PyTree) -> dict[str, PyTree]:
        """`model`: the outer model (evaluation, sampling and teachers read it
        as a synchronous run's); `train`: the replicas and the outer state."""
        inner = self.inner
        return {"model": self.variables,
                "train": {"inner": {"step": inner.step, "params": inner.params,
                                    "model_state": inner.model_state,
                                    "opt_state": inner.opt_state,
                                    "extras": inner.extras},
                          "outer_opt_state": self.outer_opt_state,
                          "pending": self.pending, "loop": loop}}

    def restore_items(self, items: dict[str, PyTree]
                      ) -> tuple["DilocoState", PyTree]:
        train, model = items["train"], items["model"]
        return self.replace(
            inner=self.inner.replace(**train["inner"]),
            outer_params=model["params"],
            outer_model_state={k: v for k, v in model.items() if k != "params"},
            outer_opt_state=train["outer_opt_state"], pending=train["pending"]
        ), train["loop"]


@functools.cache
def outer_optimizer(opts: Options) -> optax.GradientTransformation:
    """Nesterov SGD on the outer gradient (one object per options, so that
    states built apart have equal tree structures)."""
    return optax.sgd(opts.outer_learning_rate, momentum=opts.outer_momentum or None,
                     nesterov=True)


def create(state: state_lib.TrainState, opts: Options) -> DilocoState:
    """Every replica starts from `state`; the outer model is its model."""
    inner = jax.tree.map(lambda x: jnp.broadcast_to(x, (opts.replicas,) + x.shape),
                         state)
    return DilocoState(
        inner=inner, outer_params=state.params, outer_model_state=state.model_state,
        outer_opt_state=outer_optimizer(opts).init(state.params),
        pending=jax.tree.map(jnp.zeros_like, state.params), options=opts)


def shardings(opts: Options, mesh: jax.sharding.Mesh) -> DilocoState:
    """A sharding prefix of a `DilocoState`: the replicas' states split over
    the replica axis, the outer model and its optimizer replicated."""
    replicated = NamedSharding(mesh, P())
    return DilocoState(inner=NamedSharding(mesh, P(REPLICA_AXIS)),
                       outer_params=replicated, outer_model_state=replicated,
                       outer_opt_state=replicated, pending=replicated, options=opts)


def _mean_over_replicas(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jnp.mean(x, axis=0).astype(x.dtype), tree)


def _sync(state: DilocoState) -> DilocoState:
    """The outer step: one all-reduce of the replicas' parameters (and
    BatchNorm statistics), then outer Nesterov SGD on their mean change."""
    outer_grad = jax.tree.map(lambda outer, mean: (outer - mean).astype(outer.dtype),
                              state.outer_params,
                              _mean_over_replicas(state.inner.params))
    model_state = _mean_over_replicas(state.inner.model_state)
    # Delayed: the previous period's gradient (zeros at the first sync, which
    # leaves the parameters and a fresh momentum unchanged).
    applied = state.pending if state.options.delayed else outer_grad
    updates, outer_opt_state = outer_optimizer(state.options).update(
        applied, state.outer_opt_state, state.outer_params)
    outer_params = optax.apply_updates(state.outer_params, updates)
    k = state.options.replicas
    broadcast = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: jnp.broadcast_to(x, (k,) + x.shape), tree)
    inner = state.inner.replace(params=broadcast(outer_params),
                                model_state=broadcast(model_state))
    return state.replace(inner=inner, outer_params=outer_params,
                         outer_model_state=model_state,
                         outer_opt_state=outer_opt_state, pending=outer_grad)


def inner_steps(state: DilocoState, batch: dict[str, jax.Array], rng: jax.Array,
                aux: PyTree, *, inner_step, mesh: jax.sharding.Mesh
                ) -> tuple[DilocoState, Any, jax.Array]:
    """One step of every replica, each on its contiguous 1/K of the global
    batch (`inner_step(state, batch, rng, aux, constrain=...)`:
    `steps.train_step`). The replica axis is manual (`shard_map`), the data
    axis inside a replica left to the compiler: a replica's gradients are
    reduced over its own devices only. (A `vmap` over replicas instead turns
    convolutions into grouped ones that the partitioner gathers across
    replicas.)"""
    k = state.options.replicas
    # Replica r takes rows [r B / K, (r + 1) B / K): the rows its devices hold.
    by_replica = NamedSharding(mesh, P(REPLICA_AXIS, parallel.DATA_AXIS))
    split = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
        x.reshape((k, x.shape[0] // k) + x.shape[1:]), by_replica), batch)
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(k))

    def constrain(tree):  # within a replica: over its devices
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
            x, P(parallel.DATA_AXIS)), tree)

    def one_replica(inner, rows, key, aux):
        first = lambda tree: jax.tree.map(lambda x: x[0], tree)  # noqa: E731
        inner, metrics, loss = inner_step(first(inner), first(rows), key[0], aux,
                                          constrain=constrain)
        return jax.tree.map(lambda x: x[None], (inner, metrics, loss))

    spec = P(REPLICA_AXIS)
    inner, metrics, loss = jax.shard_map(
        one_replica, mesh=mesh, in_specs=(spec, spec, spec, P()), out_specs=spec,
        axis_names={REPLICA_AXIS}, check_vma=False)(state.inner, split, keys, aux)
    metrics = jax.tree.map(lambda x: x.sum(axis=0), metrics)
    return state.replace(inner=inner), metrics, loss.mean()


def train_step(state: DilocoState, batch: dict[str, jax.Array], rng: jax.Array,
               aux: PyTree, *, inner_step, mesh: jax.sharding.Mesh
               ) -> tuple[DilocoState, Any, jax.Array]:
    """`inner_steps`, then the outer step after every `sync_every`-th."""
    state, metrics, loss = inner_steps(state, batch, rng, aux,
                                       inner_step=inner_step, mesh=mesh)
    state = jax.lax.cond(state.step % state.options.sync_every == 0, _sync,
                         lambda s: s, state)
    return state, metrics, loss


def parameter_bytes(tree: PyTree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def communication(state: Any, step: int, devices: int) -> dict[str, float]:
    """What the schedule has sent so far, per participant of the all-reduce
    (a device for `sync`, a replica for DiLoCo; the payload, before the
    all-reduce algorithm's own factor): the number of all-reduces of the
    model ("syncs") and the bytes per step averaged over the run."""
    if isinstance(state, DilocoState):
        syncs = step // state.options.sync_every
        per_sync = parameter_bytes(state.outer_params) + parameter_bytes(
            state.outer_model_state)
    else:  # a gradient all-reduce every step, over several devices
        syncs = step if devices > 1 else 0
        per_sync = parameter_bytes(state.params)
    return {"comm/syncs": float(syncs),
            "comm/bytes_per_step": per_sync * syncs / max(step, 1)}
