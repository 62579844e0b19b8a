"""One runner for commands that train several runs and write one table:
`research.compress` (a list of stages) and `research.sweep` (a list of
variants).

Each run is an ordinary training run in `<workdir>/<name>`: it resumes like
any run, and a finished one is only evaluated again, so a command stopped
half-way goes on where it stopped. After every row the table is rewritten,
machine-written: `<workdir>/<stem>.json` (the rows and how they were made:
command line, commit, machine, date) and `<stem>.md` (the same as Markdown).
"""
import json
import os
from typing import Any, Callable

from absl import logging
import ml_collections

from research import provenance
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
        self.about = provenance.about()
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
        provenance.write(self.table_path(".json"), self.about, {
            "rows": self.rows, **({"summary": self.summary} if self.summary else {})},
            self.render(self.rows))

    def table_path(self, suffix: str) -> str:
        return os.path.join(self.workdir, self.stem + suffix)


def read_rows(path: str) -> list[dict[str, Any]]:
    """The rows of a table the runner wrote (or of an older bare list)."""
    with open(path) as f:
        content = json.load(f)
    return content["rows"] if isinstance(content, dict) else content

