"""`--mode=eval` and `--mode=plot`: score or draw a checkpoint's model on the
eval split; no optimizer is built."""
import os
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from research import assembly
from research.core import experiment as experiment_lib
from research import mesh as mesh_lib
from research import plots
from research.core import writers

PyTree = Any


def _restore(config: ml_collections.ConfigDict, workdir: str, step: int | None):
    mesh = mesh_lib.create_mesh(config.num_devices)
    restored = assembly.restore_variables(config, workdir, step, mesh)
    # The checkpoint's dataset info (e.g. its vocabulary) saves reading it again.
    exp = assembly.build(config, mesh=mesh, info=restored.info or None)
    return restored, exp, exp.evaluation()  # in memory, or streamed (config.input)


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             step: int | None = None) -> dict[str, float]:
    """Restores the model variables of `step` (default latest) and evaluates.

    Returns:
      The eval metrics ("eval/loss", "eval/accuracy", ...) over the whole
      `config.eval_split` (with the config's test-time views), and "step".
    """
    restored, exp, evaluation = _restore(config, workdir, step)
    with jax.set_mesh(exp.mesh):
        totals = evaluation(restored.variables, exp.aux(), final=True)
    result = {f"eval/{k}": float(v) for k, v in totals.compute().items()}
    logging.info("checkpoint step %d, %s[%s]: %s", restored.step, config.dataset,
                 config.eval_split, writers.describe(result, config.eval_split))
    return {**result, "step": restored.step}


def predictions(exp: experiment_lib.Experiment, variables: PyTree,
                data: dict[str, jax.Array]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, predicted classes) of every example of a placed eval split,
    on the host; padding removed."""
    with jax.set_mesh(exp.mesh):
        predicted = exp.predict_fn()(variables, data)
    arrays = {"predicted": predicted, "label": data["label"], "mask": data["mask"]}
    if jax.process_count() > 1:
        arrays = multihost_utils.process_allgather(arrays, tiled=True)
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    return arrays["label"][arrays["mask"]], arrays["predicted"][arrays["mask"]]


def write_plots(exp: experiment_lib.Experiment, variables: PyTree,
                data: dict[str, jax.Array] | None, workdir: str) -> list[str]:
    """The run's curves and, for classifiers, the eval split's confusion
    matrix, as PNGs in `<workdir>/plots/` (process 0 writes them). `data`:
    the placed eval split; None (a streamed one) skips the matrix."""
    paths = []
    if data is None:
        logging.info("The eval split is streamed: no confusion matrix.")
    elif "label" in data:
        labels, predicted = predictions(exp, variables, data)
        num_classes = exp.info.get("num_classes") or int(labels.max()) + 1
        names = exp.info.get("class_names") or [str(i) for i in range(num_classes)]
        if jax.process_index() == 0:
            paths.append(plots.plot_confusion_matrix(
                plots.confusion_matrix(labels, predicted, num_classes), names,
                os.path.join(workdir, plots.PLOTS_DIR, "confusion_matrix.png")))
    if jax.process_index() == 0:
        paths += plots.plot_run(workdir)
    return paths


def plot(config: ml_collections.ConfigDict, workdir: str,
         step: int | None = None) -> list[str]:
    """`--mode=plot`: the plots of `write_plots` for an existing workdir."""
    restored, exp, evaluation = _restore(config, workdir, step)
    return write_plots(exp, restored.variables, evaluation.data, workdir)
