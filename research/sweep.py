"""Variants of one experiment, run one after the other, and one table.

XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python -m research.sweep --config=configs/pipelines/diloco_cifar.py \
        --workdir=runs/diloco

A sweep config names a base experiment (a config file and overrides) and
variants (name -> overrides, e.g. the data-parallel scheme). Each variant is
an ordinary run in `<workdir>/<name>`: it resumes like any run, and a
finished one is only evaluated again (`runner.py`). The results go to
`<workdir>/sweep_results.{json,md}`: the final evaluation metrics, what the
run communicated (`comm/syncs`, `comm/bytes_per_step`, see
`parallel/diloco.py`), and its training time.
"""
import os
import time
from typing import Any

from absl import app
from absl import flags
import ml_collections

from research.core import config_lib
from research import errors
from research import cli
from research import runner
from research.core import writers

RESULTS = "sweep_results"


def variant_config(sweep: ml_collections.ConfigDict, name: str
                   ) -> ml_collections.ConfigDict:
    """The base config with the shared and the variant's overrides."""
    if name not in sweep.variants:
        raise errors.UserError(f"Unknown variant {name!r}; the sweep has "
                               f"{sorted(sweep.variants)}.")
    overrides = dict(config_lib.dotted_items(sweep.overrides.to_dict()))
    overrides.update(config_lib.dotted_items(sweep.variants[name].to_dict()))
    return config_lib.load_config(sweep.config, overrides)


def _last(records: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records if key in r]
    return values[-1] if values else None


def run(sweep: ml_collections.ConfigDict, workdir: str,
        allow_config_change: bool = False) -> list[dict[str, Any]]:
    """Trains (or resumes, or evaluates) every variant; returns the rows.
    `allow_config_change` lets every variant resume with a changed config."""
    # `order`: names to run, in the table's order (ConfigDict sorts keys).
    names = list(sweep.order) if sweep.get("order") else sorted(sweep.variants)
    configs = {name: variant_config(sweep, name) for name in names}  # checked first
    table = runner.Runner(workdir, RESULTS, render, allow_config_change)
    for name in names:
        start = time.perf_counter()
        result = table.train(name, configs[name])
        records = writers.read_metrics(table.path(name))
        table.add({
            "name": name, "step": result["step"], "seed": configs[name].seed,
            **{k: v for k, v in result.items() if k.startswith("eval/")},
            "syncs": _last(records, "comm/syncs") or 0.0,
            "bytes_per_step": _last(records, "comm/bytes_per_step") or 0.0,
            "seconds": time.perf_counter() - start})
    return table.rows


def render(rows: list[dict[str, Any]]) -> list[str]:
    """The Markdown table: each row beside the first one."""
    metrics = [k for k in rows[0] if k.startswith("eval/")]
    first = rows[0]
    head = " | ".join(m.removeprefix("eval/") + f" (vs {first['name']})"
                      for m in metrics)
    lines = [f"| variant | seed | steps | {head} | syncs | MB sent per step | "
             "train + eval time |", "|---" * (6 + len(metrics)) + "|"]
    for r in rows:
        cells = " | ".join(f"{r[m]:.4f} ({r[m] - first[m]:+.4f})" for m in metrics)
        lines.append(f"| {r['name']} | {r['seed']} | {r['step']} | {cells} | "
                     f"{r['syncs']:.0f} | {r['bytes_per_step'] / 1e6:.3f} | "
                     f"{r['seconds']:.0f} s |")
    return lines


def _main(argv: list[str]) -> None:
    """`--config` is a sweep config here; `--workdir` holds the variants."""
    workdir = cli.pipeline_workdir(argv, "configs/pipelines/diloco_cifar.py")
    run(flags.FLAGS.config, workdir, flags.FLAGS.allow_config_change)
    writers.report(f"table: {os.path.join(workdir, RESULTS + '.md')}")


if __name__ == "__main__":
    app.run(lambda argv: cli.guarded(_main, argv),
            flags_parser=cli.parse_flags)
