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


def _sgd(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    return optax.sgd(config.learning_rate, momentum=config.momentum or None)


OPTIMIZERS: dict[str, Callable[[ml_collections.ConfigDict],
                               optax.GradientTransformation]] = {
    "sgd": _sgd,
}


def create_optimizer(config: ml_collections.ConfigDict
                     ) -> optax.GradientTransformation:
    if config.optimizer not in OPTIMIZERS:
        raise errors.UserError(f"Unknown optimizer {config.optimizer!r}; choose "
                               f"from {sorted(OPTIMIZERS)}.")
    return OPTIMIZERS[config.optimizer](config)


def init_variables(rng: jax.Array, model: nn.Module,
                   input_shape: tuple[int, ...], input_dtype=jnp.float32
                   ) -> dict[str, PyTree]:
    """Model variables for inputs of `input_shape` (batch axis included)."""
    return model.init(rng, jnp.zeros(input_shape, input_dtype), train=False)


def create_train_state(rng: jax.Array, config: ml_collections.ConfigDict,
                       model: nn.Module, input_shape: tuple[int, ...]
                       ) -> TrainState:
    """Initialises the model and the optimizer named in the config."""
    variables = init_variables(rng, model, input_shape)
    return TrainState.create(
        apply_fn=model.apply, params=variables["params"],
        tx=create_optimizer(config),
        batch_stats=variables.get("batch_stats", {}))


def count_params(params: PyTree) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
