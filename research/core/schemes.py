"""The parallel-scheme interface: how the train state is laid out over the
mesh, how a step updates it and how it is checkpointed.

A scheme is registered in `SCHEMES` under the name
`config.data_parallel.scheme` takes, as a factory of the config (built-in:
"sync" and "diloco", `parallel/`). The trainer and the steps call only the
methods below; no code outside a scheme's module looks inside its state.
"""
from typing import Any, Callable, Protocol

import jax
import ml_collections

PyTree = Any


class Scheme(Protocol):
    """A data- or model-parallel way of training."""

    def create_mesh(self, num_devices: int) -> jax.sharding.Mesh:
        """The mesh the scheme runs on (0 devices: all)."""

    def state_shardings(self, state: Any, param_specs: PyTree,
                        mesh: jax.sharding.Mesh) -> PyTree:
        """How a new `TrainState` (`state`: its shapes) is created over the
        mesh (a sharding prefix), given the parameters' logical axis names
        (`param_specs`: PartitionSpecs of names, empty where unnamed)."""

    def distribute(self, state: Any, total_steps: int, mesh: jax.sharding.Mesh
                   ) -> Any:
        """The state as the scheme holds it, from a new `TrainState`."""

    def shardings(self, state: Any, mesh: jax.sharding.Mesh) -> PyTree:
        """A sharding (prefix) of `state`, a state `distribute` returned."""

    def train_step(self, state: Any, batch: dict[str, jax.Array], rng: jax.Array,
                   aux: PyTree, *, inner_step: Callable[..., Any],
                   mesh: jax.sharding.Mesh, constrain: Callable[[PyTree], PyTree]
                   ) -> tuple[Any, Any, jax.Array]:
        """One step on a global batch (traced): `inner_step(state, batch, rng,
        aux, grad_accum_steps=, constrain=)` is `steps.train_step`."""

    def trace(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn` as a train chunk should be traced under the scheme."""

    def train_state(self, state: Any) -> Any:
        """A `TrainState` of the scheme's state (its optimizer, apply_fn)."""

    def checkpoint_items(self, state: Any, loop: PyTree) -> dict[str, PyTree]:
        """`model`: the evaluation variables; `train`: the rest, with `loop`."""

    def restore_items(self, state: Any, items: dict[str, PyTree]
                      ) -> tuple[Any, PyTree]:
        """`state` (a template) from checkpoint items; and the loop's item."""

    def communication(self, state: Any, step: int, devices: int, final_step: int
                      ) -> dict[str, float]:
        """What the scheme has communicated by `step` (`comm/...` scalars)."""


# config.data_parallel.scheme -> factory(config) -> Scheme.
SCHEMES: dict[str, Callable[[ml_collections.ConfigDict], Scheme]] = {}


def parameter_bytes(tree: PyTree) -> int:
    """Bytes of the arrays of `tree` (what an all-reduce of it moves)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
