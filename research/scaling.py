"""How big a model for my budget: a grid of runs, scaling-law fits, a table.

python -m research.scaling --config=configs/pipelines/scaling_shakespeare.py:cpu \
    --workdir=runs/scaling [--heldout]

The config names a base experiment, model sizes (name -> model_kwargs) and
compute budgets C in FLOPs. Each size's train step is compiled once and
XLA's cost analysis counts its FLOPs (`sizes.json`, kept so that a resumed
grid maps budgets to the same steps); the run of (size, C) trains
round(C / FLOPs per step) steps with its own cosine schedule, an ordinary
run in `<workdir>/<size>_<C>` that resumes like any other; a finished one
is reused from `finished_runs.json` (or, if the command stopped before
writing its row, from its metrics) without recompute. After every budget
that trained a run the fits are redone (`scaling_fits.py`) and
`scaling_results.{json,md}` and the plots rewritten, so a grid stopped
half-way goes on where it stopped.

`--heldout` then predicts the loss of the config's held-out run (a budget
beyond the grid's) from the fits, writes the prediction to
`heldout_prediction.json` before training it (an existing prediction is
kept, never redone), trains it, and reports predicted against measured.
"""
import json
import os
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections

from research import assembly
from research import cli
from research import costs
from research import errors
from research import mesh as mesh_lib
from research import provenance
from research import runner
from research import scaling_fits
from research import scaling_plots
from research.core import config_lib
from research.core import writers

RUNS, RESULTS, SIZES = "scaling_runs", "scaling_results", "sizes.json"
DONE = "finished_runs.json"  # every finished run's row, only ever added to
PREDICTION = "heldout_prediction.json"
EMBEDDINGS = ("token_embed", "position_embed")

flags.DEFINE_bool("heldout", False, "After the grid: predict the held-out run "
                  "from the fits, then train it and compare.")


def size_config(grid: ml_collections.ConfigDict, size: str
                ) -> ml_collections.ConfigDict:
    """The base config with the grid's overrides and the size's model."""
    sizes = {**grid.sizes.to_dict(), **grid.heldout.sizes.to_dict()}
    if size not in sizes:
        raise errors.UserError(f"Unknown size {size!r}; the grid has {sorted(sizes)}.")
    overrides = dict(config_lib.dotted_items(grid.overrides.to_dict()))
    overrides.update(config_lib.dotted_items({"model_kwargs": sizes[size]}))
    return config_lib.load_config(grid.config, overrides)


def measure_size(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Parameters (all, and without the embeddings: N), XLA's FLOPs of one
    train step, tokens per step and steps per epoch of one size."""
    exp = assembly.build(config, mesh=mesh_lib.create_mesh(1))
    args = costs.train_step_args(exp, config.batch_size)
    leaves = jax.tree_util.tree_leaves_with_path(args.carry.state.params)
    total = sum(x.size for _, x in leaves)
    embed = sum(x.size for p, x in leaves
                if any(getattr(k, "key", None) in EMBEDDINGS for k in p))
    rows = exp.dataset.train_rows(config, exp.info)
    return {"params": total - embed, "params_total": total,
            "flops_per_step": costs.train_step_flops(exp, config.batch_size, args),
            "tokens_per_step": config.batch_size * config.seq_len,
            "steps_per_epoch": sum(rows.counts) // config.batch_size}


def run_name(size: str, budget: float) -> str:
    return f"{size}_C{budget:.2g}".replace("+", "")


class Grid:
    """The runs of one scaling config in `workdir`, and their fits."""

    def __init__(self, grid: ml_collections.ConfigDict, workdir: str,
                 allow_config_change: bool = False):
        self.grid, self.workdir = grid, workdir
        self.table = runner.Runner(workdir, RUNS, render_runs, allow_config_change)
        self.sizes = self._read(SIZES) or {}
        self.done = self._read(DONE) or {}  # finished runs: reused, not rerun
        self.trained = 0  # runs this command trained (or resumed)

    def _read(self, name: str) -> Any:
        path = os.path.join(self.workdir, name)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def _write(self, name: str, content: Any) -> None:
        path = os.path.join(self.workdir, name)
        with open(path + ".tmp", "w") as f:
            json.dump(content, f, indent=1)
        os.replace(path + ".tmp", path)

    def size(self, name: str) -> dict[str, Any]:
        """A size's measurements, measured once per workdir."""
        if name not in self.sizes:
            logging.info("Measuring size %s", name)
            self.sizes[name] = measure_size(size_config(self.grid, name))
            self._write(SIZES, self.sizes)
        return self.sizes[name]

    def train(self, size: str, budget: float) -> dict[str, Any]:
        """Trains (or resumes, or re-evaluates) one run; its row."""
        m = self.size(size)
        steps = _steps(m, budget)
        name = run_name(size, budget)
        if name not in self.done and os.path.isdir(self.table.path(name)):
            self._recover(name, size, budget, steps)
        if (name in self.done and self.done[name]["steps"] == steps
                and os.path.isdir(self.table.path(name))):
            return self.done[name]
        config = size_config(self.grid, size)
        config.num_epochs = steps / m["steps_per_epoch"]
        start = time.perf_counter()
        result = self.table.train(name, config)
        self.trained += 1
        if result["step"] != steps:
            raise errors.UserError(
                f"Run {name} ended at step {result['step']}, not the {steps} its "
                "budget asks: its workdir holds another run; remove it.")
        return self._finished(name, size, budget, steps, result["eval/loss"],
                              time.perf_counter() - start)

    def _finished(self, name: str, size: str, budget: float, steps: int,
                  loss: float, seconds: float) -> dict[str, Any]:
        m = self.sizes[size]
        row = {"name": name, "size": size, "budget": budget,
               "params": m["params"], "params_total": m["params_total"],
               "steps": steps, "tokens": steps * m["tokens_per_step"],
               "flops": steps * m["flops_per_step"], "loss": loss,
               "seconds": seconds}
        self.done[name] = row
        self._write(DONE, self.done)
        return row

    def _recover(self, name: str, size: str, budget: float, steps: int) -> None:
        """The row of a run that finished without one (a command stopped
        before writing it): its final evaluation, from its metrics; the
        seconds from their timestamps (the first logged steps' time
        extrapolated from their speed)."""
        try:
            records = writers.read_metrics(self.table.path(name))
        except (OSError, ValueError):
            return
        final = [r for r in records if r.get("step") == steps and "eval/loss" in r]
        timed = [r for r in records if "perf/steps_per_sec" in r]
        if final and timed:
            seconds = (final[-1]["time"] - timed[0]["time"]
                       + timed[0]["step"] / timed[0]["perf/steps_per_sec"])
            self._finished(name, size, budget, steps, final[-1]["eval/loss"],
                           seconds)

    def run(self) -> dict[str, Any]:
        """Every run of the grid (smallest budgets first); the fits are redone
        after each budget that trained something, and once at the end."""
        results, stale = {}, False
        for budget in sorted(self.grid.budgets):
            trained = self.trained
            for size in self.grid.sizes:
                self.table.add(self.train(size, budget))
            if self.trained > trained:
                results, stale = self.fit(), False
            else:
                stale = True
        return self.fit() if stale else results

    def fit(self) -> dict[str, Any]:
        rows = [r for r in self.table.rows if r["budget"] in self.grid.budgets]
        fits = scaling_fits.fit_all(rows, self.grid.bootstrap_replicas,
                                    list(self.grid.table_budgets))
        results = {"about": self.table.about, "runs": rows, "fits": fits}
        self._publish(results)
        return results

    def _publish(self, results: dict[str, Any]) -> None:
        """Writes the results (with the held-out check, if any) and plots."""
        prediction = self._read(PREDICTION)
        if prediction:
            results["heldout"] = prediction
        self._write(RESULTS + ".json", results)
        with open(os.path.join(self.workdir, RESULTS + ".md"), "w") as f:
            f.write("\n".join(render_results(results)) + "\n")
        scaling_plots.plot_all(results, self.workdir)

    def heldout(self, results: dict[str, Any]) -> dict[str, Any]:
        """Predicts the held-out run from `run()`'s fits (once), trains it and
        compares (once)."""
        spec = self.grid.heldout
        m = self.size(spec.size)
        prediction = self._read(PREDICTION)
        if prediction is None:
            fits = results["fits"]
            steps = _steps(m, spec.budget)
            tokens, flops = steps * m["tokens_per_step"], steps * m["flops_per_step"]
            one = fits["approach1"]
            prediction = {
                "size": spec.size, "budget": spec.budget, "params": m["params"],
                "tokens": tokens, "flops": flops,
                "predicted_loss": scaling_fits.predict(fits["approach3"], m["params"],
                                                       tokens),
                "envelope_loss": (float(scaling_fits.envelope(one, flops)[1])
                                  if "loss_exponent" in one else None),
                "optimal_at_budget": scaling_fits.optimal_size(
                    fits["approach3"], flops, scaling_fits.flops_fit(fits)),
                "predicted": provenance.about()}
            self._write(PREDICTION, prediction)
            writers.report(f"held-out {spec.size} at {flops:.3g} FLOPs: predicted "
                           f"loss {prediction['predicted_loss']:.4f} (written to "
                           f"{PREDICTION} before training)")
        if "measured_loss" in prediction:  # done (and in `results` already)
            return prediction
        row = self.train(spec.size, spec.budget)
        prediction["measured_loss"] = row["loss"]
        prediction["measured_seconds"] = row["seconds"]
        prediction["error"] = row["loss"] - prediction["predicted_loss"]
        self._write(PREDICTION, prediction)
        self._publish(results)
        return prediction


def _steps(size: dict[str, Any], budget: float) -> int:
    """The steps that spend `budget` FLOPs on a size (at least one)."""
    return max(1, int(round(budget / size["flops_per_step"])))


def _num(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def render_runs(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| run | N (non-embedding) | tokens | FLOPs | steps | validation loss | "
             "time |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {_num(r['params'])} | {_num(r['tokens'])} | "
                     f"{r['flops']:.3g} | {r['steps']} | {r['loss']:.4f} | "
                     f"{r['seconds']:.0f} s |")
    return lines


def _interval(fits: dict[str, Any], key: str) -> str:
    ci = fits["intervals"].get(key)
    return f"[{ci['p5']:.3f}, {ci['p95']:.3f}]" if ci else "(no interval)"


def render_results(results: dict[str, Any]) -> list[str]:
    """scaling_results.md: the fits, the compute-optimal table, the runs."""
    about, fits = results["about"], results["fits"]
    one, three = fits["approach1"], fits["approach3"]
    lines = [*provenance.header(about), "# Scaling-law fits", "",
             f"{len(results['runs'])} runs; intervals: 5th-95th percentile over "
             f"bootstrap resamplings of the runs.", "",
             "| fit | N*(C) exponent | D*(C) exponent | other |", "|---|---|---|---|"]
    if "params_exponent" in one:
        lines.append(
            f"| approach 1 (isoFLOP minima) | {one['params_exponent']:.3f} "
            f"{_interval(fits, 'approach1/params_exponent')} | "
            f"{one['tokens_exponent']:.3f} {_interval(fits, 'approach1/tokens_exponent')}"
            f" | L*(C) ∝ C^-{one['loss_exponent']:.3f} "
            f"{_interval(fits, 'approach1/loss_exponent')} |")
    else:
        lines.append(f"| approach 1 (isoFLOP minima) | none: {one.get('minima_used', 0)} "
                     "budget(s) with a minimum inside the sizes run, 2 needed | | |")
    lines.append(
        f"| approach 3 (L = E + A/N^α + B/D^β) | {three['params_exponent']:.3f} "
        f"{_interval(fits, 'approach3/params_exponent')} | "
        f"{three['tokens_exponent']:.3f} {_interval(fits, 'approach3/tokens_exponent')}"
        f" | E={three['E']:.3f}, A={three['A']:.4g}, B={three['B']:.4g}, "
        f"α={three['alpha']:.3f} {_interval(fits, 'approach3/alpha')}, "
        f"β={three['beta']:.3f} {_interval(fits, 'approach3/beta')} |")
    f = fits["flops_per_param_token"]
    lines += ["", f"FLOPs per parameter per token (XLA's count / (N D)): "
              f"{f['coef']:.3g} N^{f['exponent']:.3f} (6 in the 6ND rule).", "",
              "## For a budget of C FLOPs", "",
              "| C (FLOPs) | N parameters | D tokens | tokens per parameter | "
              "expected loss | approach 1: N, loss |", "|---|---|---|---|---|---|"]
    for row in fits["table"]:
        a1 = (f"{_num(row['approach1_params'])}, {row['approach1_loss']:.3f}"
              if "approach1_params" in row else "")
        lines.append(f"| {row['flops']:.0e} | {_num(row['params'])} | "
                     f"{_num(row['tokens'])} | {row['tokens'] / row['params']:.1f} | "
                     f"{row['loss']:.3f} | {a1} |")
    if one.get("minima"):
        lines += ["", "## isoFLOP minima (approach 1)", "",
                  "| budget | N* | loss | inside the sizes run |", "|---|---|---|---|"]
        lines += [f"| {m['budget']:.3g} | {_num(m['params'])} | {m['loss']:.4f} | "
                  f"{'yes' if m['inside'] else 'no (extrapolated)'} |"
                  for m in one["minima"]]
    held = results.get("heldout")
    if held:
        lines += ["", "## Held-out run", "",
                  f"{held['size']} ({_num(held['params'])} parameters) on "
                  f"{_num(held['tokens'])} tokens, {held['flops']:.3g} FLOPs: "
                  f"predicted {held['predicted_loss']:.4f} (approach 3; predicted "
                  f"{held['predicted']['date']}, commit {held['predicted']['commit']})"]
        if "measured_loss" in held:
            lines[-1] += (f", measured {held['measured_loss']:.4f} "
                          f"(error {held['error']:+.4f}).")
    lines += ["", "## Runs", ""] + render_runs(results["runs"])
    return lines


def _main(argv: list[str]) -> None:
    workdir = cli.pipeline_workdir(
        argv, "configs/pipelines/scaling_shakespeare.py:cpu")
    grid = Grid(flags.FLAGS.config, workdir, flags.FLAGS.allow_config_change)
    results = grid.run()
    if flags.FLAGS.heldout:
        grid.heldout(results)
    writers.report(f"results: {os.path.join(workdir, RESULTS + '.md')}")


if __name__ == "__main__":
    app.run(lambda argv: cli.guarded(_main, argv),
            flags_parser=cli.parse_flags)
