"""The input-path interface: how a split reaches the train and eval steps.

An input path is a pair of factories registered in `INPUTS` under the name
`config.input` takes (built-in: "memory" and "stream", `data/inputs.py`).
The trainer calls only the methods below and never asks which path it has.
"""
import dataclasses
from typing import Any, Callable, Protocol

import jax

Batch = dict[str, jax.Array]
PyTree = Any


class TrainInput(Protocol):
    """A training split as the train chunks read it.

    Attributes:
      num_examples: the split's examples (an epoch).
      steps_per_epoch: num_examples // batch size.
    """
    num_examples: int
    steps_per_epoch: int

    def first_examples(self, n: int, fn: Callable[[Batch], PyTree]) -> PyTree:
        """`fn` (traced) of the rows of the first n examples, for models that
        initialise from data."""

    def spec(self, num_steps: int) -> PyTree:
        """The step inputs of a chunk of `num_steps` steps, as arrays or
        `jax.ShapeDtypeStruct`s with shardings, to compile the chunk."""

    def start(self, data_key: jax.Array, step: int, stop: int,
              chunk_size: Callable[[int], int]) -> None:
        """Prepares to serve the chunks from `step` to `stop`
        (`chunk_size(step)`: the length of the chunk that starts there)."""

    def inputs(self, step: int, num_steps: int) -> PyTree:
        """The step inputs of the chunk of `num_steps` steps from `step`."""

    def batch(self, inputs: PyTree, i: int, step: jax.Array, pipeline: Any) -> Batch:
        """Traced inside the chunk: step i's batch (step number `step`),
        preprocessed by `pipeline`, with the examples' numbers in `index`."""

    def report_epoch(self, epoch: float) -> None:
        """Called at an epoch's end (e.g. to log what was read)."""

    def close(self) -> None:
        """Stops what `start` started."""


class EvalInput(Protocol):
    """An evaluation split and how it is scored.

    Attributes:
      data: the split as placed on the devices, if it is (plots read it);
        None for a path that does not hold it.
    """
    data: PyTree

    def compile(self, variables: PyTree, aux: PyTree, final: bool
                ) -> Callable[[PyTree, PyTree], Any]:
        """`(variables, aux) -> metrics` over the whole split, compiled
        (`final`: with the last evaluation's test-time views)."""


@dataclasses.dataclass(frozen=True)
class InputPath:
    """`train(exp, split) -> TrainInput`, `eval(exp, split) -> EvalInput`."""
    train: Callable[..., TrainInput]
    eval: Callable[..., EvalInput]


# config.input -> InputPath; "auto" chooses among these (`assembly.py`).
INPUTS: dict[str, InputPath] = {}
