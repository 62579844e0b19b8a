"""What a config describes, built: the parts every mode (training, evaluation,
sampling, the benchmark) starts from, and the one place where the train
chunks and the evaluation functions are jitted.

The parts come from registries and plug-ins (`research/assembly.py` builds
an `Experiment` from a config); nothing here knows which scheme, input path
or compression feature it was given.
"""
import dataclasses
import functools
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from flax import linen as nn

from research.core import augment
from research.core import inputs as inputs_lib
from research.core import schemes
from research.core import state as state_lib
from research.core import steps
from research import mesh as mesh_lib

PyTree = Any
DATA_INIT_EXAMPLES = 5000  # what models that initialise from data get


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A config's parts, built and checked; no data on the devices yet.

    Attributes:
      config: the experiment config.
      dataset: its dataset spec (`data/input_pipeline.DatasetSpec`).
      info: the dataset's info (e.g. the vocabulary), computed once.
      objective: its `objectives.Objective`.
      model: the linen module.
      mesh: the device mesh it runs on.
      scheme: how training is laid out over the mesh (`schemes.Scheme`).
      input_path: `(split) -> InputPath`: how each split is read.
      hooks: what features plug into the train state (`state.Hooks`).
      aux_fn: `() -> aux`: the step's extra inputs (e.g. a teacher's
        variables), loaded on first use.
    """
    config: ml_collections.ConfigDict
    dataset: Any
    info: dict[str, Any]
    objective: Any
    model: nn.Module
    mesh: jax.sharding.Mesh
    scheme: schemes.Scheme
    input_path: Callable[[str], inputs_lib.InputPath]
    hooks: state_lib.Hooks = state_lib.Hooks()
    aux_fn: Callable[[], PyTree] = dict

    def input_shape(self) -> tuple[int, ...]:
        """A model input's shape with a batch axis of 1."""
        return (1,) + self.dataset.input_shape(self.config)

    def train_input(self) -> inputs_lib.TrainInput:
        split = self.config.train_split
        return self.input_path(split).train(self, split)

    def eval_input(self) -> inputs_lib.EvalInput:
        split = self.config.eval_split
        return self.input_path(split).eval(self, split)

    def create_state(self, rng: jax.Array, total_steps: int,
                     steps_per_epoch: int = 0,
                     source: inputs_lib.TrainInput | None = None):
        """The initial train state, created replicated and laid out by the
        scheme. A model with `init_from_data(variables, inputs)` (e.g.
        airbench's whitening layer) gets the model inputs of the first
        `DATA_INIT_EXAMPLES` training examples of `source`."""
        inputs = None
        if source is not None and hasattr(self.model, "init_from_data"):
            pipeline = self.pipeline(train=False)
            inputs = source.first_examples(
                min(DATA_INIT_EXAMPLES, source.num_examples),
                lambda rows: self.objective.model_input(pipeline.preprocess_fn(rows)))
        shape, dtype = self.input_shape(), self.dataset.input_dtype

        def create(rng, inputs):
            variables = state_lib.init_variables(rng, self.model, shape, dtype)
            if inputs is not None:
                variables = self.model.init_from_data(variables, inputs)
            return state_lib.create_train_state(
                rng, self.config, self.model, shape, total_steps=total_steps,
                steps_per_epoch=steps_per_epoch, variables=variables,
                hooks=self.hooks)

        return self._create(create, rng, inputs, total_steps=total_steps)

    def _create(self, create, *args, total_steps: int):
        """`create(*args)`, a new `TrainState`, made directly in the layout
        the scheme asks for (never whole on one device if it is sharded)."""
        shardings = self.scheme.state_shardings(
            jax.eval_shape(create, *args), self.param_specs(), self.mesh)
        state = jax.jit(create, out_shardings=shardings)(*args)
        return self.scheme.distribute(state, total_steps, self.mesh)

    def param_specs(self) -> PyTree:
        """The parameters' logical axis names, as PartitionSpecs of names
        (`PartitionSpec()` for a parameter the model does not name)."""
        variables = jax.eval_shape(lambda: self.model.init(
            jax.random.key(0), jax.numpy.zeros(self.input_shape(),
                                               self.dataset.input_dtype)))
        return nn.get_partition_spec(variables)["params"]

    def restart_state(self, state, variables: PyTree, total_steps: int):
        """`state` with the model's variables replaced (e.g. by a trained
        run's) and the optimizer state and extras made anew from them."""
        template = self.scheme.train_state(state)
        return self._create(lambda v: state_lib.TrainState.create(
            apply_fn=template.apply_fn, variables=v, tx=template.tx,
            extra_fns=template.extra_fns, update_hooks=template.update_hooks),
            variables, total_steps=total_steps)

    def aux(self) -> PyTree:
        """The step's extra inputs (e.g. a teacher's variables), replicated."""
        return self.aux_fn()

    def empty_metrics(self) -> PyTree:
        """The objective's metrics with nothing merged, on the devices."""
        return mesh_lib.put_replicated(self.objective.metrics_cls.empty(), self.mesh)

    def carry(self, state) -> steps.Carry:
        """What a train chunk starts from: `state`, no metrics, no bad step."""
        return steps.Carry(state, self.empty_metrics(),
                           mesh_lib.put_replicated(np.int32(-1), self.mesh))

    def state_metrics(self, state) -> dict[str, float]:
        """Scalars the state reports besides the loss (features' hooks)."""
        metrics = {}
        for fn in self.hooks.metrics:
            metrics.update(fn(self.scheme.train_state(state)))
        return metrics

    def pipeline(self, *, train: bool, final: bool = False) -> steps.Pipeline:
        """How the steps turn rows into batches and score them (`final`: with
        the last evaluation's test-time augmentation)."""
        options = self.config.augment if "augment" in self.config else None
        train_augment = None
        if not augment.is_identity(options):
            train_augment = functools.partial(augment.augment_batch, options=options)
        elif self.config.get("window_jitter"):
            train_augment = functools.partial(augment.crop_windows,
                                              length=self.config.seq_len + 1)
        return steps.Pipeline(
            objective=self.objective, preprocess_fn=self.dataset.preprocess,
            augment=train_augment if train else None,
            views=augment.views(None if train else options, final),
            batch_sharding=mesh_lib.batch_sharded(self.mesh))

    def train_chunk(self, source: inputs_lib.TrainInput, num_steps: int, state):
        """`steps.train_chunk` of `num_steps` steps on `source`'s inputs,
        jitted as the trainer runs it: `(carry, inputs, keys, aux) -> carry`,
        the carry donated and `state`'s layout kept."""
        replicated = mesh_lib.replicated(self.mesh)
        step_fn = functools.partial(
            self.scheme.train_step, mesh=self.mesh,
            inner_step=functools.partial(steps.train_step, objective=self.objective))
        return jax.jit(self.scheme.trace(functools.partial(
            steps.train_chunk, num_steps=num_steps,
            steps_per_epoch=source.steps_per_epoch, batch_fn=source.batch,
            step_fn=step_fn, pipeline=self.pipeline(train=True))),
            out_shardings=steps.Carry(self.scheme.shardings(state, self.mesh),
                                      replicated, replicated), donate_argnums=(0,))

    def eval_fn(self, final: bool = False):
        """`(variables, data, aux) -> metrics` over a whole placed split
        (`final`: with the last evaluation's test-time augmentation)."""
        return jax.jit(functools.partial(
            steps.evaluate_batches, self.model.apply,
            pipeline=self.pipeline(train=False, final=final)),
            out_shardings=mesh_lib.replicated(self.mesh))

    def predict_fn(self):
        """`(variables, data) -> predicted classes` over a whole placed split."""
        return jax.jit(functools.partial(
            steps.predict_batches, self.model.apply,
            pipeline=self.pipeline(train=False)),
            out_shardings=mesh_lib.replicated(self.mesh))

    def eval_batch_fn(self, final: bool = False):
        """`(variables, totals, batch, aux) -> totals`, one streamed batch more."""
        return jax.jit(functools.partial(
            steps.eval_merge, self.model.apply,
            pipeline=self.pipeline(train=False, final=final)),
            out_shardings=mesh_lib.replicated(self.mesh), donate_argnums=(1,))

    def evaluation(self) -> "Evaluation":
        """The evaluation split, read as `config.input` says, with its scorer."""
        return Evaluation(self)


class Evaluation:
    """The evaluation split and its compiled scorers. Every example counts
    once, whichever input path reads the split. The final evaluation of a
    run may use costlier test-time views (`augment.final_eval_views`):
    `__call__(..., final=True)`."""

    def __init__(self, exp: Experiment):
        self.exp = exp
        self.input = exp.eval_input()
        self.fns = {}  # final -> compiled
        # The final evaluation's function is the usual one if its views are.
        self.final_differs = exp.pipeline(train=False, final=True).views != (
            exp.pipeline(train=False).views)

    @property
    def data(self) -> PyTree:
        """The split as placed on the devices (None if it is streamed)."""
        return self.input.data

    def compile(self, variables: PyTree, aux: PyTree, final: bool = False) -> None:
        """Compiles ahead of time (call under `jax.set_mesh`)."""
        final = final and self.final_differs
        if final not in self.fns:
            self.fns[final] = self.input.compile(variables, aux, final)

    def __call__(self, variables: PyTree, aux: PyTree, final: bool = False):
        """The metrics collection over the whole split."""
        final = final and self.final_differs
        if final not in self.fns:
            with jax.set_mesh(self.exp.mesh):
                self.compile(variables, aux, final)
        return self.fns[final](variables, aux)
