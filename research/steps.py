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


def train_step(state: state_lib.TrainState, batch: Batch, rng: jax.Array, *,
               task: Any) -> tuple[state_lib.TrainState, clu_metrics.Collection]:
    """One optimizer step on `batch`. Returns the new state and the metrics."""
    rng = jax.random.fold_in(rng, state.step)  # a fresh key for every step

    def loss_fn(params):
        variables = state_lib.model_variables(params, state.batch_stats)
        logits, updates = state.apply_fn(
            variables, task.model_input(batch), train=True, rngs={"dropout": rng},
            mutable=["batch_stats"])
        losses = task.losses(logits, batch)
        return losses.mean(), (losses, logits, updates)

    (_, (losses, logits, updates)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(
        grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats))
    return state, task.metrics(losses, logits, batch)


def eval_step(apply_fn: Callable[..., jax.Array], variables: PyTree, batch: Batch,
              *, task: Any) -> clu_metrics.Collection:
    """Metrics of one batch; examples with `batch["mask"] == False` do not count."""
    logits = apply_fn(variables, task.model_input(batch), train=False)
    return task.metrics(task.losses(logits, batch), logits, batch)


def train_steps(state: state_lib.TrainState, totals: clu_metrics.Collection,
                bad_step: jax.Array, data: Batch, perm: jax.Array, rng: jax.Array,
                *, num_steps: int, task: Any, batch_size: int,
                preprocess_fn: Callable[[Batch], Batch]
                ) -> tuple[state_lib.TrainState, clu_metrics.Collection, jax.Array]:
    """Runs `num_steps` train steps in one call, reading batches on device.

    Step `s` uses examples `perm[k * batch_size:(k + 1) * batch_size]`, with
    `k = s % (len(perm) // batch_size)`: the data order depends on the step
    alone, so a run resumed from any step repeats an uninterrupted one exactly.
    The steps are unrolled, not a `lax.fori_loop`: XLA:CPU runs LeNet's
    convolutions 2.5x slower inside a while loop (measured, see the README).

    Args:
      state: the train state; donated by the caller.
      totals: metrics merged so far; this call's steps are merged in.
      bad_step: the first step whose loss was not finite so far, or -1.
      data: the whole split on device, each array [examples, ...].
      perm: this epoch's example order, [examples] int32.
      rng: the run's dropout key; each step folds in its step number.
      num_steps: how many steps to run (static).
      task: supplies the model input, losses and metrics.
      batch_size: examples per step.
      preprocess_fn: maps a raw batch (e.g. uint8 images) to model inputs.

    Returns:
      The new state, the merged metrics and the updated `bad_step`.
    """
    steps_per_epoch = perm.shape[0] // batch_size
    for _ in range(num_steps):
        offset = (state.step % steps_per_epoch) * batch_size
        idx = lax.dynamic_slice_in_dim(perm, offset, batch_size)
        batch = preprocess_fn(jax.tree.map(lambda a: jnp.take(a, idx, axis=0), data))
        step = state.step
        state, metrics = train_step(state, batch, rng, task=task)
        finite = jnp.isfinite(metrics.loss.total)
        bad_step = jnp.where((bad_step < 0) & ~finite, step, bad_step)
        totals = totals.merge(metrics)
    return state, totals, bad_step


def evaluate_batches(apply_fn: Callable[..., jax.Array], variables: PyTree,
                     data: Batch, *, task: Any,
                     preprocess_fn: Callable[[Batch], Batch]
                     ) -> clu_metrics.Collection:
    """Metrics over a whole split in one call.

    Args:
      apply_fn: the model's apply.
      variables: model variables (no optimizer state needed).
      data: arrays [num_batches, batch, ...] with a boolean `mask` that is
        False on the padding.
      task: supplies the model input, losses and metrics.
      preprocess_fn: maps a raw batch to model inputs.
    """
    def body(i, totals):
        batch = jax.tree.map(
            lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False), data)
        batch = {**preprocess_fn(batch), "mask": batch["mask"]}
        return totals.merge(eval_step(apply_fn, variables, batch, task=task))

    return lax.fori_loop(0, data["mask"].shape[0], body, task.metrics_cls.empty())
