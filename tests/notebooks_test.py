"""Notebooks: each runs top to bottom in a fresh kernel; none is saved with outputs.

A notebook takes its parameters from environment variables (as
`inspect_run.ipynb` reads `WORKDIR`); list it in `EXECUTED` with the variables
to set. A value may name `{tmp_path}`, the test's own temporary directory.
"""
import glob
import json
import os
import sys
import time

import nbclient
import nbformat
import pytest
from jupyter_client import kernelspec
from jupyter_client import manager

from tests import helpers

NOTEBOOKS = os.path.join(helpers.REPO, "notebooks")
# File name -> environment variables for its run.
EXECUTED = {
    "foundations.ipynb": {},
    # An empty workdir: the notebook trains the smoke preset, then inspects it.
    "cnn.ipynb": {"WORKDIR": "{tmp_path}/cnn"},
    "rnn.ipynb": {"WORKDIR": "{tmp_path}/rnn"},
    # A results file in the pipeline's format, written by the test.
    "compression.ipynb": {"RESULTS": "{tmp_path}/compression_results.json"},
    "scaling.ipynb": {"RESULTS": "{tmp_path}/scaling_results.json"},
}
# Notebooks that read real data (smoke-sized), and the dataset they need.
REAL_DATA = {"cnn.ipynb": "cifar10", "rnn.ipynb": "tiny_shakespeare"}
# Notebooks that need fixtures from elsewhere run there instead.
EXECUTED_ELSEWHERE = {}
CELL_TIMEOUT_S = 120
KERNEL = "research-test"


def notebook_paths():
    return sorted(glob.glob(os.path.join(NOTEBOOKS, "*.ipynb")))


@pytest.fixture
def kernel_manager(tmp_path):
    """A kernel started from this interpreter (the venv), whatever kernelspecs
    the user has installed."""
    spec_dir = tmp_path / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f",
                 "{connection_file}"],
        "display_name": "research tests", "language": "python"}))
    specs = kernelspec.KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return manager.AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


@pytest.mark.parametrize("name", sorted(EXECUTED))
@pytest.mark.slow
def test_notebook_runs(name, kernel_manager, tmp_path, monkeypatch):
    """Executes every cell in order; a cell error fails with its traceback.

    Takes ~15 s for foundations.ipynb: starting a kernel and importing jax and
    matplotlib is ~5 s of it, the notebook's two jit-compiled trainings most of
    the rest.
    """
    data_dir = os.environ.get("TFDS_DATA_DIR", "")
    if name in REAL_DATA and not os.path.isdir(os.path.join(data_dir, REAL_DATA[name])):
        pytest.skip(f"{name} trains on the real {REAL_DATA[name]}, not prepared under "
                    f"$TFDS_DATA_DIR={data_dir!r} (CI sets it)")
    if name == "compression.ipynb":
        _write_results(tmp_path)
    if name == "scaling.ipynb":
        _write_scaling_results(tmp_path)
    for key, value in {"MPLBACKEND": "Agg", "JAX_PLATFORMS": "cpu",
                       "PYTHONPATH": helpers.REPO,  # this checkout's `research`
                       **EXECUTED[name]}.items():
        monkeypatch.setenv(key, value.format(tmp_path=tmp_path))
    notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    client = nbclient.NotebookClient(
        notebook, km=kernel_manager, timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": helpers.REPO}})
    start = time.perf_counter()
    client.execute(cleanup_kc=True)  # a passed-in manager is otherwise left running
    seconds = time.perf_counter() - start
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "not every cell ran"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    print(f"{name}: {len(code)} code cells in {seconds:.1f}s")


def _write_results(directory):
    """A compression table like `research.compress` writes, of two models."""
    import dataclasses  # pylint: disable=g-import-not-at-top
    from research import compress, runner  # pylint: disable=g-import-not-at-top
    rows = []
    for model, params, accuracy in (("teacher", 1_000_000, 0.9),
                                    ("student", 62_006, 0.6)):
        rows.append(compress.Row(model, model, "baseline", accuracy, params, params,
                                 4 * params, 4 * params, 1000.0, ""))
        for level in (0.5, 0.75, 0.9):
            rows.append(compress.Row(
                f"prune_{model}_{int(100 * level)}", model, "prune",
                accuracy - level / 10, params, int(params * (1 - level)),
                4 * params, int(4 * params * (1.1 - level)), 1000.0, ""))
        rows.append(compress.Row(f"{model}_int8", model, "ptq", accuracy - 0.005,
                                 params, params, params, params, 900.0, ""))
    table = runner.Runner(str(directory), compress.RESULTS, compress.render)
    for row in rows:
        table.add(dataclasses.asdict(row))


def _write_scaling_results(directory):
    """A scaling_results.json like `research.scaling` writes, fitted to runs
    on a known law."""
    from research import provenance, scaling_fits  # pylint: disable=g-import-not-at-top
    runs = []
    for n in (3e4, 1e5, 3e5, 8e5):
        for c in (1e12, 3e12, 1e13):
            d = c / (7 * n)
            runs.append({"name": f"{n:g}_{c:g}", "size": f"{n:g}", "budget": c,
                         "params": int(n), "tokens": d, "flops": c,
                         "loss": 1.3 + 60 / n ** 0.45 + 300 / d ** 0.35})
    results = {"about": provenance.about(), "runs": runs,
               "fits": scaling_fits.fit_all(runs, 5, (1e14,))}
    with open(os.path.join(directory, "scaling_results.json"), "w") as f:
        json.dump(results, f)


@pytest.mark.parametrize("path", notebook_paths(), ids=os.path.basename)
def test_notebook_is_saved_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    dirty = [i for i, c in enumerate(notebook.cells) if c.cell_type == "code"
             and (c.outputs or c.execution_count is not None)]
    assert not dirty, (
        f"{path}: code cells {dirty} hold outputs or execution counts; clear them "
        f"(jupyter nbconvert --clear-output --inplace {path}) before committing.")


def test_every_notebook_is_executed_by_some_test():
    names = {os.path.basename(p) for p in notebook_paths()}
    assert names == set(EXECUTED) | set(EXECUTED_ELSEWHERE)
