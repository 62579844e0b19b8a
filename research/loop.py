"""The training loop's schedule: periodic actions between chunks of steps.

The trainer runs jitted chunks of up to `steps_per_call` steps and gives
control back to Python only at boundaries: the steps where some action is due
(log, evaluate, checkpoint) and epoch ends. Each action says when it is next
due, so the chunks stop exactly there and the loop costs nothing per step.
(`clu.periodic_actions` must be called after every single step and decides
only then whether to trigger, so it cannot tell a chunk where to stop.)

Preemption is checked after every chunk. In one process SIGINT/SIGTERM set a
flag; in a multi-process job JAX's preemption service (`jax.distributed`
catches SIGTERM) makes every process stop at the same agreed chunk.
"""
import dataclasses
import signal
from typing import Callable, Iterable

from absl import logging
import jax
from jax.experimental import multihost_utils


@dataclasses.dataclass
class Periodic:
    """An action due every `every` steps (0: never) and at `on_steps`."""
    fn: Callable[[int], None]
    every: int = 0
    on_steps: frozenset[int] = frozenset()

    def next_step(self, step: int) -> float:
        """The first step after `step` at which it is due (inf: none)."""
        later = [s for s in self.on_steps if s > step]
        if self.every:
            later.append((step // self.every + 1) * self.every)
        return min(later, default=float("inf"))

    def due(self, step: int) -> bool:
        return bool(self.every and step % self.every == 0) or step in self.on_steps


def next_boundary(step: int, stop: int, actions: Iterable[Periodic]) -> int:
    """The next step at which the loop must regain control."""
    return int(min([stop, *(a.next_step(step) for a in actions)]))


def run_due(step: int, actions: Iterable[Periodic]) -> None:
    for action in actions:
        if action.due(step):
            action.fn(step)


class Preemption:
    """Whether to stop and save, agreed by all processes.

    Use as a context manager around the loop and call `requested()` after
    every chunk; every process must make the same sequence of calls.
    """

    def __init__(self):
        self.signum = None
        self._calls = 0
        self._previous = {}
        self._multi = jax.process_count() > 1

    def __enter__(self):
        # In a multi-process job jax.distributed's preemption notifier owns
        # SIGTERM (a Python handler would hide it from the other processes),
        # and a local Ctrl-C cannot be agreed on: it stops this process.
        for sig in () if self._multi else (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        del frame
        if self.signum is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        logging.warning("Got %s: saving a checkpoint after the current steps.",
                        signal.Signals(signum).name)
        self.signum = signum

    def requested(self) -> bool:
        """True once a stop is requested (and, in a multi-process job, at the
        same call on every process)."""
        self._calls += 1
        if self._multi and self.signum is None and (
                multihost_utils.reached_preemption_sync_point(self._calls)):
            logging.warning("Preemption notice (SIGTERM to a process of the job): "
                            "every process stops here and saves.")
            self.signum = signal.SIGTERM
        return self.signum is not None

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
