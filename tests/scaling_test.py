"""Scaling laws: the fits recover known laws; the grid command runs, resumes
and predicts its held-out run before training it (mocked Tiny Shakespeare)."""
import datetime
import json
import os

import numpy as np
import pytest

from research import scaling_fits
from tests import helpers

SIZES, BUDGETS = (3e4, 1e5, 3e5, 8e5, 2e6), (1.5e12, 3e12, 7e12, 1.5e13)


def _synthetic_runs(noise: float, seed: int = 0) -> list[dict]:
    """Runs on L = 1.3 + 60 / N^0.45 + 300 / D^0.35 (C = 7 N D)."""
    rng = np.random.default_rng(seed)
    runs = []
    for n in SIZES:
        for c in BUDGETS:
            d = c / (7 * n)
            loss = 1.3 + 60 / n ** 0.45 + 300 / d ** 0.35
            runs.append({"params": n, "tokens": d, "flops": c, "budget": c,
                         "loss": loss * np.exp(rng.normal(0, noise))})
    return runs


def test_approach3_recovers_the_law_it_was_given():
    fit = scaling_fits.approach3(_synthetic_runs(noise=0.0))
    assert fit["alpha"] == pytest.approx(0.45, abs=0.02)
    assert fit["beta"] == pytest.approx(0.35, abs=0.02)
    assert fit["E"] == pytest.approx(1.3, abs=0.05)
    assert fit["params_exponent"] == pytest.approx(0.35 / 0.8, abs=0.02)


def test_isoflop_minimum_of_a_parabola_in_log_n():
    n = np.array([1e4, 3e4, 1e5, 3e5, 1e6])
    loss = 2.0 + 0.1 * (np.log(n) - np.log(5e4)) ** 2
    m = scaling_fits.isoflop_minimum(n, loss)
    assert m["params"] == pytest.approx(5e4, rel=1e-6) and m["inside"]
    assert m["loss"] == pytest.approx(2.0)
    assert scaling_fits.isoflop_minimum(n, -loss) is None  # no minimum


def test_optimal_size_minimises_the_fitted_loss_at_the_budget():
    fit = scaling_fits.approach3(_synthetic_runs(noise=0.0))
    best = scaling_fits.optimal_size(fit, 1e14, (0.0, np.log(7.0)))
    assert best["params"] * best["tokens"] * 7 == pytest.approx(1e14, rel=1e-6)
    for factor in (0.5, 2.0):  # a size off the optimum predicts a higher loss
        n = best["params"] * factor
        assert scaling_fits.predict(fit, n, 1e14 / (7 * n)) > best["loss"]


def test_bootstrap_intervals_contain_the_fit():
    runs = _synthetic_runs(noise=0.01)
    fits = scaling_fits.fit_all(runs, replicas=20, table_budgets=(1e14,))
    ci = fits["intervals"]["approach3/params_exponent"]
    assert ci["replicas"] == 20
    assert ci["p5"] <= fits["approach3"]["params_exponent"] <= ci["p95"]
    assert ci["p5"] < ci["p95"]  # the resamplings differ
    assert fits["table"][0]["params"] > 0


def _smoke_grid():
    from configs.pipelines import scaling_shakespeare  # pylint: disable=g-import-not-at-top
    grid = scaling_shakespeare.get_config("smoke")
    # Mocked tiny_shakespeare: letters a-j and spaces.
    grid.overrides.update({"data_dir": "/nonexistent/tfds", "eval_batch_size": 4,
                           "seq_len": 8, "batch_size": 4})
    grid.overrides.model_kwargs.vocab_size = 11
    return grid


def test_scaling_command_fits_plots_resumes_and_predicts_before_training(tmp_path):
    from research import scaling  # pylint: disable=g-import-not-at-top
    workdir = str(tmp_path)
    grid = _smoke_grid()
    helpers.rnn_mocked(scaling.Grid(grid, workdir).run)
    with open(os.path.join(workdir, "scaling_results.json")) as f:
        results = json.load(f)
    runs = results["runs"]
    assert len(runs) == len(grid.sizes) * len(grid.budgets)
    for r in runs:  # the budget is spent to within one step's FLOPs
        per_step = r["flops"] / r["steps"]
        assert abs(r["flops"] - r["budget"]) <= per_step / 2 + 1
        assert np.isfinite(r["loss"]) and r["loss"] < np.log(11)
    assert len({r["params"] for r in runs}) == len(grid.sizes)
    for name in ("loss_vs_tokens.png", "isoflops.png", "frontier.png",
                 "scaling_results.md"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0
    fits = results["fits"]
    assert len(fits["table"]) == len(grid.table_budgets)
    assert np.isfinite(fits["approach3"]["params_exponent"])

    # A rerun trains nothing: finished runs are reused, not retrained.
    stamps = {r["name"]: os.path.getmtime(os.path.join(workdir, r["name"],
                                                       "metrics.jsonl"))
              for r in runs}
    again = scaling.Grid(grid, workdir)
    helpers.rnn_mocked(again.run)
    for name, stamp in stamps.items():
        assert os.path.getmtime(os.path.join(workdir, name, "metrics.jsonl")) == stamp
    # Without the list of finished runs (a command stopped before writing
    # it), each run's row comes back from its own metrics, still untrained.
    os.remove(os.path.join(workdir, scaling.DONE))
    recovered = scaling.Grid(grid, workdir)
    results = helpers.rnn_mocked(recovered.run)
    for name, stamp in stamps.items():
        assert os.path.getmtime(os.path.join(workdir, name, "metrics.jsonl")) == stamp
    assert [(r["name"], r["loss"]) for r in recovered.table.rows] == [
        (r["name"], r["loss"]) for r in runs]

    prediction = helpers.rnn_mocked(recovered.heldout, results)
    assert prediction["size"] == grid.heldout.size
    assert prediction["flops"] > max(grid.budgets)  # beyond the grid
    assert prediction["error"] == pytest.approx(
        prediction["measured_loss"] - prediction["predicted_loss"])
    # The prediction was written before the run and is never redone.
    with open(os.path.join(workdir, "heldout_prediction.json")) as f:
        saved = json.load(f)
    assert saved["predicted_loss"] == prediction["predicted_loss"]
    run_started = os.path.getmtime(os.path.join(
        workdir, scaling.run_name(grid.heldout.size, grid.heldout.budget),
        "config.json"))
    predicted = datetime.datetime.fromisoformat(saved["predicted"]["date"])
    assert predicted.timestamp() <= run_started + 1  # dates have whole seconds
    with open(os.path.join(workdir, "scaling_results.md")) as f:
        assert "## Held-out run" in f.read()
