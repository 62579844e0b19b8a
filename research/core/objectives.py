"""Objectives: what a batch feeds the model, and how its outputs are scored.

`config.objective` names one (empty: the dataset's natural objective) and
`config.objective_kwargs` configures it. The step functions are generic: an
objective supplies the model input, the loss to differentiate and the metrics.
Adding one is a class following `Objective` plus a line in `OBJECTIVES`.
An objective does no I/O: what it needs from outside (a distillation
teacher) is provided by the assembly (`research/assembly.py`).
"""
import dataclasses
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import optax
from clu import metrics as clu_metrics

from research import errors
from research.core import metrics as metrics_lib

Batch = dict[str, jax.Array]
PyTree = Any


class Objective(Protocol):
    """The contract every objective follows.

    Attributes:
      metrics_cls: the clu collection its metrics are (`metrics_cls.empty()`
        starts a sum over batches).
    """
    metrics_cls: type[clu_metrics.Collection]

    def model_input(self, batch: Batch) -> jax.Array:
        """What the model is applied to (e.g. `batch["image"]`)."""

    def __call__(self, outputs: jax.Array, batch: Batch, *, params: PyTree,
                 aux: PyTree, train: bool) -> tuple[jax.Array, clu_metrics.Collection]:
        """The scalar loss of a batch (differentiated in training) and its
        metrics. `params` allows regularizers; `aux` holds what the step was
        given besides the batch (e.g. a teacher's variables); an optional
        boolean `batch["mask"]` marks the examples that count."""

    def check(self, output_shape: tuple[int, ...], info: dict[str, Any]) -> None:
        """Raises UserError when the model's outputs [batch, ...] cannot be
        scored against the dataset (`info`: e.g. its number of classes)."""


def _masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return values.mean()
    mask = mask.astype(values.dtype)
    return (values * mask).sum() / jnp.maximum(mask.sum(), 1.0)


@dataclasses.dataclass(frozen=True)
class Classification:
    """`image` -> logits [batch, classes], integer `label`, cross-entropy.

    `label_smoothing` mixes the one-hot target with the uniform distribution
    in training; evaluation reports the plain cross-entropy.
    """
    label_smoothing: float = 0.0
    metrics_cls: type[clu_metrics.Collection] = metrics_lib.ClassificationMetrics

    def __post_init__(self):
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={self.label_smoothing} is not in "
                             "[0, 1).")

    def model_input(self, batch: Batch) -> jax.Array:
        return batch["image"]

    def losses(self, logits: jax.Array, labels: jax.Array, train: bool) -> jax.Array:
        """Per-example cross-entropy [batch] (smoothed in training)."""
        if not (train and self.label_smoothing):
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        targets = optax.smooth_labels(
            jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype),
            self.label_smoothing)
        return optax.softmax_cross_entropy(logits, targets)

    def __call__(self, outputs, batch, *, params, aux, train):
        del params, aux
        losses = self.losses(outputs, batch["label"], train)
        mask = batch.get("mask")
        return _masked_mean(losses, mask), self.metrics_cls.single_from_model_output(
            loss=losses, logits=outputs, labels=batch["label"], mask=mask)

    def check(self, output_shape, info):
        classes = info.get("num_classes")
        if classes is not None and output_shape[-1] < classes:
            raise errors.UserError(
                f"The model outputs {output_shape[-1]} classes but the dataset has "
                f"{classes} (labels 0-{classes - 1}); set "
                f"config.model_kwargs.num_classes={classes}.")


@dataclasses.dataclass(frozen=True)
class LanguageModel:
    """Next-token prediction: `tokens` [batch, time + 1] -> logits [batch, time].

    Losses are per token; an optional `mask` [batch, time] drops padding.
    """
    metrics_cls: type[clu_metrics.Collection] = metrics_lib.LanguageModelMetrics

    def model_input(self, batch: Batch) -> jax.Array:
        return batch["tokens"][:, :-1]

    def __call__(self, outputs, batch, *, params, aux, train):
        del params, aux, train
        losses = optax.softmax_cross_entropy_with_integer_labels(
            outputs, batch["tokens"][:, 1:])
        mask = batch.get("mask")
        metrics = self.metrics_cls.single_from_model_output(
            loss=losses.reshape(-1),
            mask=None if mask is None else mask.reshape(-1))
        return _masked_mean(losses, mask), metrics

    def check(self, output_shape, info):
        vocab = info.get("vocab")
        if vocab is not None and output_shape[-1] != len(vocab):
            raise errors.UserError(
                f"config.model_kwargs.vocab_size={output_shape[-1]} but the training "
                f"text has {len(vocab)} distinct characters; set it to that.")


# name -> factory(**config.objective_kwargs); see `create_objective`.
OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "classification": Classification,
    "language_model": LanguageModel,
}  # features add theirs (the assembly registers "distill")


def create_objective(config: ml_collections.ConfigDict, default: str) -> Objective:
    """The objective `config.objective` names (empty: `default`, the dataset's).

    Raises:
      UserError: an unknown name or bad `config.objective_kwargs`.
    """
    name = config.objective or default
    if name not in OBJECTIVES:
        raise errors.UserError(f"Unknown objective {name!r} (config.objective); "
                               f"choose from {sorted(OBJECTIVES)}.")
    try:
        return OBJECTIVES[name](**config.objective_kwargs)
    except (TypeError, ValueError) as e:
        cls = OBJECTIVES[name]
        fields = [f.name for f in dataclasses.fields(cls) if f.init
                  and f.name != "metrics_cls" and not f.metadata.get("provided")
                  ] if dataclasses.is_dataclass(cls) else []
        takes = (f"; it takes {', '.join(fields)}: pass them as "
                 "--config.objective_kwargs=\"{...}\" (a dict replaces the "
                 "config's)") if fields else ""
        message = f"Bad config.objective_kwargs for objective {name!r}: {e}{takes}."
        raise errors.UserError(message) from None
