"""The train state, its checkpoint items, state extras and optimizers.

Everything that changes in training is one pytree, `TrainState`: params, the
model's other collections (`model_state`: BatchNorm statistics, ...), the
optimizer state (which also holds anything an optimizer wrapper keeps, such
as pruning masks) and `extras`, state that the config declares beside them
(e.g. an exponential moving average of the weights). `checkpoint_items` and
`restore_items` map it to and from the checkpoint, for save and restore alike.
"""
import dataclasses
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn
from flax import struct

from research import errors
from research.core import config_lib
from research.core import optimizers

PyTree = Any


class Extra(Protocol):
    """State kept beside the weights, updated after every optimizer step."""
    name: str

    def init(self, variables: PyTree) -> PyTree:
        """The initial value, from the model's initial variables."""

    def update(self, value: PyTree, state: "TrainState"
               ) -> tuple[PyTree, "TrainState"]:
        """The value after the step that produced `state`, and the state (an
        extra may change it: lookahead pulls the weights back)."""

    def eval_variables(self, value: PyTree) -> PyTree | None:
        """The variables evaluation should use instead of the state's, or None."""


@dataclasses.dataclass(frozen=True)
class Ema:
    """Exponential moving average of all model variables, evaluated in place of
    them: ema <- ema + (1 - decay) * (variables - ema) after every step."""
    decay: float
    name: str = "ema"

    def init(self, variables):
        return jax.tree.map(jnp.copy, variables)

    def update(self, value, state):
        return jax.tree.map(lambda e, v: e + (1.0 - self.decay) * (v - e),
                            value, state.variables), state

    def eval_variables(self, value):
        return value


@dataclasses.dataclass(frozen=True)
class Lookahead:
    """Slow weights that the fast ones are pulled back to (airbench's
    lookahead): every `every` steps the slow copy moves towards the weights,
    slow <- slow + (1 - d) (weights - slow), and the weights are set to it.
    d = decay**every * (step / total)**3 grows from 0 to decay**every over
    the run; at the last step the weights become the slow copy (d = 1).
    BatchNorm statistics are averaged with the weights."""
    every: int
    decay: float
    total_steps: int
    name: str = "lookahead"

    def init(self, variables):
        return jax.tree.map(jnp.copy, variables)

    def update(self, value, state):
        step = state.step
        last = step >= self.total_steps
        due = (step % self.every == 0) | last
        d = jnp.where(last, 1.0, self.decay ** self.every
                      * (step / self.total_steps) ** 3)
        slow = jax.tree.map(
            lambda s, v: jnp.where(due, s + (1.0 - d) * (v - s), s).astype(s.dtype),
            value, state.variables)
        weights = jax.tree.map(lambda s, v: jnp.where(due, s, v), slow,
                               state.variables)
        return slow, state.replace(
            params=weights["params"],
            model_state={k: v for k, v in weights.items() if k != "params"})

    def eval_variables(self, value):
        del value
        return None  # the weights themselves, pulled back every few steps


def create_extras(config: ml_collections.ConfigDict, total_steps: int = 0
                  ) -> tuple[Extra, ...]:
    """The extras the config switches on."""
    if not 0.0 <= config.ema_decay < 1.0:
        raise errors.UserError(
            f"config.ema_decay must be in [0, 1) (0: off), got {config.ema_decay}.")
    options = config.lookahead
    if options.every < 0 or not 0.0 < options.decay <= 1.0:
        raise errors.UserError("config.lookahead needs every >= 0 (0: off) and "
                               "0 < decay <= 1.")
    extras = (Ema(config.ema_decay),) if config.ema_decay else ()
    if options.every:
        extras += (Lookahead(options.every, options.decay, max(total_steps, 1)),)
    return extras


@dataclasses.dataclass(frozen=True)
class Hooks:
    """What features plug into the train state (the assembly builds them
    from the config; the core knows none of the features).

    Attributes:
      optimizer: `(tx, total_steps) -> tx` wrappers, the last outermost.
      after_update: `state -> state` after each update and its extras.
      metrics: `state -> {name: value}` logged with the train metrics.
    """
    optimizer: tuple[Callable[..., Any], ...] = ()
    after_update: tuple[Callable[[Any], Any], ...] = ()
    metrics: tuple[Callable[[Any], dict[str, float]], ...] = ()


class TrainState(struct.PyTreeNode):
    """Step, params, the model's other collections, optimizer state, extras."""
    step: jax.Array
    params: PyTree
    model_state: PyTree  # {"batch_stats": ...}; {} for models without any
    opt_state: PyTree
    extras: dict[str, PyTree]  # {extra.name: value}
    apply_fn: Callable[..., Any] = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    extra_fns: tuple[Extra, ...] = struct.field(pytree_node=False, default=())
    # Features' `state -> state` after each update (pruning re-masks).
    update_hooks: tuple[Callable[["TrainState"], "TrainState"], ...] = struct.field(
        pytree_node=False, default=())

    @classmethod
    def create(cls, *, apply_fn, variables: PyTree, tx, extra_fns=(),
               update_hooks=()) -> "TrainState":
        params = variables["params"]
        model_state = {k: v for k, v in variables.items() if k != "params"}
        return cls(step=jnp.zeros((), jnp.int32), params=params,
                   model_state=model_state, opt_state=tx.init(params),
                   extras={e.name: e.init(variables) for e in extra_fns},
                   apply_fn=apply_fn, tx=tx, extra_fns=tuple(extra_fns),
                   update_hooks=tuple(update_hooks))

    @property
    def variables(self) -> dict[str, PyTree]:
        """What `apply_fn` takes in training."""
        return {"params": self.params, **self.model_state}

    @property
    def eval_variables(self) -> dict[str, PyTree]:
        """What evaluation uses and a checkpoint's `model` item holds: the
        variables, or what an extra puts in their place (e.g. the EMA)."""
        replaced = self._replacement()
        return self.variables if replaced is None else replaced

    def _replacement(self) -> PyTree | None:
        for extra in self.extra_fns:
            replaced = extra.eval_variables(self.extras[extra.name])
            if replaced is not None:
                return replaced
        return None

    def apply_gradients(self, grads: PyTree, model_state: PyTree) -> "TrainState":
        """One optimizer step; then every extra is updated, then the hooks run."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        state = self.replace(step=self.step + 1,
                             params=optax.apply_updates(self.params, updates),
                             model_state=model_state, opt_state=opt_state)
        for extra in self.extra_fns:
            value, state = extra.update(state.extras[extra.name], state)
            state = state.replace(extras={**state.extras, extra.name: value})
        for hook in self.update_hooks:
            state = hook(state)
        return state


def checkpoint_items(state: TrainState, loop: PyTree) -> dict[str, PyTree]:
    """The checkpoint of `state` and the loop's running metrics (`loop`).

    `model` holds the evaluation variables alone, so evaluation, sampling and
    teachers restore them without an optimizer; `train` holds the rest.
    (A parallel scheme maps its own state: `Scheme.checkpoint_items`.)
    """
    train = {"step": state.step, "opt_state": state.opt_state, "loop": loop}
    if state.extras:
        train["extras"] = state.extras
    if state._replacement() is not None:  # pylint: disable=protected-access
        train["variables"] = state.variables  # the model item holds others
    return {"model": state.eval_variables, "train": train}


def restore_items(state: TrainState, items: dict[str, PyTree]
                  ) -> tuple[TrainState, PyTree]:
    """`state` (the template) with the restored `items`; returns it and the
    loop's running metrics."""
    train = items["train"]
    variables = train.get("variables", items["model"])
    state = state.replace(
        step=train["step"], params=variables["params"],
        model_state={k: v for k, v in variables.items() if k != "params"},
        opt_state=train["opt_state"], extras=train.get("extras", {}))
    return state, train["loop"]


def init_variables(rng: jax.Array, model: nn.Module,
                   input_shape: tuple[int, ...], input_dtype: Any = jnp.float32
                   ) -> dict[str, PyTree]:
    """Model variables for inputs of `input_shape` (batch axis included);
    logical axis names (`nn.with_logical_partitioning`) are dropped here:
    the scheme reads them from the model (`Experiment.param_specs`)."""
    return dict(nn.meta.unbox(model.init(rng, jnp.zeros(input_shape, input_dtype),
                                         train=False)))


def create_train_state(rng: jax.Array, config: ml_collections.ConfigDict,
                       model: nn.Module, input_shape: tuple[int, ...],
                       input_dtype: Any = jnp.float32, total_steps: int = 0,
                       steps_per_epoch: int = 0, variables: PyTree = None,
                       hooks: "Hooks | None" = None) -> TrainState:
    """Initialises the model, the optimizer and the extras the config names.

    Args:
      rng: the init key.
      config: names the optimizer, its schedule and the extras.
      model: the linen module.
      input_shape: a model input's shape, batch axis included.
      input_dtype: its dtype (int32 for tokens).
      total_steps: the run's length, for decaying schedules.
      steps_per_epoch: for parameter groups trained for some epochs only.
      variables: the model's variables if already made (else from `rng`).
      hooks: what features add (an optimizer wrapper, update hooks).
    """
    hooks = hooks or Hooks()
    if variables is None:
        variables = init_variables(rng, model, input_shape, input_dtype)
    return TrainState.create(
        apply_fn=model.apply, variables=variables,
        tx=optimizers.create_optimizer(config, total_steps, steps_per_epoch,
                                       hooks.optimizer),
        extra_fns=create_extras(config, total_steps),
        update_hooks=hooks.after_update)


def count_params(params: PyTree) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def _check(config: ml_collections.ConfigDict) -> None:
    create_extras(config)  # raises for bad fields


def _run_length(config: ml_collections.ConfigDict) -> list[str]:
    return ["lookahead"] if config.lookahead.every else []


# The extras: state kept beside the weights (Ema, Lookahead above).
SECTION = config_lib.Section("extras", {
    "ema_decay": 0.0,             # evaluate an EMA of the weights; 0: off
    # Lookahead (airbench): every `every` steps pull the weights to a slow copy.
    "lookahead": {"every": 0, "decay": 0.95},
}, check=_check, run_length=_run_length)
