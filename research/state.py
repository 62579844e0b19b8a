"""The train state and the optimizers configs can name."""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn
from flax.training import train_state

from research import errors

PyTree = Any


class TrainState(train_state.TrainState):
    """Params, optimizer state and step; `batch_stats` is {} without BatchNorm."""
    batch_stats: PyTree

    @property
    def variables(self) -> dict[str, PyTree]:
        """What `apply_fn` takes, and what a params-only restore returns."""
        return model_variables(self.params, self.batch_stats)


def model_variables(params: PyTree, batch_stats: PyTree) -> dict[str, PyTree]:
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
    return variables


def create_learning_rate_fn(config: ml_collections.ConfigDict, total_steps: int
                            ) -> optax.Schedule:
    """Linear warmup over `warmup_steps`, then constant or cosine decay.

    The cosine decays from `learning_rate` to `end_learning_rate` at the
    last step.
    """
    if config.lr_schedule not in LR_SCHEDULES:
        raise errors.UserError(f"Unknown lr_schedule {config.lr_schedule!r}; choose "
                               f"from {sorted(LR_SCHEDULES)}.")
    return LR_SCHEDULES[config.lr_schedule](config, total_steps)


def _constant(config, total_steps):
    del total_steps
    if not config.warmup_steps:
        return optax.constant_schedule(config.learning_rate)
    return optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)


def _cosine(config, total_steps):
    return optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, config.warmup_steps, max(total_steps, 1),
        end_value=config.end_learning_rate)


LR_SCHEDULES = {"constant": _constant, "cosine": _cosine}

OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": lambda config, lr: optax.sgd(lr, momentum=config.momentum or None),
    "adam": lambda config, lr: optax.adam(lr),
}


def create_optimizer(config: ml_collections.ConfigDict, total_steps: int
                     ) -> optax.GradientTransformation:
    """The config's optimizer, schedule and gradient clipping."""
    if config.optimizer not in OPTIMIZERS:
        raise errors.UserError(f"Unknown optimizer {config.optimizer!r}; choose "
                               f"from {sorted(OPTIMIZERS)}.")
    tx = OPTIMIZERS[config.optimizer](
        config, create_learning_rate_fn(config, total_steps))
    if config.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    return tx


def init_variables(rng: jax.Array, model: nn.Module,
                   input_shape: tuple[int, ...], input_dtype: Any = jnp.float32
                   ) -> dict[str, PyTree]:
    """Model variables for inputs of `input_shape` (batch axis included)."""
    return model.init(rng, jnp.zeros(input_shape, input_dtype), train=False)


def create_train_state(rng: jax.Array, config: ml_collections.ConfigDict,
                       model: nn.Module, input_shape: tuple[int, ...],
                       input_dtype: Any = jnp.float32, total_steps: int = 0
                       ) -> TrainState:
    """Initialises the model and the optimizer named in the config.

    Args:
      rng: the init key.
      config: names the optimizer and its schedule.
      model: the linen module.
      input_shape: a model input's shape, batch axis included.
      input_dtype: its dtype (int32 for tokens).
      total_steps: the run's length, for decaying schedules.
    """
    variables = init_variables(rng, model, input_shape, input_dtype)
    return TrainState.create(
        apply_fn=model.apply, params=variables["params"],
        tx=create_optimizer(config, total_steps),
        batch_stats=variables.get("batch_stats", {}))


def count_params(params: PyTree) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
