"""Knowledge distillation losses (Hinton et al. 2015).

The teacher's logits are inputs here: the teacher's params stay a separate,
frozen argument of the train step and never enter the student's optimizer.
"""
import jax
import jax.numpy as jnp
import optax

from research import errors


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
    if temperature <= 0:
        raise errors.UserError(f"temperature must be > 0; got {temperature}.")
    if not 0.0 <= alpha <= 1.0:
        raise errors.UserError(f"alpha must be in [0, 1]; got {alpha}.")
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
