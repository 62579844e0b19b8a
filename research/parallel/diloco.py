"""Communication-efficient data parallelism: DiLoCo (Douillard et al. 2023,
arXiv:2311.08105) on the device mesh.

K replicas, each a group of devices on the mesh's `replica` axis, train
their own copy of the model (inner steps with the config's optimizer, each
on its share of every global batch) and talk only every H steps: then the
average of their parameter changes, the "outer gradient", updates the shared
(outer) parameters with Nesterov SGD, and every replica restarts from them;
the inner optimizer states are kept (as in the paper and MaxText). Between
syncs no array crosses replicas: the inner steps run in a `shard_map` that
is manual over the replica axis only, so each replica's gradients are
reduced over its own devices only.

`delayed=True` takes the all-reduce off the critical path: the outer step at
the end of period p applies period p - 1's averaged change (it had all of
period p to arrive) and starts period p's all-reduce; each replica then
resumes from those outer parameters plus its own share (1/K) of its change
in period p, the part of the coming average it already knows (the eager
updates of arXiv:2502.12996; the other replicas' progress reaches it one
period late). With one replica, outer rate 1 and no momentum this is plain
training, exactly as without the delay.

Training ends with a last sync after the final step, whatever its phase in
the period (and, delayed, the pending change applied too), so the outer
model holds every step.

Evaluation and the checkpoint's `model` item use the outer parameters (with
the replicas' averaged BatchNorm statistics).
"""
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from research import errors
from research.core import config_lib
from research.core import schemes
from research.models import impl
from research import mesh as mesh_lib
from research.core import state as state_lib

PyTree = Any
REPLICA_AXIS = mesh_lib.REPLICA_AXIS


@dataclasses.dataclass(frozen=True)
class Options:
    """`config.data_parallel` for DiLoCo."""
    replicas: int
    sync_every: int
    outer_learning_rate: float
    outer_momentum: float
    delayed: bool


def options(config: ml_collections.ConfigDict) -> Options:
    """`config.data_parallel` checked, for `scheme="diloco"`.

    Raises:
      UserError: bad numbers, or a feature DiLoCo does not combine with.
    """
    dp = config.data_parallel
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


class DilocoState(struct.PyTreeNode):
    """The replicas' train states and the shared (outer) model.

    `inner` is a `TrainState` whose leaves have a leading [replicas] axis,
    split over the mesh's replica axis; `pending` holds the outer gradient
    waiting to be applied and `anchor` (like `inner.params`) where each
    replica started its period (delayed mode; {} otherwise). It maps itself
    to and from the checkpoint (`state.checkpoint_items` calls these).
    """
    inner: state_lib.TrainState
    outer_params: PyTree
    outer_model_state: PyTree
    outer_opt_state: PyTree
    pending: PyTree
    anchor: PyTree      # delayed: each replica's params at its period's start
    final_step: jax.Array  # int32 []: the run's last step (a last sync after it)
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
                          "pending": self.pending, "anchor": self.anchor,
                          "loop": loop}}

    def restore_items(self, items: dict[str, PyTree]
                      ) -> tuple["DilocoState", PyTree]:
        train, model = items["train"], items["model"]
        return self.replace(
            inner=self.inner.replace(**train["inner"]),
            outer_params=model["params"],
            outer_model_state={k: v for k, v in model.items() if k != "params"},
            outer_opt_state=train["outer_opt_state"], pending=train["pending"],
            anchor=train["anchor"]), train["loop"]


@functools.cache
def outer_optimizer(opts: Options) -> optax.GradientTransformation:
    """Nesterov SGD on the outer gradient (one object per options, so that
    states built apart have equal tree structures)."""
    return optax.sgd(opts.outer_learning_rate, momentum=opts.outer_momentum or None,
                     nesterov=True)


def _broadcast(tree: PyTree, k: int) -> PyTree:
    """`tree` with a leading [k] axis: one copy per replica."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (k,) + x.shape), tree)


def create(state: state_lib.TrainState, opts: Options, final_step: Any
           ) -> DilocoState:
    """Every replica starts from `state`; the outer model is its model."""
    inner = _broadcast(state, opts.replicas)
    return DilocoState(
        inner=inner, outer_params=state.params, outer_model_state=state.model_state,
        outer_opt_state=outer_optimizer(opts).init(state.params),
        pending=jax.tree.map(jnp.zeros_like, state.params),
        anchor=inner.params if opts.delayed else {},
        final_step=jnp.asarray(final_step, jnp.int32), options=opts)


def shardings(opts: Options, mesh: jax.sharding.Mesh) -> DilocoState:
    """A sharding prefix of a `DilocoState`: the replicas' states split over
    the replica axis, the outer model and its optimizer replicated."""
    replicated = NamedSharding(mesh, P())
    per_replica = NamedSharding(mesh, P(REPLICA_AXIS))
    return DilocoState(inner=per_replica, outer_params=replicated,
                       outer_model_state=replicated, outer_opt_state=replicated,
                       pending=replicated, anchor=per_replica,
                       final_step=replicated, options=opts)


def _mean_over_replicas(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jnp.mean(x, axis=0).astype(x.dtype), tree)


def _outer_step(state: DilocoState, outer_params: PyTree, opt_state: PyTree,
                outer_grad: PyTree) -> tuple[PyTree, PyTree]:
    updates, opt_state = outer_optimizer(state.options).update(
        outer_grad, opt_state, outer_params)
    return optax.apply_updates(outer_params, updates), opt_state


def _sync(state: DilocoState, final: Any = False) -> DilocoState:
    """The outer step: one all-reduce of the replicas' parameter changes (and
    BatchNorm statistics), then outer Nesterov SGD on their mean.

    Delayed, the change applied is the previous period's (zeros at the first
    sync, which leaves the parameters and a fresh momentum unchanged) and
    each replica goes on from the result plus 1/K of its own latest change;
    at the `final` sync both pending changes are applied and the replicas
    join."""
    k, delayed = state.options.replicas, state.options.delayed
    if delayed:
        change = jax.tree.map(lambda a, p: (a - p).astype(p.dtype), state.anchor,
                              state.inner.params)
        outer_grad = _mean_over_replicas(change)
    else:  # every replica started from the outer parameters
        outer_grad = jax.tree.map(lambda o, m: (o - m).astype(o.dtype),
                                  state.outer_params,
                                  _mean_over_replicas(state.inner.params))
    model_state = _mean_over_replicas(state.inner.model_state)
    applied = state.pending if delayed else outer_grad
    outer_params, opt_state = _outer_step(state, state.outer_params,
                                          state.outer_opt_state, applied)
    inner = state.inner.replace(model_state=_broadcast(model_state, k))
    if not delayed:
        inner = inner.replace(params=_broadcast(outer_params, k))
        return state.replace(inner=inner, outer_params=outer_params,
                             outer_model_state=model_state,
                             outer_opt_state=opt_state, pending=outer_grad)

    def join():  # the last sync: nothing left in flight
        params, opt = _outer_step(state, outer_params, opt_state, outer_grad)
        zeros = jax.tree.map(jnp.zeros_like, outer_grad)
        return params, opt, zeros, _broadcast(params, k)

    def go_on():  # each replica: the outer model plus its share of its change
        return outer_params, opt_state, outer_grad, jax.tree.map(
            lambda o, c: (o[None] - c / k).astype(c.dtype), outer_params, change)

    outer_params, opt_state, pending, params = jax.lax.cond(final, join, go_on)
    return state.replace(inner=inner.replace(params=params),
                         outer_params=outer_params, outer_model_state=model_state,
                         outer_opt_state=opt_state, pending=pending, anchor=params)


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
    by_replica = NamedSharding(mesh, P(REPLICA_AXIS, mesh_lib.DATA_AXIS))
    split = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
        x.reshape((k, x.shape[0] // k) + x.shape[1:]), by_replica), batch)
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(k))

    def constrain(tree):  # within a replica: over its devices
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
            x, P(mesh_lib.DATA_AXIS)), tree)

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
    """`inner_steps`, then the outer step after every `sync_every`-th and
    after the last."""
    state, metrics, loss = inner_steps(state, batch, rng, aux,
                                       inner_step=inner_step, mesh=mesh)
    final = state.step == state.final_step
    state = jax.lax.cond((state.step % state.options.sync_every == 0) | final,
                         functools.partial(_sync, final=final), lambda s: s, state)
    return state, metrics, loss


@dataclasses.dataclass(frozen=True)
class Diloco:
    """The `Scheme` (core/schemes.py) of DiLoCo with `options`."""
    options: Options

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "Diloco":
        return cls(options(config))

    def create_mesh(self, num_devices):
        return mesh_lib.create_mesh(num_devices, self.options.replicas)

    def state_shardings(self, state, param_specs, mesh):
        del state, param_specs  # each replica holds the whole model
        return mesh_lib.replicated(mesh)

    def distribute(self, state, total_steps, mesh):
        return jax.jit(lambda s, t: create(s, self.options, t),
                       out_shardings=shardings(self.options, mesh))(state, total_steps)

    def shardings(self, state, mesh):
        del state
        return shardings(self.options, mesh)

    def train_step(self, state, batch, rng, aux, *, inner_step, mesh, constrain):
        del constrain  # each replica constrains over its own devices
        return train_step(state, batch, rng, aux, inner_step=inner_step, mesh=mesh)

    def trace(self, fn):
        """`fn` traced with XLA's convolutions: the kernels' shard_map is not
        written for the replicas' manual axis."""
        if impl.kernels() is None:
            return fn

        def traced_with_xla(*args, **kwargs):
            with impl.kernels().xla_only():
                return fn(*args, **kwargs)
        return traced_with_xla

    def train_state(self, state):
        return state.inner

    def checkpoint_items(self, state, loop):
        return state.checkpoint_items(loop)

    def restore_items(self, state, items):
        return state.restore_items(items)

    def communication(self, state, step, devices, final_step):
        """The all-reduces of the model so far, per replica (the last one
        after `final_step` included), and the bytes per step over the run."""
        del devices
        h = state.options.sync_every
        syncs = step // h + int(step % h != 0 and step == final_step)
        per_sync = schemes.parameter_bytes(state.outer_params) + (
            schemes.parameter_bytes(state.outer_model_state))
        return {"comm/syncs": float(syncs),
                "comm/bytes_per_step": per_sync * syncs / max(step, 1)}


# Data parallelism: "sync" (parallel/sync.py) all-reduces the gradients every
# step; "diloco" trains `replicas` copies (each a group of devices) that
# average their parameter changes every `sync_every` steps into an outer
# Nesterov SGD step; `delayed` applies each average one period late. The
# scheme's name is checked against the registry by the assembly.
SECTION = config_lib.Section("data_parallel", {"data_parallel": {
    "scheme": "sync",             # key of core/schemes.SCHEMES: "sync", "diloco",
    #                               "sharded" (data, FSDP, tensor: config.sharding)
    "replicas": 4,                # diloco: K, dividing the device count
    "sync_every": 16,             # diloco: H inner steps between syncs
    "outer_learning_rate": 0.7,   # diloco: the outer SGD's (paper: 0.7)
    "outer_momentum": 0.9,        # diloco: Nesterov momentum (paper: 0.9)
    "delayed": False,             # diloco: overlap the outer step with a period
}}, fixed={"data_parallel.scheme": "the checkpoint holds another scheme's state",
           "data_parallel.replicas": "the checkpoint holds one state per replica"})
