"""`--mode=eval`: score a checkpoint's model on the eval split, no optimizer."""
from absl import logging
import jax
import ml_collections

from research import experiment
from research import parallel
from research import train


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             step: int | None = None) -> dict[str, float]:
    """Restores the model variables of `step` (default latest) and evaluates.

    Returns:
      The eval metrics ("eval/loss", "eval/accuracy", ...) over the whole
      `config.eval_split` (with the config's test-time views), and "step".
    """
    mesh = parallel.create_mesh(config.num_devices)
    restored = experiment.restore_variables(config, workdir, step, mesh)
    # The checkpoint's dataset info (e.g. its vocabulary) saves reading it again.
    exp = experiment.build(config, mesh=mesh, info=restored.info or None)
    evaluation = exp.evaluation()  # in memory, or streamed (config.input)
    with jax.set_mesh(mesh):
        totals = evaluation(restored.variables, exp.aux())
    result = {f"eval/{k}": float(v) for k, v in totals.compute().items()}
    logging.info("checkpoint step %d, %s[%s]: %s", restored.step, config.dataset,
                 config.eval_split, train.describe(result, config.eval_split))
    return {**result, "step": restored.step}
