"""Training curves and confusion matrices as PNG files (matplotlib Agg, no display).

`plot_run(workdir)` reads `<workdir>/metrics.jsonl` (written by `writers.py`)
and writes `<workdir>/plots/{loss,accuracy,learning_rate}.png`, each metric
against the step and against wall time. Figures are drawn on an Agg canvas
without pyplot, so nothing needs a display and no global backend is changed.
"""
import json
import math
import os
from typing import Any, NamedTuple, Sequence

import numpy as np
from absl import logging
from matplotlib import figure as mpl_figure
from matplotlib.backends import backend_agg

# The name writers.METRICS_JSONL gives the file. Not imported from there:
# writers imports clu's TensorBoard writer, hence TensorFlow (seconds).
METRICS_JSONL = "metrics.jsonl"
PLOTS_DIR = "plots"
# Silence between records beyond the training time they log (see _timeline),
# in seconds, shown as a gap. Normally milliseconds; a restart takes longer.
GAP_S = 10.0

Record = dict[str, Any]
# key, legend label, matplotlib style
Series = tuple[str, str, dict[str, Any]]
_TRAIN = {"color": "C0", "marker": ".", "markersize": 4, "linewidth": 1}
_EPOCH = {"color": "C1", "marker": "o", "markersize": 4, "linewidth": 1.5}
_EVAL = {"color": "C2", "marker": "s", "markersize": 4, "linewidth": 1.5}
LOSS: tuple[Series, ...] = (
    ("train/loss", "train (log window)", _TRAIN),
    ("epoch/train_loss", "train (epoch mean)", _EPOCH),
    ("eval/loss", "eval", _EVAL))
ACCURACY: tuple[Series, ...] = (
    ("train/accuracy", "train (log window)", _TRAIN),
    ("eval/accuracy", "eval", _EVAL))
LEARNING_RATE: tuple[Series, ...] = (
    ("train/learning_rate", "learning rate", _TRAIN),)


def plot_run(workdir: str, gap_s: float = GAP_S) -> list[str]:
    """Writes the training curves of a workdir as PNGs into `<workdir>/plots/`.

    One file per metric group that the records contain: `loss.png` (for text
    models in nats per character, with bits per character on the right axis),
    `accuracy.png`, `learning_rate.png`. Each has two panels. Against the step,
    a step logged twice (a resume from an earlier checkpoint repeats steps)
    shows its later value. Against wall time since the first record, a resume
    (the step goes back) or a silence of more than `gap_s` seconds beyond the
    time the records account for (steps / `perf/steps_per_sec`) is
    cut out of the axis, marked with a dashed line labelled with its length,
    and breaks the lines: the axis is time spent running, gaps shown, not
    stretched across hours of downtime.

    Args:
      workdir: a directory holding `metrics.jsonl`.
      gap_s: shortest silence between records shown as a gap, in seconds.

    Returns:
      The paths of the PNG files written.

    Raises:
      FileNotFoundError: `metrics.jsonl` is missing.
      ValueError: it holds no readable records, or none with a known metric.
    """
    path = os.path.join(workdir, METRICS_JSONL)
    records = _read_records(path)
    keys = {k for r in records for k in r}
    groups = [("loss", "loss", LOSS), ("accuracy", "accuracy", ACCURACY),
              ("learning_rate", "learning rate", LEARNING_RATE)]
    known = [key for _, _, series in groups for key, _, _ in series]
    groups = [g for g in groups if any(key in keys for key, _, _ in g[2])]
    if not groups:
        raise ValueError(f"{path}: no metric to plot; looked for {known}, found "
                         f"{sorted(keys)}.")
    text_model = any(k.endswith("/bits_per_char") for k in keys)
    timeline = _timeline(records, gap_s)
    name = os.path.basename(os.path.normpath(workdir))
    out_dir = os.path.join(workdir, PLOTS_DIR)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for stem, title, series in groups:
        ylabel = title
        if stem == "loss" and text_model:
            ylabel = "loss (nats per character)"
        fig = _curves_figure(records, timeline, series, f"{name}: {title}", ylabel,
                             bits_axis=stem == "loss" and text_model)
        written.append(_save(fig, os.path.join(out_dir, f"{stem}.png")))
    return written


def confusion_matrix(labels: Any, predictions: Any, num_classes: int) -> np.ndarray:
    """Counts of (true class, predicted class) pairs.

    Args:
      labels: integer class ids, any shape.
      predictions: integer class ids, the same shape as `labels`.
      num_classes: the number of classes; every id must lie in [0, num_classes).

    Returns:
      An int64 array [num_classes, num_classes]: row = true, column = predicted.

    Raises:
      ValueError: on mismatched shapes, non-integer ids or ids out of range.
    """
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if labels.shape != predictions.shape:
        raise ValueError(f"labels have shape {labels.shape} but predictions "
                         f"{predictions.shape}; they must match.")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}.")
    for name, ids in (("labels", labels), ("predictions", predictions)):
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{name} must be integer class ids, got {ids.dtype}.")
        if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
            bad = ids[(ids < 0) | (ids >= num_classes)].flat[0]
            raise ValueError(f"{name} hold class {bad}, outside [0, {num_classes}).")
    pairs = num_classes * labels.astype(np.int64) + predictions.astype(np.int64)
    return np.bincount(pairs.ravel(), minlength=num_classes ** 2).reshape(
        num_classes, num_classes)


def plot_confusion_matrix(matrix: Any, class_names: Sequence[str], path: str) -> str:
    """Writes a confusion matrix as a PNG: counts in the cells, shading by row.

    Each cell is shaded by its share of the true class (its row), so classes
    of different sizes compare; the counts are written in the cells (up to 25
    classes) and the title gives the total and the accuracy.

    Args:
      matrix: [num_classes, num_classes] non-negative counts, row = true class.
      class_names: one name per class.
      path: the PNG file to write; its directory is created.

    Returns:
      `path`.

    Raises:
      ValueError: `matrix` is not square and non-negative, or the names do
        not match its size.
    """
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or not matrix.size:
        raise ValueError(f"matrix must be square [classes, classes], got shape "
                         f"{matrix.shape}.")
    if (matrix < 0).any():
        raise ValueError("matrix holds negative counts.")
    n = matrix.shape[0]
    if len(class_names) != n:
        raise ValueError(f"{len(class_names)} class names for a {n} x {n} matrix.")
    totals = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    side = max(4.0, 0.45 * n + 2.5)
    fig = mpl_figure.Figure(figsize=(side + 1, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    ticks = np.arange(n)
    ax.set_xticks(ticks, labels=list(class_names), rotation=45, ha="right")
    ax.set_yticks(ticks, labels=list(class_names))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total = int(matrix.sum())
    accuracy = np.trace(matrix) / total if total else math.nan
    ax.set_title(f"{total:,} examples, accuracy {accuracy:.1%}")
    if n <= 25:
        size = 9 if n <= 12 else 6
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, f"{count:g}", ha="center", va="center", fontsize=size,
                    color="white" if shares[i, j] > 0.5 else "black")
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    return _save(fig, path)


def _read_records(path: str) -> list[Record]:
    """The JSON objects of a metrics file; unreadable lines are skipped, logged."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: is this a workdir written by research.main?")
    records, bad = [], []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                records.append(record)
            else:
                bad.append(number)
    if bad:
        # A run killed mid-write can leave a torn line; the rest is still good.
        logging.warning("%s: skipped %d unreadable line(s): %s", path, len(bad),
                        bad[:10])
    if not records:
        detail = f" ({len(bad)} unreadable line(s), first {bad[0]})" if bad else ""
        raise ValueError(f"{path} holds no metric records{detail}; the run has "
                         "not logged yet or the file is not a metrics file.")
    return records


def _number(record: Record, key: str) -> float:
    """record[key] as a float; NaN when missing or not a number."""
    value = record.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return math.nan


class _Timeline(NamedTuple):
    """Where each record goes on the wall-time axis."""
    seconds: np.ndarray   # [records] since the first record, gaps cut; NaN if untimed
    segments: np.ndarray  # [records] int, +1 after every gap: lines break there
    gaps: list[tuple[float, float, bool]]  # (seconds where cut, length, resumed)


def _timeline(records: list[Record], gap_s: float) -> _Timeline:
    """Finds resumes and silences longer than `gap_s`, and cuts them out of time.

    The trainer times each log window from just after the previous log record,
    evaluation and checkpointing included, and logs its steps per second; so a
    train record's window (steps since the previous one / steps per second)
    accounts for all time since that record but the writing, and what is left
    over is silence: a restart, or the process stalled outside the loop.
    """
    times = np.array([_number(r, "time") for r in records])
    steps = np.array([_number(r, "step") for r in records])
    seconds = np.full(len(records), math.nan)
    segments = np.zeros(len(records), dtype=int)
    gaps, segment, cut, max_step = [], 0, 0.0, -math.inf
    first = last = last_train = None  # indices of timed records
    for i, record in enumerate(records):
        resumed = bool(steps[i] < max_step)  # restarted from an earlier checkpoint
        if not math.isnan(steps[i]):
            max_step = max(max_step, steps[i])
        if math.isnan(times[i]):
            segments[i] = segment
            continue
        rate = _number(record, "perf/steps_per_sec")
        silence = 0.0 if last is None else times[i] - times[last]
        if rate > 0 and last_train is not None and not resumed:
            silence -= (steps[i] - steps[last_train]) / rate  # the logged window
        elif not resumed:
            silence = 0.0  # an evaluation, or no way to tell: never a gap
        if last is not None and (resumed or silence > gap_s):
            gaps.append((seconds[last], silence, resumed))
            segment, cut = segment + 1, cut + max(silence, 0.0)
        first = i if first is None else first
        seconds[i] = times[i] - times[first] - cut
        segments[i] = segment
        last = i
        if rate > 0:
            last_train = i
    return _Timeline(seconds, segments, gaps)


def _time_unit(span_s: float) -> tuple[str, float]:
    """A readable unit for a span of seconds: (name, seconds per unit)."""
    if span_s < 120:
        return "s", 1.0
    return ("min", 60.0) if span_s < 7200 else ("h", 3600.0)


def _curves_figure(records, timeline, series, title, ylabel, bits_axis):
    """Two panels: metric against step, and against wall time with gaps cut."""
    steps = np.array([_number(r, "step") for r in records])
    has_time = not np.isnan(timeline.seconds).all()
    unit, scale = _time_unit(np.nanmax(timeline.seconds) if has_time else 0.0)
    fig = mpl_figure.Figure(figsize=(11, 4), layout="constrained")
    fig.suptitle(title)
    by_step, by_time = fig.subplots(1, 2, sharey=True)
    for key, label, style in series:
        values = np.array([_number(r, key) for r in records])
        present = ~np.isnan(values) & ~np.isnan(steps)
        if present.any():
            # A resumed run logs some steps twice: the later record wins.
            latest = dict(zip(steps[present], values[present]))
            x = sorted(latest)
            by_step.plot(x, [latest[s] for s in x], label=label, **style)
        present = ~np.isnan(values) & ~np.isnan(timeline.seconds)
        for n, segment in enumerate(np.unique(timeline.segments[present])):
            mask = present & (timeline.segments == segment)
            by_time.plot(timeline.seconds[mask] / scale, values[mask],
                         label=label if n == 0 else None, **style)
    for at, length, resumed in timeline.gaps:
        by_time.axvline(at / scale, color="0.4", linestyle="--", linewidth=1)
        what = "resumed" if resumed else "no records"
        by_time.annotate(f"{what}: {_duration(length)} cut", xy=(at / scale, 0.98),
                         xycoords=("data", "axes fraction"), xytext=(-3, 0),
                         textcoords="offset points", ha="right", va="top",
                         fontsize=8, rotation=90, color="0.3")
    if not has_time:
        by_time.text(0.5, 0.5, "no 'time' in the records", ha="center",
                     va="center", transform=by_time.transAxes)
    by_step.set_xlabel("step")
    by_step.set_ylabel(ylabel)
    cut = ", gaps cut" if timeline.gaps else ""
    by_time.set_xlabel(f"wall time since the first record{cut} ({unit})")
    if bits_axis:
        bits = by_time.secondary_yaxis(
            "right", functions=(lambda x: x / math.log(2), lambda x: x * math.log(2)))
        bits.set_ylabel("bits per character")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    # Both panels' series (a record may lack a step or a time); none if all junk.
    legend = {}
    for ax in (by_step, by_time):
        legend.update(zip(*ax.get_legend_handles_labels()[::-1]))
    if legend:
        by_step.legend(legend.values(), legend.keys())
    return fig


def _duration(seconds: float) -> str:
    """A length of time in a readable unit, e.g. "12.5 min"."""
    unit, scale = _time_unit(seconds)
    return f"{seconds / scale:.3g} {unit}"


def _save(fig: mpl_figure.Figure, path: str) -> str:
    backend_agg.FigureCanvasAgg(fig)  # explicit: raster canvas, never a display
    fig.savefig(path, dpi=100)
    return path
