"""The workdir of a training run: one writer at a time, and no silent drift.

A run holds `<workdir>/.lock` (an advisory `flock`, released by the kernel
when the process dies, so a crash never leaves a lock that blocks; the file
records who holds it) for its whole life. A second writer stops at once with
the holder's host and pid. Readers (`--mode=eval`, `sample`, `plot`) take no
lock. In a multi-process job process 0 takes it for the job and every process
learns the outcome.

A workdir holds a run once its first checkpoint is saved; `config.json` is
written then. Resuming compares the requested config with the saved one
(each config section declares which of its fields may change, and which
never may: `config_lib.Section`): fields that change the experiment are
refused with a one-line diff unless `--allow_config_change` is given (the change is then recorded in
`config.json`'s `_history`); fields that do not are allowed and logged.
"""
import fcntl
import json
import os
import socket
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from research.core import checkpointing
from research.core import config_lib
from research import errors

LOCK_FILE = ".lock"


def prepare(workdir: str) -> None:
    """Creates `workdir` and checks it is a writable folder, before any compute."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise errors.UserError(f"Workdir {workdir!r} is a file, not a folder; pass "
                               "another --workdir.")
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test.{os.getpid()}")  # per process
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise errors.UserError(
            f"Workdir {workdir!r} is not writable ({e.strerror}); pass a --workdir "
            "you can write to.") from None


class Lock:
    """The workdir's writer lock, held from `__enter__` to `__exit__`."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self._fd = None

    def __enter__(self) -> "Lock":
        error = self._acquire() if jax.process_index() == 0 else ""
        if jax.process_count() > 1:  # every process learns process 0's outcome
            ok = multihost_utils.broadcast_one_to_all(np.int32(not error))
            if not ok:
                raise errors.UserError(error or (
                    "Process 0 could not lock the workdir (its log says who holds "
                    "it); use another --workdir."))
        if error:
            raise errors.UserError(error)
        return self

    def _acquire(self) -> str:
        """Takes the lock; returns "" or why not."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read(fd))
            os.close(fd)
            return (f"Workdir {os.path.dirname(self.path)!r} is in use by {holder}; "
                    "wait for that run to finish, stop it, or use another --workdir.")
        previous = _read(fd)
        if previous:  # written by a holder that did not release: it died
            logging.warning("Took over the workdir lock left by %s, which is no "
                            "longer running.", _describe(previous))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                  "since": time.time()}).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return ""

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # released cleanly: nothing stale left
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}


def _show(value: Any) -> str:
    """A config value as a user typed it (a whole float as 2, not 2.0)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value)


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another run"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {since})"


def check_resume(workdir: str, config: ml_collections.ConfigDict,
                 allow_change: bool) -> list[dict[str, Any]]:
    """Compares `config` with the run already in `workdir`, before any compute.

    Returns:
      The config history to write into `config.json`: the saved one, plus an
      entry for this run's changes if there are any.

    Raises:
      UserError: the workdir's checkpoints vanished, or the config changes
        the experiment without `allow_change`.
    """
    saved = _saved_config(workdir)
    if saved is None:
        return []
    history = saved.pop("_history", [])
    steps = checkpointing.saved_steps(workdir)
    if not steps:
        raise errors.UserError(
            f"Workdir {workdir!r} holds a run (config.json) but its checkpoints are "
            "gone; training would start over and mix two runs' metrics. Use a new "
            "--workdir, or restore the checkpoints folder.")
    changes = diff(saved, config.to_dict())
    if not changes:
        return history
    fixed = config_lib.fixed_fields()
    for key, old, new in changes:
        if key in fixed:
            raise errors.UserError(
                f"config.{key} cannot change when resuming the run in {workdir!r} "
                f"({_show(old)} -> {_show(new)}): {fixed[key]}. To go on from its "
                f"weights, start a new --workdir with --config.init_from={workdir}.")
    refused = [c for c in changes if not _free(c[0])]
    described = "; ".join(f"{k}: {_show(old)} -> {_show(new)}"
                          for k, old, new in changes)
    length = config_lib.run_length_dependents(config)
    if any(k == "num_epochs" for k, _, _ in changes) and length:
        # Free for a constant rate; here the run's length shapes its course.
        described += (f" (the run's length shapes its {', '.join(length)}: they "
                      "would be stretched to the new length, mid-course)")
        refused.append(("num_epochs", None, None))
    if refused and not allow_change:
        raise errors.UserError(
            f"The config differs from the run in {workdir!r}: {described}. Use a new "
            "--workdir for a new experiment, or pass --allow_config_change to "
            "continue this run with the change (it is recorded in config.json).")
    logging.warning("Resuming %s at step %d with a changed config: %s", workdir,
                    steps[-1], described)
    return history + [{"step": steps[-1], "time": time.time(), "changes": [
        {"field": k, "from": old, "to": new} for k, old, new in changes]}]


def record_changes(config: ml_collections.ConfigDict, workdir: str,
                   history: list[dict[str, Any]]) -> None:
    """Writes `config.json` if `history` has changes it does not hold yet
    (a finished run evaluated with `--allow_config_change`)."""
    saved = _saved_config(workdir)
    if saved is not None and saved.get("_history", []) != history:
        save_config(config, workdir, history)


def save_config(config: ml_collections.ConfigDict, workdir: str,
                history: list[dict[str, Any]]) -> None:
    """Writes `config.json` (process 0): the config and its change history."""
    if jax.process_index() == 0:
        config_lib.save_config(config, workdir, history)


def diff(old: dict[str, Any], new: dict[str, Any], prefix: str = ""
         ) -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) for every leaf that differs; lists as tuples.

    A field the run's config lacks (added to the code since) is no change
    while it is off (False, 0, "", empty): it cannot have changed that run.
    """
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if key not in old and isinstance(b, dict):
            a = {}
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff(a, b, f"{prefix}{key}.")
        elif key not in old and not b:
            continue
        elif _plain(a) != _plain(b):
            out.append((f"{prefix}{key}", _plain(a), _plain(b)))
    return out


def _plain(value: Any) -> Any:
    return tuple(_plain(v) for v in value) if isinstance(value, (list, tuple)) else value


def _free(key: str) -> bool:
    """Whether a section lets `key` change on resume (`Section.free`)."""
    return any(key == f or (f.endswith(".") and key.startswith(f))
               for f in config_lib.free_fields())


def _saved_config(workdir: str) -> dict[str, Any] | None:
    path = os.path.join(workdir, config_lib.CONFIG_JSON)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)
