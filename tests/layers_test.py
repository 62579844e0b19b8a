"""The package's layers hold: `lint-imports` keeps the contracts in setup.cfg
(entry points > assembly > features > core > models > kernels > base, no
import cycles), and the core imports no feature, not even inside a function."""
import ast
import os
import shutil
import subprocess
import sys

import pytest

from tests import helpers

FEATURES = ("research.compression", "research.data", "research.parallel",
            "research.assembly")


def test_import_contracts_are_kept():
    linter = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    if not os.path.exists(linter):
        linter = shutil.which("lint-imports")
    if linter is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    result = subprocess.run([linter], cwd=helpers.REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "0 broken" in result.stdout


def test_the_core_imports_no_feature_anywhere_in_a_module():
    """import-linter sees function-level imports too; this names them."""
    core = os.path.join(helpers.REPO, "research", "core")
    found = []
    for name in sorted(os.listdir(core)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(core, name)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):  # also `from research import x`
                modules = [node.module or ""] + [
                    f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            else:
                continue
            found += [f"{name}: {m}" for m in modules if m.startswith(FEATURES)]
    assert not found
