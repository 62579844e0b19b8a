"""Pure per-batch functions and the fused multi-step loops built from them.

Nothing here is jitted or does I/O; `train.py` binds the static options (the
task, batch size, preprocessing) with `functools.partial` and jits once.
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
from clu import metrics as clu_metrics
from jax import lax

from research import state as state_lib

Batch = dict[str, jax.Array]
PyTree = Any


def _constrain(tree: PyTree, sharding: jax.sharding.Sharding | None) -> PyTree:
    """Pins arrays to `sharding` (the batch split over devices), if given."""
    if sharding is None:
        return tree
    return jax.tree.map(lambda x: lax.with_sharding_constraint(x, sharding), tree)


def train_step(state: state_lib.TrainState, batch: Batch, rng: jax.Array, *,
               task: Any, grad_accum_steps: int = 1,
               batch_sharding: jax.sharding.Sharding | None = None
               ) -> tuple[state_lib.TrainState, clu_metrics.Collection]:
    """One optimizer step on `batch`. Returns the new state and the metrics.

    With `grad_accum_steps=k`, the batch is cut into k micro-batches
    (`batch[i::k]`) whose mean gradients are averaged: the same update as one
    pass over the whole batch, in 1/k of the activation memory. BatchNorm
    statistics then come from each micro-batch in turn.
    """
    rng = jax.random.fold_in(rng, state.step)  # a fresh key for every step

    def loss_fn(params, batch_stats, micro, key):
        variables = state_lib.model_variables(params, batch_stats)
        logits, updates = state.apply_fn(
            variables, task.model_input(micro), train=True, rngs={"dropout": key},
            mutable=["batch_stats"])
        losses = task.losses(logits, micro)
        return losses.mean(), (losses, logits, updates.get("batch_stats", batch_stats))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum_steps == 1:
        (_, (losses, logits, batch_stats)), grads = grad_fn(
            state.params, state.batch_stats, batch, rng)
        metrics = task.metrics(losses, logits, batch)
    else:
        k = grad_accum_steps
        grads, batch_stats, metrics = None, state.batch_stats, task.metrics_cls.empty()
        for i in range(k):  # unrolled: XLA:CPU convolutions are slow in loops
            micro = _constrain(jax.tree.map(lambda x: x[i::k], batch), batch_sharding)
            (_, (losses, logits, batch_stats)), g = grad_fn(
                state.params, batch_stats, micro, jax.random.fold_in(rng, i))
            grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
            metrics = metrics.merge(task.metrics(losses, logits, micro))
        grads = jax.tree.map(lambda g: g / k, grads)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return state, metrics


def eval_step(apply_fn: Callable[..., jax.Array], variables: PyTree, batch: Batch,
              *, task: Any) -> clu_metrics.Collection:
    """Metrics of one batch; examples with `batch["mask"] == False` do not count."""
    logits = apply_fn(variables, task.model_input(batch), train=False)
    return task.metrics(task.losses(logits, batch), logits, batch)


def train_steps(state: state_lib.TrainState, totals: clu_metrics.Collection,
                bad_step: jax.Array, data: Batch, perm: jax.Array, rng: jax.Array,
                *, num_steps: int, task: Any, batch_size: int,
                preprocess_fn: Callable[[Batch], Batch],
                gather_fn: Callable[[Batch, jax.Array], Batch] | None = None,
                grad_accum_steps: int = 1,
                batch_sharding: jax.sharding.Sharding | None = None
                ) -> tuple[state_lib.TrainState, clu_metrics.Collection, jax.Array]:
    """Runs `num_steps` train steps in one call, reading batches on device.

    Step `s` uses rows `perm[k * batch_size:(k + 1) * batch_size]`, with
    `k = s % (len(perm) // batch_size)`: the data order depends on the step
    alone, so a run resumed from any step repeats an uninterrupted one exactly.
    The steps are unrolled, not a `lax.fori_loop`: XLA:CPU runs LeNet's
    convolutions 2.5x slower inside a while loop (measured, see the README).

    Args:
      state: the train state; donated by the caller.
      totals: metrics merged so far; this call's steps are merged in.
      bad_step: the first step whose loss was not finite so far, or -1.
      data: the split's rows on device, each array [rows, ...].
      perm: this epoch's order of rows, [examples] int32.
      rng: the run's dropout key; each step folds in its step number.
      num_steps: how many steps to run (static).
      task: supplies the model input, losses and metrics.
      batch_size: examples per step.
      preprocess_fn: maps a raw batch (e.g. uint8 images) to model inputs.
      gather_fn: `(data, idx) -> data[idx]`, for rows split over devices
        (`sharded_data.gather_rows`); default a plain gather.
      grad_accum_steps: micro-batches per step (see `train_step`).
      batch_sharding: how a batch is split over devices.

    Returns:
      The new state, the merged metrics and the updated `bad_step`.
    """
    steps_per_epoch = perm.shape[0] // batch_size
    for _ in range(num_steps):
        offset = (state.step % steps_per_epoch) * batch_size
        idx = lax.dynamic_slice_in_dim(perm, offset, batch_size)
        if gather_fn is None:  # replicated data: each device takes its rows
            idx = _constrain(idx, batch_sharding)
            batch = jax.tree.map(lambda a: jnp.take(a, idx, axis=0), data)
        else:
            batch = gather_fn(data, idx)
        batch = preprocess_fn(batch)
        step = state.step
        state, metrics = train_step(state, _constrain(batch, batch_sharding), rng,
                                    task=task, grad_accum_steps=grad_accum_steps,
                                    batch_sharding=batch_sharding)
        finite = jnp.isfinite(metrics.loss.total)
        bad_step = jnp.where((bad_step < 0) & ~finite, step, bad_step)
        totals = totals.merge(metrics)
    return state, totals, bad_step


def evaluate_batches(apply_fn: Callable[..., jax.Array], variables: PyTree,
                     data: Batch, *, task: Any,
                     preprocess_fn: Callable[[Batch], Batch],
                     batch_sharding: jax.sharding.Sharding | None = None
                     ) -> clu_metrics.Collection:
    """Metrics over a whole split in one call.

    Args:
      apply_fn: the model's apply.
      variables: model variables (no optimizer state needed).
      data: arrays [num_batches, batch, ...] with a boolean `mask` that is
        False on the padding.
      task: supplies the model input, losses and metrics.
      preprocess_fn: maps a raw batch to model inputs.
      batch_sharding: how a batch is split over devices.
    """
    def body(i, totals):
        batch = _constrain(jax.tree.map(
            lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False), data),
            batch_sharding)
        batch = {**preprocess_fn(batch), "mask": batch["mask"]}
        return totals.merge(eval_step(apply_fn, variables, batch, task=task))

    return lax.fori_loop(0, data["mask"].shape[0], body, task.metrics_cls.empty())
