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
    """K for the mesh's replica axis under DiLoCo; 0 (no such axis) else."""
    opts = options(config)
    return 0 if opts is None else opts.replicas


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
    """`inner_steps`, then the outer step after every `sync_every`-th and
    after the last."""
    state, metrics, loss = inner_steps(state, batch, rng, aux,
                                       inner_step=inner_step, mesh=mesh)
    final = state.step == state.final_step
    state = jax.lax.cond((state.step % state.options.sync_every == 0) | final,
                         functools.partial(_sync, final=final), lambda s: s, state)
    return state, metrics, loss


def parameter_bytes(tree: PyTree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def communication(state: Any, step: int, devices: int, final_step: int = 0
                  ) -> dict[str, float]:
    """What the schedule has sent so far, per participant of the all-reduce
    (a device for `sync`, a replica for DiLoCo; the payload, before the
    all-reduce algorithm's own factor): the number of all-reduces of the
    model ("syncs", DiLoCo's last one after `final_step` included) and the
    bytes per step averaged over the run."""
    if isinstance(state, DilocoState):
        h = state.options.sync_every
        syncs = step // h + int(step % h != 0 and step == final_step)
        per_sync = parameter_bytes(state.outer_params) + parameter_bytes(
            state.outer_model_state)
    else:  # a gradient all-reduce every step, over several devices
        syncs = step if devices > 1 else 0
        per_sync = parameter_bytes(state.params)
    return {"comm/syncs": float(syncs),
            "comm/bytes_per_step": per_sync * syncs / max(step, 1)}


def allreduce_seconds(num_bytes: float, participants: int, gbit_per_s: float,
                      latency_s: float) -> float:
    """A ring all-reduce of `num_bytes` over `participants` links of
    `gbit_per_s` each: 2 (n - 1) steps, each moving num_bytes / n and paying
    the latency once (the bandwidth-optimal textbook model)."""
    if participants <= 1:
        return 0.0
    n = participants
    return 2 * (n - 1) * (latency_s + num_bytes / n / (gbit_per_s * 1e9 / 8))


def modeled_step_seconds(compute_s: float, num_bytes: float, participants: int,
                         gbit_per_s: float, latency_s: float, sync_every: int = 1,
                         delayed: bool = False) -> float:
    """Wall-clock time per step: compute, plus the all-reduce of every
    `sync_every`-th step (sync: every step) blocking, or, `delayed`, only the
    part of it that a period of compute does not hide."""
    comm = allreduce_seconds(num_bytes, participants, gbit_per_s, latency_s)
    if delayed:
        return compute_s + max(0.0, comm - sync_every * compute_s) / sync_every
    return compute_s + comm / sync_every


def wall_clock_table(compute_s: float, num_bytes: float, *, latency_s: float,
                     replicas=(4, 16, 64, 256, 1024), links=(1, 10, 100),
                     sync_every=(16, 64)) -> str:
    """Markdown: modeled seconds per step of `sync` (an all-reduce of
    `num_bytes` every step) and of DiLoCo (every H steps, blocking or
    delayed), for K participants on links of `links` Gbit/s."""
    schemes = [("sync", 1, False)] + [
        (f"H={h}{' delayed' if d else ''}", h, d)
        for h in sync_every for d in (False, True)]
    lines = ["| K | link | " + " | ".join(n for n, _, _ in schemes) + " |",
             "|---" * (2 + len(schemes)) + "|"]
    for k in replicas:
        for gbit in links:
            cells = [modeled_step_seconds(compute_s, num_bytes, k, gbit, latency_s,
                                          h, d) for _, h, d in schemes]
            lines.append(f"| {k} | {gbit} Gbit/s | " + " | ".join(
                f"{1e3 * c:.1f} ms ({c / compute_s:.2f}x)" for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse  # pylint: disable=g-import-not-at-top
    parser = argparse.ArgumentParser(description="The wall-clock model's table.")
    parser.add_argument("--compute_ms", type=float, required=True,
                        help="compute time of one step (per replica)")
    parser.add_argument("--mbytes", type=float, required=True,
                        help="megabytes all-reduced per sync (the parameters)")
    parser.add_argument("--latency_us", type=float, default=50.0)
    args = parser.parse_args()
    print(wall_clock_table(args.compute_ms / 1e3, args.mbytes * 1e6,
                           latency_s=args.latency_us * 1e-6))
