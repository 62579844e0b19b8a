"""From a config to an `Experiment`: the one module that knows every plug-in.

The core (`research/core/`) declares the interfaces and registries; the
features implement them; this module registers the built-in features, checks
a config against all of them, and builds what every mode starts from
(training, evaluation, sampling, the benchmark). `restore_variables` is the
one call that loads a checkpoint's model (evaluation, sampling, teachers).
"""
import dataclasses
import functools
from typing import Any, NamedTuple

from absl import logging
import flax
from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from research import errors
from research import models
from research.compression import distill
from research.compression import prune
from research.compression import quantize
from research.core import augment
from research.core import checkpointing
from research.core import config_lib
from research.core import experiment as experiment_lib
from research.core import inputs as inputs_lib
from research.core import objectives
from research.core import optimizers
from research.core import schemes
from research.core import state as state_lib
from research.data import input_pipeline
from research.data import inputs as data_inputs
from research.data import streaming
from research.parallel import diloco
from research.parallel import sharded
from research import mesh as mesh_lib
from research.parallel import sync

PyTree = Any

# The built-in plug-ins. A project adds its own the same way, from its code
# (tests/extension_test.py registers a toy scheme and input path).
objectives.OBJECTIVES.setdefault("distill", distill.Distillation)
schemes.SCHEMES.setdefault("sync", sync.Sync.from_config)
schemes.SCHEMES.setdefault("diloco", diloco.Diloco.from_config)
schemes.SCHEMES.setdefault("sharded", sharded.Sharded.from_config)
inputs_lib.INPUTS.setdefault("memory", inputs_lib.InputPath(
    data_inputs.MemoryTrain.open, data_inputs.MemoryEval))
inputs_lib.INPUTS.setdefault("stream", inputs_lib.InputPath(
    data_inputs.StreamTrain.open, data_inputs.StreamEval))
AUTO_INPUT = "auto"  # memory, or stream what would not fit (`streaming.choose`)
# The config's sections beside the core's own (`config_lib.RUN`), each owned
# by the module that reads it.
config_lib.register(optimizers.SECTION, state_lib.SECTION, augment.SECTION,
                    input_pipeline.TEXT_SECTION, streaming.SECTION, prune.SECTION,
                    quantize.SECTION, diloco.SECTION, sharded.SECTION)


def base_config(*optional: str) -> ml_collections.ConfigDict:
    """Every section's defaults (and those of the `optional` sections named:
    "augment" for images, "text" for text): what a config file starts from."""
    return config_lib.base_config(*optional)


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every section of `config` before any data is read or anything
    compiled, and the names it looks up in the registries; raises UserError."""
    config_lib.validate(config)
    _check_choice("model", config.model, models.MODELS)
    _check_choice("dataset", config.dataset, input_pipeline.DATASETS)
    _check_choice("data_parallel.scheme", config.data_parallel.scheme,
                  schemes.SCHEMES)
    if "input" in config:
        _check_choice("input", config.input,
                      {AUTO_INPUT: None, **inputs_lib.INPUTS})
    create_scheme(config)  # checks the scheme's own fields


def _check_choice(field: str, name: str, registry: dict[str, Any]) -> None:
    if name not in registry:
        raise errors.UserError(
            f"Unknown {field} {name!r} (config.{field}); choose from "
            f"{sorted(registry)}.")


def create_scheme(config: ml_collections.ConfigDict) -> schemes.Scheme:
    """The parallel scheme `config.data_parallel.scheme` names."""
    return schemes.SCHEMES[config.data_parallel.scheme](config)


def input_path(config: ml_collections.ConfigDict, dataset: Any, split: str
               ) -> inputs_lib.InputPath:
    """How `split` is read: `config.input`, or for "auto" memory unless the
    split would not fit (`streaming.choose`)."""
    name = config.input if "input" in config else "memory"
    if name in (AUTO_INPUT, "memory", "stream"):
        name = streaming.choose(config, dataset, split)
    return inputs_lib.INPUTS[name]


def build(config: ml_collections.ConfigDict, *, mesh: jax.sharding.Mesh | None = None,
          info: dict[str, Any] | None = None) -> experiment_lib.Experiment:
    """Checks `config` and builds its parts, before any data is placed.

    Args:
      config: the experiment config.
      mesh: the mesh to run on (default: the scheme's over
        `config.num_devices` devices).
      info: the dataset's info if known (e.g. from a checkpoint); else it is
        computed (a text dataset reads its training text for the vocabulary).

    Raises:
      UserError: a bad config, or a model that does not fit the dataset.
    """
    validate(config)
    dataset = input_pipeline.get_dataset(config.dataset)
    scheme = create_scheme(config)
    mesh = mesh or scheme.create_mesh(config.num_devices)
    name = config.objective or dataset.default_objective
    objective = objectives.create_objective(config, dataset.default_objective)
    objective, aux_fn = AUX_PROVIDERS.get(name, lambda o, m: (o, dict))(
        objective, mesh)
    shape = (1,) + dataset.input_shape(config)
    model = models.create_model(config.model, **config.model_kwargs)
    if config.quant.qat:  # QAT: the model under qwix's fake quantization
        impl_fields = [f.name for f in dataclasses.fields(model)
                       if f.name.endswith("_impl")]
        model = quantize.create_qat_model(model)
        quantize.check_traceable(model, jnp.zeros(shape, dataset.input_dtype),
                                 name=config.model, impl_fields=impl_fields)
    mesh_lib.check_divisible("batch_size", config.batch_size, mesh,
                             config.grad_accum_steps)
    mesh_lib.check_divisible("eval_batch_size", config.eval_batch_size, mesh)
    info = dataset.info(config) if info is None else info
    outputs = jax.eval_shape(
        lambda: model.init_with_output(jax.random.key(0),
                                       jnp.zeros(shape, dataset.input_dtype),
                                       train=False)[0])
    objective.check(outputs.shape, info)
    return experiment_lib.Experiment(
        config, dataset, info, objective, model, mesh, scheme,
        input_path=functools.partial(input_path, config, dataset),
        hooks=state_lib.Hooks(**prune.hooks(config.prune)), aux_fn=aux_fn)


def provide_teacher(objective: distill.Distillation, mesh: jax.sharding.Mesh):
    """The distillation objective completed with its teacher's model, and
    the step's `aux` loader (the teacher's variables, replicated)."""
    workdir, step = objective.teacher_workdir, objective.teacher_step or None
    try:
        teacher = config_lib.load_workdir_config(workdir)
    except errors.UserError:
        raise errors.UserError(
            f"objective_kwargs.teacher_workdir={workdir!r} holds no trained run "
            f"(no {config_lib.CONFIG_JSON}); train the teacher there first, or set "
            "--config.objective_kwargs.teacher_workdir to the workdir of a "
            "trained run.") from None
    objective = dataclasses.replace(
        objective, teacher_model=models.create_model(teacher.model,
                                                     **teacher.model_kwargs),
        teacher_dataset=teacher.dataset, teacher_info=input_pipeline.get_dataset(
            teacher.dataset).info(teacher))
    return objective, lambda: {"teacher": restore_variables(
        teacher, workdir, step, mesh).variables}


# objective name -> provider(objective, mesh) -> (objective, aux loader): what
# an objective needs from outside, loaded before it is used.
AUX_PROVIDERS = {"distill": provide_teacher}


class RestoredModel(NamedTuple):
    """A checkpoint's model: its variables, step, dataset info and module."""
    variables: PyTree
    step: int
    info: dict[str, Any]
    model: Any


def restore_variables(config: ml_collections.ConfigDict, workdir: str,
                      step: int | None = None, mesh: jax.sharding.Mesh | None = None,
                      layout: bool = False) -> RestoredModel:
    """The model variables saved in `workdir` at `step` (default: the latest).

    One call for evaluation, sampling and distillation teachers: it reads the
    checkpoint's `model` item only (the evaluation variables: the EMA where
    the run kept one) and builds no optimizer and reads no data. The
    variables are replicated over `mesh` (default: all devices), whatever the
    device count or scheme the checkpoint was written with. With `layout`
    (inference: sampling), a scheme that splits the parameters (FSDP,
    tensor parallelism) has them split as it trains them, over `mesh`
    (default: the scheme's); one that replicates them, on one device.
    """
    dataset = input_pipeline.get_dataset(config.dataset)
    model = models.create_model(config.model, **config.model_kwargs)
    inputs = jnp.zeros((1,) + dataset.input_shape(config), dataset.input_dtype)
    boxed = jax.eval_shape(lambda: dict(model.init(jax.random.key(0), inputs,
                                                   train=False)))
    abstract = nn.meta.unbox(boxed)
    if layout:
        scheme = create_scheme(config)
        try:
            mesh = mesh or scheme.create_mesh(config.num_devices)
        except errors.UserError as e:  # e.g. trained on 8 devices, sampled on 1
            logging.warning("The run's layout does not fit here (%s): the model "
                            "is restored whole on one device.", e)
            layout, mesh = False, mesh_lib.create_mesh(1)
    if layout:
        shaped = _Variables(params=abstract["params"], rest={
            k: v for k, v in abstract.items() if k != "params"})
        prefix = scheme.state_shardings(
            shaped, nn.get_partition_spec(boxed)["params"], mesh)
        target = jax.tree.map(lambda s, subtree: jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), subtree),
            prefix, shaped)
        target = {"params": target.params, **target.rest}
        if all(x.sharding.is_fully_replicated for x in jax.tree.leaves(target)):
            mesh = mesh_lib.create_mesh(1)  # copies would only repeat the work
            target = checkpointing.with_sharding(abstract, mesh_lib.replicated(mesh))
    else:
        mesh = mesh or mesh_lib.create_mesh(config.num_devices)  # any: the model
        target = checkpointing.with_sharding(abstract, mesh_lib.replicated(mesh))
    variables, info, step = checkpointing.restore_model(workdir, target, step)
    return RestoredModel(variables, step, info, model)


@flax.struct.dataclass
class _Variables:
    """Model variables as `Scheme.state_shardings` reads a train state: the
    `params` (laid out by their logical names) and the rest."""
    params: PyTree
    rest: PyTree

