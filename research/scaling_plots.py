"""The scaling grid's plots as PNG files (matplotlib Agg, no display).

`plot_all(results, workdir)` writes, from `scaling_results.json`'s content:
`loss_vs_tokens.png` (each size's final validation loss against its
training tokens), `isoflops.png` (each budget's loss against N, the fitted
parabola and its minimum) and `frontier.png` (the isoFLOP minima with the
approach-1 power law and approach 3's compute-optimal loss and size).
"""
import os
from typing import Any

import numpy as np
from matplotlib import figure as mpl_figure
from matplotlib.backends import backend_agg

from research import scaling_fits


def _save(fig: mpl_figure.Figure, path: str) -> str:
    backend_agg.FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path


def loss_vs_tokens(results: dict[str, Any], path: str) -> str:
    fig = mpl_figure.Figure(figsize=(6.5, 4.5), tight_layout=True)
    ax = fig.add_subplot()
    runs = results["runs"]
    three = results["fits"]["approach3"]
    for i, size in enumerate(dict.fromkeys(r["size"] for r in runs)):
        group = sorted((r for r in runs if r["size"] == size), key=lambda r: r["tokens"])
        d = np.array([r["tokens"] for r in group])
        ax.plot(d, [r["loss"] for r in group], "o", color=f"C{i}",
                label=f"{size} (N={group[0]['params']:,})")
        grid = np.geomspace(d.min() / 1.5, d.max() * 1.5, 50)
        ax.plot(grid, [scaling_fits.predict(three, group[0]["params"], t) for t in grid],
                "-", color=f"C{i}", linewidth=1, alpha=0.6)
    ax.set(xscale="log", xlabel="training tokens D", ylabel="validation loss (nats/char)",
           title="Loss against tokens per size (lines: approach 3's fit)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def isoflops(results: dict[str, Any], path: str) -> str:
    fig = mpl_figure.Figure(figsize=(6.5, 4.5), tight_layout=True)
    ax = fig.add_subplot()
    runs = results["runs"]
    minima = {m["budget"]: m for m in results["fits"]["approach1"]["minima"]}
    for i, budget in enumerate(sorted({r["budget"] for r in runs})):
        group = sorted((r for r in runs if r["budget"] == budget),
                       key=lambda r: r["params"])
        n = np.array([r["params"] for r in group], float)
        loss = np.array([r["loss"] for r in group])
        ax.plot(n, loss, "o", color=f"C{i}", label=f"C = {budget:.2g} FLOPs")
        if len(n) >= 3:
            coef = np.polyfit(np.log(n), loss, 2)
            grid = np.geomspace(n.min(), n.max(), 50)
            ax.plot(grid, np.polyval(coef, np.log(grid)), "-", color=f"C{i}",
                    linewidth=1)
        if budget in minima and minima[budget]["inside"]:
            ax.plot(minima[budget]["params"], minima[budget]["loss"], "*",
                    color=f"C{i}", markersize=14, markeredgecolor="k")
    ax.set(xscale="log", xlabel="non-embedding parameters N",
           ylabel="validation loss (nats/char)",
           title="isoFLOP curves and their minima inside the sizes (stars)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def frontier(results: dict[str, Any], path: str) -> str:
    fits = results["fits"]
    one, three = fits["approach1"], fits["approach3"]
    fig = mpl_figure.Figure(figsize=(11, 4.5), tight_layout=True)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    runs = results["runs"]
    c_all = [r["flops"] for r in runs] + [row["flops"] for row in fits["table"]]
    grid = np.geomspace(min(c_all), max(c_all), 60)
    optimal = [scaling_fits.optimal_size(three, c, scaling_fits.flops_fit(fits))
               for c in grid]
    left.plot([r["flops"] for r in runs], [r["loss"] for r in runs], ".", color="0.6",
              label="runs")
    right.plot(grid, [o["params"] for o in optimal], "-", color="C1",
               label=f"approach 3: N* ∝ C^{three['params_exponent']:.2f}")
    left.plot(grid, [o["loss"] for o in optimal], "-", color="C1",
              label="approach 3: loss at N*(C)")
    inside = [m for m in one.get("minima", []) if m["inside"]]
    if inside:
        c = np.array([m["flops"] for m in inside])
        left.plot(c, [m["loss"] for m in inside], "*", color="C0",
                  markersize=12, label="isoFLOP minima (inside the sizes)")
        right.plot(c, [m["params"] for m in inside], "*", color="C0",
                   markersize=12, label="isoFLOP minima (inside the sizes)")
    if "params_exponent" in one:
        params, loss = scaling_fits.envelope(one, grid)
        left.plot(grid, loss, "--", color="C0",
                  label=f"approach 1: L* ∝ C^-{one['loss_exponent']:.3f}")
        right.plot(grid, params, "--", color="C0",
                   label=f"approach 1: N* ∝ C^{one['params_exponent']:.2f}")
    held = results.get("heldout")
    if held and "measured_loss" in held:
        left.plot(held["flops"], held["measured_loss"], "D", color="C3",
                  label="held-out run (measured)")
        left.plot(held["flops"], held["predicted_loss"], "x", color="C3",
                  markersize=10, label="held-out run (predicted)")
    left.set(xscale="log", xlabel="training FLOPs C", ylabel="validation loss",
             title="Loss frontier")
    right.set(xscale="log", yscale="log", xlabel="training FLOPs C",
              ylabel="compute-optimal N", title="Compute-optimal size")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    return _save(fig, path)


def plot_all(results: dict[str, Any], workdir: str) -> list[str]:
    return [loss_vs_tokens(results, os.path.join(workdir, "loss_vs_tokens.png")),
            isoflops(results, os.path.join(workdir, "isoflops.png")),
            frontier(results, os.path.join(workdir, "frontier.png"))]
