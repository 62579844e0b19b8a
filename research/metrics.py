"""clu metric collections returned by the step functions."""
import flax
from clu import metrics as clu_metrics


@flax.struct.dataclass
class ClassificationMetrics(clu_metrics.Collection):
    """Mean per-example cross-entropy and top-1 accuracy (masked examples skipped)."""
    loss: clu_metrics.Average.from_output("loss")
    accuracy: clu_metrics.Accuracy
