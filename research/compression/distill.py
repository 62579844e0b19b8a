"""Knowledge distillation losses (Hinton et al. 2015).

The teacher's logits are inputs here: the teacher's params stay a separate,
frozen argument of the train step and never enter the student's optimizer.
"""
import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from clu import metrics as clu_metrics

from research import errors

PROVIDED = {"provided": True}  # a field the assembly fills in (`assembly.py`)


def kl_divergence(student_logits: jax.Array, teacher_logits: jax.Array, *,
                  temperature: float = 1.0) -> jax.Array:
    """KL(softmax(teacher / T) || softmax(student / T)) per example.

    Args:
      student_logits: [batch, classes].
      teacher_logits: [batch, classes]; no gradient flows into them.
      temperature: T > 0.

    Returns:
      [batch] float32, >= 0 (up to rounding).
    """
    log_p = jax.nn.log_softmax(
        jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature)
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature)
    p = jnp.exp(log_p)
    # Classes whose teacher probability underflows to 0 contribute 0 (the
    # limit of p log p); the guard also keeps a -inf teacher logit from
    # turning 0 * -inf into nan.
    terms = jnp.where(p > 0, p * (log_p - log_q), 0.0)
    return terms.sum(axis=-1)


def check_options(temperature: float, alpha: float, where: str = "") -> None:
    """Raises UserError unless temperature > 0 and alpha is in [0, 1]."""
    if temperature <= 0:
        raise errors.UserError(f"{where}temperature must be > 0; got {temperature}.")
    if not 0.0 <= alpha <= 1.0:
        raise errors.UserError(f"{where}alpha must be in [0, 1]; got {alpha}.")


def distillation_losses(student_logits: jax.Array, teacher_logits: jax.Array,
                        labels: jax.Array, *, temperature: float, alpha: float
                        ) -> jax.Array:
    """alpha * CE(labels) + (1 - alpha) * T**2 * KL(teacher_T || student_T).

    The T**2 factor keeps the soft term's gradients on the scale of the hard
    term's as T changes (the softened gradients shrink like 1 / T**2).

    Args:
      student_logits: [batch, classes].
      teacher_logits: [batch, classes], from the frozen teacher.
      labels: [batch] integer class ids.
      temperature: T > 0.
      alpha: weight of the cross-entropy with the labels, in [0, 1].

    Returns:
      Per-example losses, [batch] float32 (average them for the step's loss).

    Raises:
      UserError: temperature <= 0 or alpha outside [0, 1].
    """
    check_options(temperature, alpha)
    ce = optax.softmax_cross_entropy_with_integer_labels(
        student_logits.astype(jnp.float32), labels)
    kl = kl_divergence(student_logits, teacher_logits, temperature=temperature)
    return alpha * ce + (1.0 - alpha) * temperature ** 2 * kl


def agreement(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """1.0 where the student's top-1 class equals the teacher's, else 0.0.

    Args:
      student_logits: [batch, classes].
      teacher_logits: [batch, classes].

    Returns:
      [batch] float32 (its mean is the top-1 agreement).
    """
    return (jnp.argmax(student_logits, -1) == jnp.argmax(teacher_logits, -1)
            ).astype(jnp.float32)


@flax.struct.dataclass
class DistillationMetrics(clu_metrics.Collection):
    """The objective's loss, the student's accuracy and its top-1 agreement
    with the teacher (masked examples skipped)."""
    loss: clu_metrics.Average.from_output("loss")
    accuracy: clu_metrics.Accuracy
    agreement: clu_metrics.Average.from_output("agreement")


@dataclasses.dataclass(frozen=True)
class Distillation:
    """Classification (or next-token prediction, where every position is an
    example) against a frozen teacher (a trained run's model).

    The teacher runs in evaluation mode (BatchNorm statistics frozen, no
    dropout) on the same preprocessed and augmented batch as the student
    ("consistent" teaching); its variables come to the step as `aux`, an
    argument, so they are never differentiated, optimized or checkpointed
    with the student. Training minimizes `distillation_losses`; evaluation
    reports the student's plain cross-entropy and accuracy beside the
    agreement.

    Attributes:
      teacher_workdir: a trained run (its config.json and checkpoints).
      temperature: T > 0.
      alpha: the weight of the labels' cross-entropy, in [0, 1].
      teacher_step: the teacher's checkpoint step (0: the latest).
    """
    teacher_workdir: str
    temperature: float = 4.0
    alpha: float = 0.1
    teacher_step: int = 0
    metrics_cls: Any = DistillationMetrics
    # Provided by the assembly from the teacher's workdir, never by a config.
    teacher_model: Any = dataclasses.field(default=None, metadata=PROVIDED)
    teacher_dataset: str = dataclasses.field(default="", metadata=PROVIDED)
    teacher_info: Any = dataclasses.field(default=None, metadata=PROVIDED)

    def __post_init__(self):
        if not self.teacher_workdir:
            raise errors.UserError("objective_kwargs.teacher_workdir is empty: name "
                                   "the workdir of a trained teacher.")
        check_options(self.temperature, self.alpha, "objective_kwargs.")

    def model_input(self, batch):
        # A language model reads the tokens and predicts each next one.
        return batch["tokens"][:, :-1] if "tokens" in batch else batch["image"]

    def check(self, output_shape, info):
        """The teacher must know the student's labels: the same classes."""
        if self.teacher_info != info:
            raise errors.UserError(
                f"The teacher in {self.teacher_workdir!r} was trained on "
                f"{self.teacher_dataset!r} ({self.teacher_info}), not on this run's "
                f"classes ({info}); distil from a teacher of the same dataset.")
        if info.get("num_classes") and output_shape[-1] != info["num_classes"]:
            raise errors.UserError(
                f"The student outputs {output_shape[-1]} classes but the dataset "
                f"has {info['num_classes']}.")

    def __call__(self, outputs, batch, *, params, aux, train):
        del params
        teacher = jax.lax.stop_gradient(self.teacher_model.apply(
            aux["teacher"], self.model_input(batch), train=False))
        mask = batch.get("mask")
        if "tokens" in batch:  # every position an example: [batch * time, vocab]
            labels = batch["tokens"][:, 1:].reshape(-1)
            outputs = outputs.reshape(labels.shape[0], -1)
            teacher = teacher.reshape(labels.shape[0], -1)
            mask = None if mask is None else mask.reshape(-1)
        else:
            labels = batch["label"]
        if train:
            losses = distillation_losses(outputs, teacher, labels,
                                         temperature=self.temperature,
                                         alpha=self.alpha)
        else:
            losses = optax.softmax_cross_entropy_with_integer_labels(outputs, labels)
        weights = jnp.ones_like(losses) if mask is None else mask.astype(losses.dtype)
        loss = (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)
        return loss, self.metrics_cls.single_from_model_output(
            loss=losses, logits=outputs, labels=labels,
            agreement=agreement(outputs, teacher), mask=mask)
