"""Pure per-batch functions and the fused multi-step loops built from them.

Nothing here is jitted or does I/O; `core/experiment.py` binds the static
options (`Pipeline`, step count, the input path's batches, the scheme's step)
with `functools.partial` and jits once.
"""
import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from clu import metrics as clu_metrics
from jax import lax

from research.core import state as state_lib

Batch = dict[str, jax.Array]
PyTree = Any


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """How a step turns stored rows into model inputs and scores the outputs.

    Attributes:
      objective: model input, loss and metrics (`objectives.Objective`).
      preprocess_fn: maps raw rows (e.g. uint8 images) to model inputs.
      augment: keyed training augmentation, `(batch, key, step, epoch) ->
        batch` (`augment.augment_batch` or `crop_windows`), or None.
      views: test-time views and their weights: evaluation scores the
        weighted mean of their logits (`augment.EVAL_VIEWS`).
      batch_sharding: how a batch is split over devices.
    """
    objective: Any
    preprocess_fn: Callable[[Batch], Batch]
    augment: Any = None
    views: tuple[tuple[Callable[[jax.Array], jax.Array], float], ...] = (
        (lambda x: x, 1.0),)
    batch_sharding: jax.sharding.Sharding | None = None

    def constrain(self, tree: PyTree) -> PyTree:
        """Pins arrays to the batch sharding, if any."""
        if self.batch_sharding is None:
            return tree
        return jax.tree.map(
            lambda x: lax.with_sharding_constraint(x, self.batch_sharding), tree)


def train_step(state: state_lib.TrainState, batch: Batch, rng: jax.Array,
               aux: PyTree, *, objective: Any, grad_accum_steps: int = 1,
               constrain: Callable[[PyTree], PyTree] = lambda tree: tree
               ) -> tuple[state_lib.TrainState, clu_metrics.Collection, jax.Array]:
    """One optimizer step on `batch`. Returns the new state, the metrics and
    the loss.

    With `grad_accum_steps=k`, the batch is cut into k micro-batches
    (`batch[i::k]`) whose gradients are averaged: the same update as one pass
    over the whole batch, in 1/k of the activation memory. BatchNorm
    statistics then come from each micro-batch in turn.
    """
    rng = jax.random.fold_in(rng, state.step)  # a fresh key for every step

    def loss_fn(params, model_state, micro, key):
        outputs, updates = state.apply_fn(
            {"params": params, **model_state}, objective.model_input(micro),
            train=True, rngs={"dropout": key}, mutable=list(model_state))
        loss, metrics = objective(outputs, micro, params=params, aux=aux, train=True)
        return loss, (metrics, {**model_state, **updates})

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum_steps == 1:
        (loss, (metrics, model_state)), grads = grad_fn(
            state.params, state.model_state, batch, rng)
    else:
        k = grad_accum_steps
        grads, loss, model_state = None, 0.0, state.model_state
        metrics = objective.metrics_cls.empty()
        for i in range(k):  # unrolled: XLA:CPU convolutions are slow in loops
            micro = constrain(jax.tree.map(lambda x: x[i::k], batch))
            (micro_loss, (m, model_state)), g = grad_fn(
                state.params, model_state, micro, jax.random.fold_in(rng, i))
            grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
            metrics, loss = metrics.merge(m), loss + micro_loss / k
        grads = jax.tree.map(lambda g: g / k, grads)
    return state.apply_gradients(grads, model_state), metrics, loss


def eval_outputs(apply_fn: Callable[..., jax.Array], variables: PyTree,
                 batch: Batch, *, pipeline: Pipeline) -> tuple[jax.Array, Batch]:
    """The model's outputs on a batch of raw rows (the logits of the
    pipeline's views, averaged) and the preprocessed batch."""
    batch = pipeline.preprocess_fn(batch)
    inputs = pipeline.objective.model_input(batch)
    if len(pipeline.views) == 1:
        return apply_fn(variables, pipeline.views[0][0](inputs), train=False), batch
    outputs = sum(weight * apply_fn(variables, view(inputs), train=False)
                  for view, weight in pipeline.views)
    return outputs, batch


def eval_step(apply_fn: Callable[..., jax.Array], variables: PyTree, batch: Batch,
              aux: PyTree, *, pipeline: Pipeline) -> clu_metrics.Collection:
    """Metrics of one batch (of raw rows); examples with `batch["mask"] ==
    False` do not count."""
    outputs, batch = eval_outputs(apply_fn, variables, batch, pipeline=pipeline)
    _, metrics = pipeline.objective(outputs, batch, params=variables["params"],
                                    aux=aux, train=False)
    return metrics


class Carry(NamedTuple):
    """What a train chunk carries from step to step (donated to each call):
    the state, the metrics merged so far and the first step whose loss was
    not finite (-1: none yet)."""
    state: Any
    totals: clu_metrics.Collection
    bad_step: jax.Array


def train_chunk(carry: Carry, inputs: PyTree, keys: PyTree, aux: PyTree, *,
                num_steps: int, steps_per_epoch: int, batch_fn: Callable[..., Batch],
                step_fn: Callable[..., Any], pipeline: Pipeline) -> Carry:
    """Runs `num_steps` train steps in one call.

    The steps are unrolled, not a `lax.fori_loop`: XLA:CPU runs LeNet's
    convolutions 2.5x slower inside a while loop (measured; docs/speed.md).
    Where the batches come from is the input path's business (`batch_fn`:
    rows on the devices, or batches the host read); how a step updates the
    state over the mesh is the parallel scheme's (`step_fn`).

    Args:
      carry: the state, metrics and bad step; donated by the caller.
      inputs: the chunk's step inputs, as the input path made them.
      keys: the run's `dropout` and `augment` keys; steps fold in their number.
      aux: the objective's extra inputs (e.g. a teacher), not differentiated.
      num_steps: how many steps to run (static).
      steps_per_epoch: steps in an epoch (alternating flip needs the epoch).
      batch_fn: `(inputs, i, step, pipeline) -> batch`: step i of the chunk,
        preprocessed, with the examples' numbers in `index`.
      step_fn: `(state, batch, rng, aux, constrain=) -> (state, metrics,
        loss)`: one optimizer step (`train_step` as the scheme runs it).
      pipeline: how rows become batches and how they are scored.
    """
    state, totals, bad_step = carry
    for i in range(num_steps):
        step = state.step
        batch = batch_fn(inputs, i, step, pipeline)
        if pipeline.augment is not None:
            batch = pipeline.augment(batch, keys["augment"], step,
                                     step // steps_per_epoch)
        state, metrics, loss = step_fn(state, batch, keys["dropout"], aux,
                                       constrain=pipeline.constrain)
        bad_step = jnp.where((bad_step < 0) & ~jnp.isfinite(loss), step, bad_step)
        totals = totals.merge(metrics)
    return Carry(state, totals, bad_step)


def eval_merge(apply_fn: Callable[..., jax.Array], variables: PyTree,
               totals: clu_metrics.Collection, batch: Batch, aux: PyTree, *,
               pipeline: Pipeline) -> clu_metrics.Collection:
    """`totals` with one more evaluation batch (a streamed split) merged in."""
    batch = pipeline.constrain(batch)
    return totals.merge(eval_step(apply_fn, variables, batch, aux, pipeline=pipeline))


def evaluate_batches(apply_fn: Callable[..., jax.Array], variables: PyTree,
                     data: Batch, aux: PyTree, *, pipeline: Pipeline
                     ) -> clu_metrics.Collection:
    """Metrics over a whole split in one call.

    Args:
      apply_fn: the model's apply.
      variables: model variables (no optimizer state needed).
      data: arrays [num_batches, batch, ...] with a boolean `mask` that is
        False on the padding.
      aux: the objective's extra inputs.
      pipeline: preprocessing, views and scoring.
    """
    def body(i, totals):
        batch = pipeline.constrain(jax.tree.map(
            lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False), data))
        return totals.merge(eval_step(apply_fn, variables, batch, aux,
                                      pipeline=pipeline))

    return lax.fori_loop(0, data["mask"].shape[0], body,
                         pipeline.objective.metrics_cls.empty())


def predict_batches(apply_fn: Callable[..., jax.Array], variables: PyTree,
                    data: Batch, *, pipeline: Pipeline) -> jax.Array:
    """The predicted class (argmax of the outputs) of every evaluation row,
    [num_batches, batch, ...] like `data`; padding rows predict anything."""
    def one(batch):
        outputs, _ = eval_outputs(apply_fn, variables, pipeline.constrain(batch),
                                  pipeline=pipeline)
        return jnp.argmax(outputs, axis=-1).astype(jnp.int32)

    return lax.map(one, data)
