"""One runner for commands that train several runs and write one table:
`research.compress` (a list of stages) and `research.sweep` (a list of
variants).

Each run is an ordinary training run in `<workdir>/<name>`: it resumes like
any run, and a finished one is only evaluated again, so a command stopped
half-way goes on where it stopped. After every row the table is rewritten,
machine-written: `<workdir>/<stem>.json` (the rows and how they were made:
command line, commit, machine, date) and `<stem>.md` (the same as Markdown).
"""
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from typing import Any, Callable

from absl import logging
import jax
import ml_collections

from research import train


class Runner:
    """Trains named runs in `workdir` and keeps one table of their rows."""

    def __init__(self, workdir: str, stem: str,
                 render: Callable[[list[dict[str, Any]]], list[str]],
                 allow_config_change: bool = False):
        """`render(rows)`: the Markdown table's lines; `stem`: the files' name."""
        self.workdir, self.stem, self.render = workdir, stem, render
        self.allow_config_change = allow_config_change
        self.rows: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {}  # what the rows add up to (a choice)
        self.about = provenance()
        os.makedirs(workdir, exist_ok=True)

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def train(self, name: str, config: ml_collections.ConfigDict) -> dict[str, Any]:
        """Trains (or resumes, or only evaluates) run `name`; its result."""
        logging.info("Run %s: %s", name, self.path(name))
        return train.train_and_evaluate(config, self.path(name),
                                        allow_config_change=self.allow_config_change)

    def add(self, row: dict[str, Any]) -> None:
        """Appends a row and rewrites the table."""
        self.rows.append(row)
        self.write()

    def write(self) -> None:
        with open(self.table_path(".json"), "w") as f:
            json.dump({"about": self.about, "rows": self.rows,
                       **({"summary": self.summary} if self.summary else {})},
                      f, indent=1)
        with open(self.table_path(".md"), "w") as f:
            f.write("\n".join(header(self.about) + self.render(self.rows)) + "\n")

    def table_path(self, suffix: str) -> str:
        return os.path.join(self.workdir, self.stem + suffix)


def read_rows(path: str) -> list[dict[str, Any]]:
    """The rows of a table the runner wrote (or of an older bare list)."""
    with open(path) as f:
        content = json.load(f)
    return content["rows"] if isinstance(content, dict) else content


def header(about: dict[str, Any]) -> list[str]:
    """The first lines of a results Markdown file: how it was made
    (`provenance()`), as comments, then a blank line."""
    return [f"<!-- written by: {about['command']} -->",
            f"<!-- commit {about['commit']}, {about['date']}, {about['machine']} -->",
            ""]


def provenance() -> dict[str, str]:
    """How a result was made: the command line, the commit (with "+dirty"
    for uncommitted changes), the machine and the date (UTC)."""
    return {"command": _command(), "commit": _commit(), "machine": machine(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds")}


def _command() -> str:
    """The command line, with `python -m research.x` for a module's path and
    the repository's own paths relative (the files are committed)."""
    argv = list(sys.argv)
    package = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(package)
    path = os.path.abspath(argv[0]) if argv else ""
    if path.startswith(package + os.sep) and path.endswith(".py"):
        module = os.path.relpath(path[:-3], root)
        argv[:1] = ["-m", module.replace(os.sep, ".")]
    argv = [a.replace(root + os.sep, "") for a in argv]
    return shlex.join(["python", *argv])


def machine() -> str:
    """The CPU model (with its family and model numbers), its core count and
    the JAX devices."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        cpu = (f"{fields.get('model name', cpu)} (family "
               f"{fields.get('cpu family', '?')}, model {fields.get('model', '?')})")
    except OSError:
        pass
    devices = jax.devices()
    return (f"{cpu}, {os.cpu_count()} cores; jax {jax.__version__} on "
            f"{len(devices)} {devices[0].platform} device(s)")


def _commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                                capture_output=True, text=True, timeout=10,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10,
                               check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")
