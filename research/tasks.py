"""Tasks: what a batch feeds the model and how its outputs are scored.

The step functions are generic; a task supplies the model input, the
per-example loss and the metric collection. Datasets name their task.
"""
import dataclasses
from typing import Any

import jax
import optax
from clu import metrics as clu_metrics

from research import errors
from research import metrics as metrics_lib

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Classification:
    """`image` -> logits [batch, classes], integer `label`, cross-entropy."""
    metrics_cls: type[clu_metrics.Collection] = metrics_lib.ClassificationMetrics

    def model_input(self, batch: Batch) -> jax.Array:
        return batch["image"]

    def losses(self, logits: jax.Array, batch: Batch) -> jax.Array:
        """Per-example softmax cross-entropy, [batch]."""
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])

    def metrics(self, losses: jax.Array, logits: jax.Array, batch: Batch
                ) -> clu_metrics.Collection:
        return self.metrics_cls.single_from_model_output(
            loss=losses, logits=logits, labels=batch["label"],
            mask=batch.get("mask"))


@dataclasses.dataclass(frozen=True)
class LanguageModel:
    """Next-token prediction: `tokens` [batch, time + 1] -> logits [batch, time].

    Losses are per token; an optional `mask` [batch, time] drops padding.
    """
    metrics_cls: type[clu_metrics.Collection] = metrics_lib.LanguageModelMetrics

    def model_input(self, batch: Batch) -> jax.Array:
        return batch["tokens"][:, :-1]

    def losses(self, logits: jax.Array, batch: Batch) -> jax.Array:
        """Per-token cross-entropy, [batch, time]."""
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, batch["tokens"][:, 1:])

    def metrics(self, losses: jax.Array, logits: jax.Array, batch: Batch
                ) -> clu_metrics.Collection:
        del logits
        mask = batch.get("mask")
        return self.metrics_cls.single_from_model_output(
            loss=losses.reshape(-1),
            mask=None if mask is None else mask.reshape(-1))


TASKS: dict[str, Any] = {
    "classification": Classification(),
    "language_model": LanguageModel(),
}


def get_task(name: str) -> Any:
    if name not in TASKS:
        raise errors.UserError(f"Unknown task {name!r}; choose from {sorted(TASKS)}.")
    return TASKS[name]
