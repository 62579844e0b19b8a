"""The training loop's schedule: periodic actions between chunks of steps.

The trainer runs jitted chunks of up to `steps_per_call` steps and gives
control back to Python only at boundaries: the steps where some action is due
(log, evaluate, checkpoint) and epoch ends. Each action says when it is next
due, so the chunks stop exactly there and the loop costs nothing per step.
(`clu.periodic_actions` must be called after every single step and decides
only then whether to trigger, so it cannot tell a chunk where to stop.)

Preemption is checked after every chunk. In one process SIGINT/SIGTERM set a
flag; in a multi-process job JAX's preemption service (`jax.distributed`
catches SIGTERM) makes every process stop at the same agreed chunk. A second
signal, or a first one that no chunk follows, ends a hung process.
"""
import ctypes
import dataclasses
import select
import signal
import socket
import sys
import threading
import time
from typing import Callable, Iterable

from absl import logging
import jax
from jax.experimental import multihost_utils

from research import errors


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
    """Whether to stop and save, agreed by all processes; and a way out of a
    hung job.

    Use as a context manager around the loop and call `requested()` after
    every chunk; every process must make the same sequence of calls.

    The first SIGTERM (or, in one process, SIGINT) asks for a stop at the
    next chunk, with a checkpoint. A second one, or a first one after which
    no chunk completes within `grace_s` seconds (or three times the longest
    gap between chunks seen so far, if longer), ends the process at once,
    with status 128 + signal: a job hung in a collective or a step can always
    be stopped without SIGKILL. Checkpoints already written are kept (Orbax
    commits a checkpoint by renaming its folder, so an interrupted save
    leaves only a temporary folder behind). A watchdog thread does this: a
    Python signal handler only runs when the main thread returns to Python,
    which a hung step never does.
    """

    def __init__(self, grace_s: float = 120.0):
        self.signum = None
        self.grace_s = grace_s
        self._calls = 0
        self._previous = {}
        self._native = {}
        self._multi = jax.process_count() > 1
        self._received = []  # (signum, time) as the watchdog saw them
        self._last_call = self._longest_gap = None
        self._acknowledged = False
        self._pipe = self._watchdog = None
        self._wakeup = -1

    def __enter__(self):
        # In a multi-process job jax.distributed's preemption notifier owns
        # SIGTERM and makes every process stop at one agreed chunk; the
        # watchdog passes each SIGTERM on to it. A local Ctrl-C cannot be
        # agreed on: it stops this process, as Python's default does.
        signals = (signal.SIGTERM,) if self._multi else (signal.SIGINT,
                                                         signal.SIGTERM)
        if threading.current_thread() is not threading.main_thread():
            return self  # signals are the main thread's: leave them alone
        for sig in signals:
            if self._multi and not callable(signal.getsignal(sig)):  # JAX's
                self._native[sig] = _NativeHandler.read(sig)
            self._previous[sig] = signal.signal(sig, self._handle)
        self._pipe = socket.socketpair()
        for end in self._pipe:
            end.setblocking(False)
        self._wakeup = signal.set_wakeup_fd(self._pipe[1].fileno(),
                                            warn_on_full_buffer=False)
        self._watchdog = threading.Thread(target=self._watch, daemon=True,
                                          name="preemption-watchdog")
        self._watchdog.start()
        return self

    def _handle(self, signum, frame):
        del frame
        if self.signum is None and not self._multi:
            logging.warning("Got %s: saving a checkpoint after the current steps.",
                            signal.Signals(signum).name)
            self.signum = signum

    def requested(self) -> bool:
        """True once a stop is requested (and, in a multi-process job, at the
        same call on every process)."""
        now = time.monotonic()
        if self._last_call is not None:
            self._longest_gap = max(self._longest_gap or 0, now - self._last_call)
        self._last_call = now
        self._calls += 1
        if self._multi and self.signum is None and (
                multihost_utils.reached_preemption_sync_point(self._calls)):
            logging.warning("Preemption notice (SIGTERM to a process of the job): "
                            "every process stops here and saves.")
            self.signum = signal.SIGTERM
        self._acknowledged = self.signum is not None
        return self._acknowledged

    def _watch(self) -> None:
        """The watchdog: sees every signal as it arrives (through the wakeup
        fd), passes SIGTERM on to JAX, ends a process that does not stop."""
        reader = self._pipe[0]
        while True:
            select.select([reader], [], [], 0.5)
            try:
                data = reader.recv(64)
            except BlockingIOError:
                data = b""
            except OSError:
                return  # closed by __exit__
            if not data and self._watchdog is None:
                return
            for signum in data:
                if signum not in self._previous:
                    continue
                if signum in self._native:
                    self._native[signum](signum)
                self._received.append((signum, time.monotonic()))
            if not self._received:
                continue
            signum, since = self._received[0]
            if len(self._received) > 1:
                _end(self._received[1][0], "a second one arrived")
            grace = max(self.grace_s, 3 * (self._longest_gap or 0))
            last = max(since, self._last_call or since)
            if not self._acknowledged and time.monotonic() - last > grace:
                _end(signum, f"no training steps completed for {grace:.0f}s after it")

    def __exit__(self, *exc):
        if self._watchdog is not None:
            watchdog, self._watchdog = self._watchdog, None
            watchdog.join()
            signal.set_wakeup_fd(self._wakeup)
            for end in self._pipe:
                end.close()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
            if sig in self._native:
                self._native[sig].restore()


def _end(signum: int, why: str) -> None:
    errors.exit_now(f"{signal.Signals(signum).name} and {why}: stopped without a "
                    "further checkpoint; the checkpoints already saved are kept. "
                    "Rerun to resume.", 128 + signum)


class _NativeHandler:
    """A signal handler installed outside Python, which `signal.getsignal`
    does not see (JAX's preemption notifier installs one in C++ for
    SIGTERM): called from the watchdog for each signal, and put back
    afterwards. Linux (glibc): `struct sigaction` begins with the handler."""

    def __init__(self, signum: int, action: ctypes.Array):
        self.signum, self._action = signum, action
        address = ctypes.c_void_p.from_buffer(action).value or 0
        self._fn = (ctypes.CFUNCTYPE(None, ctypes.c_int)(address)
                    if address > 1 else None)  # 0, 1: SIG_DFL, SIG_IGN

    @classmethod
    def read(cls, signum: int) -> "_NativeHandler":
        action = ctypes.create_string_buffer(256)  # >= sizeof(struct sigaction)
        if sys.platform != "linux" or _LIBC.sigaction(signum, None, action):
            action = ctypes.create_string_buffer(256)  # unknown: SIG_DFL
        return cls(signum, action)

    def __call__(self, signum: int) -> None:
        if self._fn is not None:
            self._fn(signum)

    def restore(self) -> None:
        if sys.platform == "linux":
            _LIBC.sigaction(self.signum, self._action, None)


_LIBC = ctypes.CDLL(None, use_errno=True)
