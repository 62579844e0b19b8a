"""`--mode=eval`: score a checkpoint's model on the eval split, no optimizer."""
import functools
from typing import Any

from absl import logging
import jax
import ml_collections

from research import checkpointing
from research import config_lib
from research import input_pipeline
from research import models
from research import parallel
from research import sharded_data
from research import state as state_lib
from research import steps
from research import tasks
from research import train

PyTree = Any


def restore_variables(config: ml_collections.ConfigDict, workdir: str,
                      step: int | None = None, mesh: jax.sharding.Mesh | None = None,
                      *, with_info: bool = False):
    """The model variables saved in `workdir` at `step` (default: the latest).

    One call for evaluation, sampling and distillation teachers: it reads the
    checkpoint's `model` item only and builds no optimizer. The variables are
    replicated over `mesh` (default: all devices), whatever the device count
    the checkpoint was written with.

    Returns:
      (variables, step), or (variables, dataset_info, step) with `with_info`:
      what the data pipeline saved beside the model, e.g. the vocabulary.
    """
    dataset = input_pipeline.get_dataset(config.dataset)
    model = models.create_model(config.model, **config.model_kwargs)
    abstract = jax.eval_shape(functools.partial(
        state_lib.init_variables, model=model,
        input_shape=(1,) + dataset.input_shape(config),
        input_dtype=dataset.input_dtype), jax.random.key(0))
    mesh = mesh or parallel.create_mesh(config.num_devices)
    variables, info, step = checkpointing.restore_model(
        workdir, checkpointing.with_sharding(abstract, parallel.replicated(mesh)),
        step)
    return (variables, info, step) if with_info else (variables, step)


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             step: int | None = None) -> dict[str, float]:
    """Restores the model variables of `step` (default latest) and evaluates.

    Returns:
      The eval metrics ("eval/loss", "eval/accuracy") over the whole
      `config.eval_split`, and "step".
    """
    config_lib.validate(config)
    dataset = input_pipeline.get_dataset(config.dataset)
    model = models.create_model(config.model, **config.model_kwargs)
    mesh = parallel.create_mesh(config.num_devices)
    parallel.check_divisible("eval_batch_size", config.eval_batch_size, mesh)
    variables, step = restore_variables(config, workdir, step, mesh)
    data = sharded_data.place_eval(dataset.eval_rows(config), config.eval_batch_size,
                                   mesh)
    with jax.set_mesh(mesh):
        totals = jax.jit(functools.partial(
            steps.evaluate_batches, model.apply, task=tasks.get_task(dataset.task),
            preprocess_fn=dataset.preprocess,
            batch_sharding=parallel.batch_sharded(mesh)),
            out_shardings=parallel.replicated(mesh))(variables, data)
    result = {f"eval/{k}": float(v) for k, v in totals.compute().items()}
    logging.info("checkpoint step %d, %s[%s]: %s", step, config.dataset,
                 config.eval_split, train.describe(result, config.eval_split))
    return {**result, "step": step}
