"""One build for every mode: a config becomes dataset, objective, model and mesh.

Training, evaluation, sampling and the benchmark all start from `build`; the
compiled train chunks and the evaluation function are made here and nowhere
else. `restore_variables` is the one call that loads a checkpoint's model
(for evaluation, sampling and distillation teachers).
"""
import dataclasses
import functools
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from research import augment
from research import checkpointing
from research import diloco
from research import config_lib
from research import input_pipeline
from research import models
from research import objectives
from research import parallel
from research import sharded_data
from research import state as state_lib
from research import steps
from research import streaming
from research.compression import quantize
from research.models import impl

PyTree = Any
DATA_INIT_EXAMPLES = 5000  # what models that initialise from data get


@dataclasses.dataclass(frozen=True)
class Experiment:
    """What a config describes, built and checked; no data on devices yet.

    Attributes:
      config: the experiment config.
      dataset: its `input_pipeline.DatasetSpec`.
      info: the dataset's info (e.g. the vocabulary), computed once.
      objective: its `objectives.Objective`.
      model: the linen module.
      mesh: the device mesh it runs on.
    """
    config: ml_collections.ConfigDict
    dataset: input_pipeline.DatasetSpec
    info: dict[str, Any]
    objective: objectives.Objective
    model: nn.Module
    mesh: jax.sharding.Mesh

    def create_state(self, rng: jax.Array, total_steps: int,
                     steps_per_epoch: int = 0, data: PyTree = None
                     ) -> state_lib.TrainState:
        """The initial train state, created replicated on every device.

        A model with `init_from_data(variables, inputs)` (e.g. airbench's
        whitening layer) gets the model inputs of the first
        `DATA_INIT_EXAMPLES` training examples from `data` (placed rows).
        """
        shape = input_shape(self.config, self.dataset)
        inputs = None
        if data is not None and hasattr(self.model, "init_from_data"):
            n = min(DATA_INIT_EXAMPLES, data["row_of"].shape[0])
            pipeline = self.pipeline(train=False)
            inputs = jax.jit(lambda d: self.objective.model_input(
                self.dataset.preprocess(pipeline.gather_fn(
                    d["rows"], d["row_of"][:n]))))(data)

        def create(rng, inputs):
            variables = state_lib.init_variables(rng, self.model, shape,
                                                 self.dataset.input_dtype)
            if inputs is not None:
                variables = self.model.init_from_data(variables, inputs)
            return state_lib.create_train_state(
                rng, self.config, self.model, shape, total_steps=total_steps,
                steps_per_epoch=steps_per_epoch, variables=variables)

        return self._distribute(jax.jit(
            create, out_shardings=parallel.replicated(self.mesh))(rng, inputs),
            total_steps)

    def _distribute(self, state: state_lib.TrainState, total_steps: Any):
        """`state` as the data-parallel scheme holds it: replicated (sync), or
        one copy per replica beside the outer model (`diloco.DilocoState`,
        which syncs after step `total_steps` too)."""
        opts = diloco.options(self.config)
        if opts is None:
            return state
        return jax.jit(lambda s, t: diloco.create(s, opts, t),
                       out_shardings=diloco.shardings(opts, self.mesh))(
                           state, total_steps)

    def restart_state(self, state, variables: PyTree):
        """`state` with the model's variables replaced (e.g. by a trained
        run's) and the optimizer state and extras made anew from them."""
        is_diloco = isinstance(state, diloco.DilocoState)
        template = state.inner if is_diloco else state
        return self._distribute(jax.jit(lambda v: state_lib.TrainState.create(
            apply_fn=template.apply_fn, variables=v, tx=template.tx,
            extra_fns=template.extra_fns),
            out_shardings=parallel.replicated(self.mesh))(variables),
            state.final_step if is_diloco else 0)

    def _chunk_shardings(self):
        """Of a train chunk's outputs (state, metrics, bad step)."""
        replicated = parallel.replicated(self.mesh)
        opts = diloco.options(self.config)
        if opts is None:
            return replicated
        return (diloco.shardings(opts, self.mesh), replicated, replicated)

    def _step_fn(self, fn):
        """`fn` as a train chunk traces it: under DiLoCo, with XLA's
        convolutions (the kernels' shard_map is not written for the vmap
        over replicas)."""
        if diloco.options(self.config) is None or impl.kernels() is None:
            return fn

        def traced_with_xla(*args, **kwargs):
            with impl.kernels().xla_only():
                return fn(*args, **kwargs)
        return traced_with_xla

    def pipeline(self, *, train: bool, final: bool = False) -> steps.Pipeline:
        """How the steps turn rows into batches and score them (`final`: with
        the last evaluation's test-time augmentation)."""
        options = self.config.augment if "augment" in self.config else None
        train_augment = None if augment.is_identity(options) else options
        return steps.Pipeline(
            objective=self.objective, preprocess_fn=self.dataset.preprocess,
            augment=train_augment if train else None,
            views=augment.views(None if train else options, final),
            gather_fn=functools.partial(sharded_data.gather_rows, mesh=self.mesh),
            batch_sharding=parallel.batch_sharded(self.mesh))

    def train_chunk(self, num_steps: int, batch_size: int | None = None):
        """`steps.train_steps` jitted as the trainer runs it: state and metrics
        donated, batches split over the mesh, outputs replicated."""
        return jax.jit(self._step_fn(functools.partial(
            steps.train_steps, num_steps=num_steps,
            batch_size=batch_size or self.config.batch_size,
            grad_accum_steps=self.config.grad_accum_steps,
            pipeline=self.pipeline(train=True))),
            out_shardings=self._chunk_shardings(), donate_argnums=(0, 1, 2))

    def stream_chunk(self, steps_per_epoch: int):
        """`steps.stream_steps` jitted as the trainer runs it on streamed
        batches (their chunk's length is the step count): state and metrics
        donated, outputs replicated."""
        return jax.jit(self._step_fn(functools.partial(
            steps.stream_steps, steps_per_epoch=steps_per_epoch,
            grad_accum_steps=self.config.grad_accum_steps,
            pipeline=self.pipeline(train=True))),
            out_shardings=self._chunk_shardings(), donate_argnums=(0, 1, 2))

    def eval_fn(self, final: bool = False):
        """`(variables, data, aux) -> metrics` over a whole placed split
        (`final`: with the last evaluation's test-time augmentation)."""
        return jax.jit(functools.partial(
            steps.evaluate_batches, self.model.apply,
            pipeline=self.pipeline(train=False, final=final)),
            out_shardings=parallel.replicated(self.mesh))

    def predict_fn(self):
        """`(variables, data) -> predicted classes` over a whole placed split."""
        return jax.jit(functools.partial(
            steps.predict_batches, self.model.apply,
            pipeline=self.pipeline(train=False)),
            out_shardings=parallel.replicated(self.mesh))

    def eval_batch_fn(self, final: bool = False):
        """`(variables, totals, batch, aux) -> totals`, one streamed batch more."""
        return jax.jit(functools.partial(
            steps.eval_merge, self.model.apply,
            pipeline=self.pipeline(train=False, final=final)),
            out_shardings=parallel.replicated(self.mesh), donate_argnums=(1,))

    def aux(self) -> PyTree:
        """The step's extra inputs (e.g. a teacher's variables), replicated."""
        load = getattr(self.objective, "load_aux", None)
        return {} if load is None else load(self.mesh)

    def evaluation(self) -> "Evaluation":
        """The evaluation split, in memory or streamed, with its scorer."""
        return Evaluation(self)

    def place_eval(self) -> dict[str, jax.Array]:
        """The evaluation split on the devices, in `eval_fn`'s layout."""
        rows = self.dataset.eval_rows(self.config, self.info)
        return sharded_data.place_eval(rows, self.config.eval_batch_size, self.mesh)


class Evaluation:
    """The evaluation split and the compiled functions that score it: placed
    whole on the devices (`config.input` "memory"), or streamed a batch at a
    time, each process reading its rows of every batch ("stream"; a split
    too large for memory, see `streaming.choose`). Both score every example
    once; accuracy agrees exactly, the loss up to summation order. The final
    evaluation of a run may use costlier test-time views
    (`augment.final_eval_views`): `__call__(..., final=True)`."""

    def __init__(self, exp: Experiment):
        self.exp = exp
        config = exp.config
        self.mode = streaming.choose(config, exp.dataset, config.eval_split)
        self.fns = {}  # final -> compiled
        self.data = None
        if self.mode == "memory":
            self.data = exp.place_eval()
        else:
            self.source = streaming.open_source(config, exp.dataset, config.eval_split)
            logging.info("Evaluation streams %s: %d examples.",
                         self.source.description, self.source.num_examples)
        # The final evaluation's function is the usual one if its views are.
        self.final_differs = exp.pipeline(train=False, final=True).views != (
            exp.pipeline(train=False).views)

    def compile(self, variables: PyTree, aux: PyTree, final: bool = False) -> None:
        """Compiles ahead of time (call under `jax.set_mesh`)."""
        final = final and self.final_differs
        if final in self.fns:
            return
        if self.mode == "memory":
            self.fns[final] = self.exp.eval_fn(final).lower(
                variables, self.data, aux).compile()
            return
        batch = streaming.batch_spec(
            self.source.features, self.exp.config.eval_batch_size, self.exp.mesh,
            extra={"mask": ((), np.dtype(bool))})
        self.fns[final] = self.exp.eval_batch_fn(final).lower(
            variables, self._empty(), batch, aux).compile()

    def _empty(self) -> PyTree:
        return parallel.put_replicated(self.exp.objective.metrics_cls.empty(),
                                       self.exp.mesh)

    def __call__(self, variables: PyTree, aux: PyTree, final: bool = False):
        """The metrics collection over the whole split."""
        final = final and self.final_differs
        if final not in self.fns:
            with jax.set_mesh(self.exp.mesh):
                self.compile(variables, aux, final)
        fn = self.fns[final]
        if self.mode == "memory":
            return fn(variables, self.data, aux)
        totals, config = self._empty(), self.exp.config
        for batch in streaming.eval_batches(self.source, config.eval_batch_size,
                                            self.exp.mesh, config.stream):
            totals = fn(variables, totals, batch, aux)
        reads, index_sum = self.source.counter.take()
        logging.info("process %d of %d read %d records of %s for evaluation "
                     "(example numbers sum to %d)", jax.process_index(),
                     jax.process_count(), reads, self.source.description, index_sum)
        return totals


def input_shape(config: ml_collections.ConfigDict,
                dataset: input_pipeline.DatasetSpec) -> tuple[int, ...]:
    """A model input's shape with a batch axis of 1."""
    return (1,) + dataset.input_shape(config)


def build(config: ml_collections.ConfigDict, *, mesh: jax.sharding.Mesh | None = None,
          info: dict[str, Any] | None = None) -> Experiment:
    """Checks `config` and builds its parts, before any data is placed.

    Args:
      config: the experiment config.
      mesh: the mesh to run on (default: `config.num_devices` devices).
      info: the dataset's info if known (e.g. from a checkpoint); else it is
        computed (a text dataset reads its training text for the vocabulary).

    Raises:
      UserError: a bad config, or a model that does not fit the dataset.
    """
    config_lib.validate(config)
    dataset = input_pipeline.get_dataset(config.dataset)
    objective = objectives.create_objective(config, dataset.default_objective)
    model = models.create_model(config.model, **config.model_kwargs)
    if config.quant.qat:
        impl_fields = [f.name for f in dataclasses.fields(model)
                       if f.name.endswith("_impl")]
        model = quantize.create_qat_model(model)
        quantize.check_traceable(
            model, jnp.zeros(input_shape(config, dataset), dataset.input_dtype),
            name=config.model, impl_fields=impl_fields)
    mesh = mesh or parallel.create_mesh(config.num_devices, diloco.replicas(config))
    parallel.check_divisible("batch_size", config.batch_size, mesh,
                             config.grad_accum_steps)
    parallel.check_divisible("eval_batch_size", config.eval_batch_size, mesh)
    info = dataset.info(config) if info is None else info
    shape = input_shape(config, dataset)
    outputs = jax.eval_shape(
        lambda: model.init_with_output(jax.random.key(0),
                                       jnp.zeros(shape, dataset.input_dtype),
                                       train=False)[0])
    objective.check(outputs.shape, info)
    return Experiment(config, dataset, info, objective, model, mesh)


class RestoredModel(NamedTuple):
    """A checkpoint's model: its variables, step and dataset info."""
    variables: PyTree
    step: int
    info: dict[str, Any]


def restore_variables(config: ml_collections.ConfigDict, workdir: str,
                      step: int | None = None, mesh: jax.sharding.Mesh | None = None
                      ) -> RestoredModel:
    """The model variables saved in `workdir` at `step` (default: the latest).

    One call for evaluation, sampling and distillation teachers: it reads the
    checkpoint's `model` item only (the evaluation variables: the EMA where
    the run kept one) and builds no optimizer and reads no data. The
    variables are replicated over `mesh` (default: all devices), whatever the
    device count the checkpoint was written with.
    """
    dataset = input_pipeline.get_dataset(config.dataset)
    model = models.create_model(config.model, **config.model_kwargs)
    abstract = jax.eval_shape(functools.partial(
        state_lib.init_variables, model=model,
        input_shape=input_shape(config, dataset),
        input_dtype=dataset.input_dtype), jax.random.key(0))
    mesh = mesh or parallel.create_mesh(config.num_devices)  # any: the model alone
    variables, info, step = checkpointing.restore_model(
        workdir, checkpointing.with_sharding(abstract, parallel.replicated(mesh)),
        step)
    return RestoredModel(variables, step, info)
