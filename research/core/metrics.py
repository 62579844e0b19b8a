"""clu metric collections returned by the step functions."""
import math

import flax
import jax.numpy as jnp
from clu import metrics as clu_metrics


@flax.struct.dataclass
class ClassificationMetrics(clu_metrics.Collection):
    """Mean per-example cross-entropy and top-1 accuracy (masked examples skipped)."""
    loss: clu_metrics.Average.from_output("loss")
    accuracy: clu_metrics.Accuracy


@flax.struct.dataclass
class BitsPerToken(clu_metrics.Average):
    """Mean loss in bits (the loss is in nats)."""

    def compute(self):
        return super().compute() / math.log(2)


@flax.struct.dataclass
class Perplexity(clu_metrics.Average):
    """exp(mean loss in nats)."""

    def compute(self):
        return jnp.exp(super().compute())


@flax.struct.dataclass
class LanguageModelMetrics(clu_metrics.Collection):
    """Per-token cross-entropy in nats, bits per token and perplexity."""
    loss: clu_metrics.Average.from_output("loss")
    bits_per_char: BitsPerToken.from_output("loss")
    perplexity: Perplexity.from_output("loss")
