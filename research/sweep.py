"""Variants of one experiment over seeds, a choice made on validation data,
the test split scored once, and one table.

XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python -m research.sweep --config=configs/pipelines/diloco_cifar.py \
        --workdir=runs/diloco

A sweep config names a base experiment (a config file and overrides) and
variants (name -> overrides, e.g. the data-parallel scheme; a variant's
`config` key names another config file or preset, e.g. a recipe's). Each variant
runs with `seeds[0]`; the `baseline` and the candidates of `choose.among`
with every seed in `seeds`. Each (variant, seed) is an ordinary run in
`<workdir>/<variant>_seed<s>`: it resumes like any run, and a finished one is
only evaluated again (`runner.py`), so a stopped sweep goes on where it
stopped. The runs' own evaluation split is the validation split (the config
carves it from the training data); the candidate with the best mean
validation score over the seeds is chosen, and only then are the baseline
and the chosen variant scored on `test_split`, every seed. The results go to
`<workdir>/sweep_results.{json,md}`: each run's final metrics, what it
communicated (`comm/syncs`, `comm/bytes_per_step`, see `parallel/diloco.py`)
and its time; the choice with the scores it was made on; the headline rows
as mean ± standard deviation over the seeds.
"""
import functools
import os
import statistics
import time
from typing import Any

from absl import app
from absl import flags
import ml_collections

from research.core import config_lib
from research import errors
from research import cli
from research import evaluate
from research import runner
from research.core import writers

RESULTS = "sweep_results"


def variant_config(sweep: ml_collections.ConfigDict, name: str,
                   seed: int | None = None) -> ml_collections.ConfigDict:
    """The base config with the shared and the variant's overrides (and
    `seed`, default the first of the sweep's seeds)."""
    if name not in sweep.variants:
        raise errors.UserError(f"Unknown variant {name!r}; the sweep has "
                               f"{sorted(sweep.variants)}.")
    variant = sweep.variants[name].to_dict()
    base = variant.pop("config", sweep.config)  # a variant may name its own
    overrides = dict(config_lib.dotted_items(sweep.overrides.to_dict()))
    overrides.update(config_lib.dotted_items(variant))
    overrides["seed"] = sweep.seeds[0] if seed is None else seed
    return config_lib.load_config(base, overrides)


def check(sweep: ml_collections.ConfigDict) -> None:
    """Names and seeds, before any compute; raises UserError."""
    names = [*sweep.order, sweep.baseline, *sweep.choose.among, *_seeded(sweep)]
    unknown = sorted(set(names) - set(sweep.variants))
    if unknown:
        raise errors.UserError(f"The sweep names variants {unknown} that "
                               f"`variants` lacks; it has {sorted(sweep.variants)}.")
    if not sweep.seeds or len(set(sweep.seeds)) != len(sweep.seeds):
        raise errors.UserError(f"sweep.seeds is {tuple(sweep.seeds)}; give one "
                               "or more distinct seeds.")
    if sweep.choose.among and sweep.baseline in sweep.choose.among:
        raise errors.UserError("sweep.choose.among holds the baseline "
                               f"{sweep.baseline!r}; it is compared with them, "
                               "not chosen among them.")


def _seeded(sweep: ml_collections.ConfigDict) -> list[str]:
    """The variants that run with every seed: the baseline, the candidates
    and `seeded` (in that order, once each)."""
    names = [sweep.baseline, *sweep.choose.among, *sweep.get("seeded", ())]
    return list(dict.fromkeys(names))


def plan(sweep: ml_collections.ConfigDict) -> list[tuple[str, int]]:
    """(variant, seed) in run order: every variant with the first seed (the
    table's order), then the seeded variants with the others."""
    first = list(sweep.order) or sorted(sweep.variants)
    first += [name for name in _seeded(sweep) if name not in first]
    more = [(name, seed) for name in _seeded(sweep) for seed in sweep.seeds[1:]]
    return [(name, sweep.seeds[0]) for name in first] + more


def _previous_seconds(table: runner.Runner) -> dict[str, float]:
    """Run name -> its time in the table an earlier invocation wrote."""
    path = table.table_path(".json")
    return ({r["name"]: r["seconds"] for r in runner.read_rows(path)}
            if os.path.exists(path) else {})


def run_name(variant: str, seed: int) -> str:
    return f"{variant}_seed{seed}"


def _last(records: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records if key in r]
    return values[-1] if values else None


def _scores(rows: list[dict[str, Any]], key: str) -> dict[str, list[float]]:
    """variant -> `key` of its runs, in seed order."""
    out: dict[str, list[float]] = {}
    for r in rows:
        if key in r:
            out.setdefault(r["variant"], []).append(r[key])
    return out


def choose(sweep: ml_collections.ConfigDict, rows: list[dict[str, Any]]
           ) -> tuple[str | None, dict[str, float]]:
    """The candidate with the best mean validation score over every seed (and
    the means); None while a candidate lacks a seed, or with no candidates."""
    if not sweep.choose.among:
        return None, {}
    scores = _scores(rows, "eval/" + sweep.choose.metric)
    if any(len(scores.get(n, [])) < len(sweep.seeds) for n in sweep.choose.among):
        return None, {}
    means = {n: statistics.fmean(scores[n]) for n in sweep.choose.among}
    best = (max if sweep.choose.higher else min)(means, key=means.get)
    return best, means


def run(sweep: ml_collections.ConfigDict, workdir: str,
        allow_config_change: bool = False) -> list[dict[str, Any]]:
    """Trains (or resumes, or evaluates) every run, chooses, scores the test
    split; returns the rows. `allow_config_change` lets every run resume with
    a changed config."""
    check(sweep)
    runs = plan(sweep)
    configs = {(n, s): variant_config(sweep, n, s) for n, s in runs}  # checked first
    table = runner.Runner(workdir, RESULTS, functools.partial(render, sweep),
                          allow_config_change)
    table.about["seeds"] = list(sweep.seeds)
    previous = _previous_seconds(table)
    for name, seed in runs:
        start, started = time.perf_counter(), time.time()
        result = table.train(run_name(name, seed), configs[name, seed])
        records = writers.read_metrics(table.path(run_name(name, seed)))
        seconds = time.perf_counter() - start
        if not any(r.get("time", 0.0) >= started for r in records):
            # Only evaluated now: keep the time the run took when it trained.
            seconds = previous.get(run_name(name, seed), seconds)
        table.add({
            "name": run_name(name, seed), "variant": name, "seed": seed,
            "step": result["step"],
            **{k: v for k, v in result.items() if k.startswith("eval/")},
            "syncs": _last(records, "comm/syncs") or 0.0,
            "bytes_per_step": _last(records, "comm/bytes_per_step") or 0.0,
            "seconds": seconds})
    chosen, means = choose(sweep, table.rows)
    table.summary = {"eval_split": configs[runs[0]].eval_split,
                     "chosen": chosen, "chosen_by": {
                         "metric": sweep.choose.metric, "higher": sweep.choose.higher,
                         "means_over_seeds": means}}
    if sweep.test_split:
        headline = {sweep.baseline, *([chosen] if chosen else [])}
        for row in table.rows:
            if row["variant"] in headline:
                config = configs[row["variant"], row["seed"]]
                config = config.copy_and_resolve_references()
                config.eval_split = sweep.test_split
                result = evaluate.evaluate(config, table.path(row["name"]))
                row.update({"test/" + k.removeprefix("eval/"): v
                            for k, v in result.items() if k.startswith("eval/")})
        table.summary["test_split"] = sweep.test_split
    table.write()
    return table.rows


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def render(sweep: ml_collections.ConfigDict, rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: every run beside the baseline's run of its seed; the choice;
    the variants run with several seeds (mean ± sample standard deviation)."""
    metrics = [k for k in rows[0] if k.startswith("eval/")]
    base = {r["seed"]: r for r in rows if r["variant"] == sweep.baseline}
    head = " | ".join(m.removeprefix("eval/") for m in metrics)
    split = "the validation split" if any(
        k.startswith("test/") for r in rows for k in r) else "the evaluation split"
    lines = [f"Every run ({split}; in brackets: minus the "
             f"{sweep.baseline} run of the same seed):", "",
             f"| variant | seed | steps | {head} | syncs | MB sent per step | "
             "train + eval time |", "|---" * (6 + len(metrics)) + "|"]
    for r in rows:
        b = base.get(r["seed"])
        cells = " | ".join(f"{r[m]:.4f}" + (f" ({r[m] - b[m]:+.4f})" if b else "")
                           for m in metrics)
        lines.append(f"| {r['variant']} | {r['seed']} | {r['step']} | {cells} | "
                     f"{r['syncs']:.0f} | {r['bytes_per_step'] / 1e6:.3f} | "
                     f"{r['seconds']:.0f} s |")
    chosen, means = choose(sweep, rows)
    if means:
        listed = ", ".join(f"{n} {v:.4f}" for n, v in means.items())
        lines += ["", f"Chosen on validation {sweep.choose.metric} (mean over seeds "
                  f"{', '.join(map(str, sweep.seeds))}; "
                  f"{'higher' if sweep.choose.higher else 'lower'} is better): "
                  f"**{chosen}** ({listed})."]
    tested = sorted({k for r in rows for k in r if k.startswith("test/")})
    if len({r["seed"] for r in rows}) > 1:
        lines += ["", "Over seeds (mean ± sample std"
                  + ("; the test split scored once, after the choice, for the "
                     "baseline and the chosen variant" if tested else "") + "):", ""]
        lines += _over_seeds(sweep, rows, metrics, tested)
    return lines


def _over_seeds(sweep, rows, metrics, tested) -> list[str]:
    """Every variant run with several seeds: its evaluation metrics, test
    metrics where scored (the difference of means to the baseline's), and
    the main metric per seed."""
    main = sweep.choose.metric if f"eval/{sweep.choose.metric}" in metrics else (
        metrics[0].split("/", 1)[1])
    keys = [f"eval/{main}"] + [f"test/{main}"] * (f"test/{main}" in tested)
    name = lambda m: m.split("/", 1)[1]  # noqa: E731
    split = "validation" if tested else "eval"
    lines = ["| variant | seeds | "
             + " | ".join(f"{split} {name(m)}" for m in metrics)
             + "".join(f" | test {name(m)} (vs {sweep.baseline})" for m in tested)
             + "".join(f" | {split if k.startswith('eval') else 'test'} {main} "
                       "per seed" for k in keys) + " |",
             "|---" * (2 + len(metrics) + len(tested) + len(keys)) + "|"]
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        runs.setdefault(r["variant"], []).append(r)
    for variant, mine in runs.items():
        if len(mine) < 2:
            continue
        cells = [_mean_std([r[m] for r in mine]) for m in metrics]
        for m in tested:
            if not all(m in r for r in mine):
                cells.append("-")
                continue
            vs = statistics.fmean(r[m] for r in mine) - statistics.fmean(
                r[m] for r in runs[sweep.baseline])
            cells.append(_mean_std([r[m] for r in mine])
                         + ("" if variant == sweep.baseline else f" ({vs:+.4f})"))
        for k in keys:
            cells.append(", ".join(f"{r[k]:.4f}" for r in mine) if all(
                k in r for r in mine) else "-")
        seeds = ", ".join(str(r["seed"]) for r in mine)
        lines.append(f"| {variant} | {seeds} | " + " | ".join(cells) + " |")
    return lines


def _main(argv: list[str]) -> None:
    """`--config` is a sweep config here; `--workdir` holds the variants."""
    workdir = cli.pipeline_workdir(argv, "configs/pipelines/diloco_cifar.py")
    run(flags.FLAGS.config, workdir, flags.FLAGS.allow_config_change)
    writers.report(f"table: {os.path.join(workdir, RESULTS + '.md')}")


if __name__ == "__main__":
    app.run(lambda argv: cli.guarded(_main, argv),
            flags_parser=cli.parse_flags)
