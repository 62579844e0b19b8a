"""Scaling-law fits over a grid of runs (Hoffmann et al. 2022, "Chinchilla").

A run is (N non-embedding parameters, D training tokens, C training FLOPs,
final validation loss L). Two fits, as in the paper:

- Approach 1 (here on isoFLOP slices, the paper's approach 2, because the
  grid fixes C rather than reading training curves): for every budget C a
  parabola of L in log N; its minimum is that budget's best size N*(C) and
  loss L*(C), the loss-vs-compute envelope. Power laws N*(C) = k C^a,
  D*(C) = C / (F N*) ∝ C^b and L*(C) = k' C^-g fit the minima in log-log,
  those inside the range of sizes run (at least two).
- Approach 3: L(N, D) = E + A / N^alpha + B / D^beta, fitted to every run
  with a Huber loss on log L (delta 1e-3) by L-BFGS from a grid of starts;
  the compute-optimal exponent of N is beta / (alpha + beta).

C is XLA's count of the compiled train step times the steps (it includes
attention and the embeddings, which 6 N D leaves out); F = C / (N D), the
FLOPs per parameter per token, is fitted as a power of N so that a budget
maps to tokens. Intervals: bootstrap over the runs (resampled with
replacement), 5th and 95th percentiles.
"""
import itertools
from typing import Any, Sequence

import numpy as np
from scipy import optimize

Run = dict[str, Any]  # needs "params", "tokens", "flops", "loss"
HUBER_DELTA = 1e-3


def _loglog_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(exponent, log coefficient) of y = e^c x^exponent, least squares in logs."""
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    return float(slope), float(intercept)


def isoflop_minimum(params: np.ndarray, losses: np.ndarray) -> dict[str, Any] | None:
    """The minimum of a parabola in log N through one budget's runs, or None
    when it has no interior minimum (under 3 sizes, or not convex).
    `inside`: the minimum lies within the sizes run (else extrapolated)."""
    if len(set(params.tolist())) < 3:
        return None
    x = np.log(params)
    c2, c1, c0 = np.polyfit(x, losses, 2)
    if c2 <= 0:
        return None
    x_opt = -c1 / (2 * c2)
    return {"params": float(np.exp(x_opt)), "loss": float(c0 - c1 ** 2 / (4 * c2)),
            "inside": bool(x.min() <= x_opt <= x.max())}


def flops_per_param_token(runs: Sequence[Run]) -> tuple[float, float]:
    """(exponent, log coefficient) of F(N) = C / (N D) as a power of N."""
    n = np.array([r["params"] for r in runs], float)
    f = np.array([r["flops"] / (r["params"] * r["tokens"]) for r in runs])
    return _loglog_fit(n, f)


def approach1(runs: Sequence[Run]) -> dict[str, Any]:
    """isoFLOP minima per budget and power laws through them."""
    budgets = sorted({r["budget"] for r in runs})
    minima = []
    for budget in budgets:
        group = [r for r in runs if r["budget"] == budget]
        m = isoflop_minimum(np.array([r["params"] for r in group], float),
                            np.array([r["loss"] for r in group], float))
        if m is not None:
            flops = float(np.mean([r["flops"] for r in group]))
            minima.append({"budget": budget, "flops": flops, **m})
    out: dict[str, Any] = {"minima": minima}
    # A minimum beyond the sizes run is an extrapolation of the parabola,
    # not a measurement: the power laws use the interior ones only.
    inside = [m for m in minima if m["inside"]]
    out["minima_used"] = len(inside)
    if len(inside) >= 2:
        c = np.array([m["flops"] for m in inside])
        n = np.array([m["params"] for m in inside])
        loss = np.array([m["loss"] for m in inside])
        f_exp, f_log = flops_per_param_token(runs)
        tokens = c / (np.exp(f_log) * n ** (1 + f_exp))
        out["params_exponent"], out["params_log_coef"] = _loglog_fit(c, n)
        out["tokens_exponent"], out["tokens_log_coef"] = _loglog_fit(c, tokens)
        slope, out["loss_log_coef"] = _loglog_fit(c, loss)
        out["loss_exponent"] = -slope
    return out


def _lse_model(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray):
    """log L and its gradient for theta = (a, b, e, alpha, beta):
    L = e^a / N^alpha + e^b / D^beta + e^e."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d,
                      np.full_like(log_n, e)])
    top = terms.max(axis=0)
    w = np.exp(terms - top)
    total = w.sum(axis=0)
    w /= total
    grad = np.stack([w[0], w[1], w[2], -w[0] * log_n, -w[1] * log_d])
    return top + np.log(total), grad


def _huber_objective(theta, log_n, log_d, log_loss):
    pred, grad = _lse_model(theta, log_n, log_d)
    r = pred - log_loss
    small = np.abs(r) <= HUBER_DELTA
    value = np.where(small, 0.5 * r ** 2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA))
    return float(value.sum()), grad @ np.clip(r, -HUBER_DELTA, HUBER_DELTA)


def _starts() -> list[np.ndarray]:
    """The grid of initial (a, b, e, alpha, beta), coarser than the paper's."""
    return [np.array(s, float) for s in itertools.product(
        (0.0, 5.0, 10.0, 15.0, 20.0), (0.0, 5.0, 10.0, 15.0, 20.0),
        (-1.0, 0.0, 1.0), (0.25, 0.5, 1.0), (0.25, 0.5, 1.0))]


def _fit_theta(runs: Sequence[Run], starts: Sequence[np.ndarray]) -> tuple[np.ndarray, float]:
    log_n = np.log([r["params"] for r in runs])
    log_d = np.log([r["tokens"] for r in runs])
    log_loss = np.log([r["loss"] for r in runs])
    best, best_value = None, np.inf
    bounds = [(None, None)] * 3 + [(1e-3, 5.0)] * 2
    for start in starts:
        res = optimize.minimize(_huber_objective, start, jac=True, method="L-BFGS-B",
                                args=(log_n, log_d, log_loss), bounds=bounds)
        if res.fun < best_value:
            best, best_value = res.x, float(res.fun)
    return best, best_value


def _parametric(theta: np.ndarray) -> dict[str, float]:
    a, b, e, alpha, beta = (float(v) for v in theta)
    return {"E": np.exp(e), "A": np.exp(a), "B": np.exp(b), "alpha": alpha,
            "beta": beta, "params_exponent": beta / (alpha + beta),
            "tokens_exponent": alpha / (alpha + beta)}


def predict(fit: dict[str, float], params: float, tokens: float) -> float:
    """Approach 3's loss for N parameters trained on D tokens."""
    return fit["E"] + fit["A"] / params ** fit["alpha"] + fit["B"] / tokens ** fit["beta"]


def optimal_size(fit: dict[str, float], flops: float, flops_fit: tuple[float, float]
                 ) -> dict[str, float]:
    """The N (and D = C / (F(N) N)) of least predicted loss for budget C."""
    f_exp, f_log = flops_fit

    def tokens(log_n):
        return flops / (np.exp(f_log) * np.exp(log_n) ** (1 + f_exp))

    res = optimize.minimize_scalar(
        lambda log_n: predict(fit, np.exp(log_n), tokens(log_n)),
        bounds=(np.log(1e2), np.log(1e12)), method="bounded")
    n = float(np.exp(res.x))
    return {"flops": flops, "params": n, "tokens": float(tokens(res.x)),
            "loss": float(res.fun)}


def envelope(one: dict[str, Any], flops: Any) -> tuple[Any, Any]:
    """Approach 1's power laws at budget(s) C: (N*(C), L*(C))."""
    return (np.exp(one["params_log_coef"]) * flops ** one["params_exponent"],
            np.exp(one["loss_log_coef"]) * flops ** -one["loss_exponent"])


def flops_fit(fits: dict[str, Any]) -> tuple[float, float]:
    """`fit_all`'s F(N) as `optimal_size` takes it: (exponent, log coef)."""
    f = fits["flops_per_param_token"]
    return f["exponent"], float(np.log(f["coef"]))


def approach3(runs: Sequence[Run]) -> dict[str, Any]:
    theta, value = _fit_theta(runs, _starts())
    return {**_parametric(theta), "huber_sum": value, "theta": theta.tolist()}


def bootstrap(runs: Sequence[Run], main3: dict[str, Any], replicas: int,
              seed: int = 0) -> dict[str, Any]:
    """5th-95th percentile intervals of the exponents over `replicas`
    resamplings of the runs. Approach 3 restarts from the main fit and a few
    grid starts (the full grid per replica would take minutes)."""
    rng = np.random.default_rng(seed)
    starts = [np.array(main3["theta"])] + _starts()[::100]
    samples: dict[str, list[float]] = {}
    for _ in range(replicas):
        sample = [runs[i] for i in rng.integers(0, len(runs), len(runs))]
        one = approach1(sample)
        for key in ("params_exponent", "tokens_exponent", "loss_exponent"):
            if key in one:
                samples.setdefault(f"approach1/{key}", []).append(one[key])
        if len({(r["params"], r["tokens"]) for r in sample}) >= 6:
            three = _parametric(_fit_theta(sample, starts)[0])
            for key in ("params_exponent", "tokens_exponent", "alpha", "beta", "E"):
                samples.setdefault(f"approach3/{key}", []).append(three[key])
    return {key: {"p5": float(np.percentile(v, 5)), "p95": float(np.percentile(v, 95)),
                  "replicas": len(v)} for key, v in samples.items()}


def fit_all(runs: Sequence[Run], replicas: int = 200,
            table_budgets: Sequence[float] = ()) -> dict[str, Any]:
    """Both approaches, their bootstrap intervals, and the compute-optimal
    table (approach 3's N, D and loss, beside approach 1's) for each budget."""
    one, three = approach1(runs), approach3(runs)
    flops_fit = flops_per_param_token(runs)
    table = []
    for c in table_budgets:
        row = optimal_size(three, c, flops_fit)
        if "params_exponent" in one:
            params, loss = envelope(one, c)
            row["approach1_params"], row["approach1_loss"] = float(params), float(loss)
        table.append(row)
    return {"approach1": one, "approach3": three,
            "flops_per_param_token": {"exponent": flops_fit[0],
                                      "coef": float(np.exp(flops_fit[1]))},
            "intervals": bootstrap(runs, three, replicas), "table": table}
