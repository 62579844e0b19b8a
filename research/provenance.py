"""How a result was made, written beside it: every results file (a table's
JSON and Markdown) starts with the command line, the commit, the machine and
the date, so numbers from two machines or commits are never mixed up."""
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from typing import Any

import jax


def write(path: str, about: dict[str, Any], content: dict[str, Any],
          lines: list[str]) -> None:
    """`path` (JSON: `about` and `content`) and its `.md` twin (`header(about)`
    and the Markdown `lines`)."""
    with open(path, "w") as f:
        json.dump({"about": about, **content}, f, indent=1)
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write("\n".join(header(about) + lines) + "\n")


def header(about: dict[str, Any]) -> list[str]:
    """The first lines of a results Markdown file: how it was made
    (`about()`), as comments, then a blank line."""
    return [f"<!-- written by: {about['command']} -->",
            f"<!-- commit {about['commit']}, {about['date']}, {about['machine']} -->",
            ""]


def about() -> dict[str, str]:
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
