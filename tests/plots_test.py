"""plots: curves from synthetic metrics.jsonl files, confusion matrices, bad input."""
import json
import math
import os

import numpy as np
import pytest
from matplotlib import image as mpl_image

from research import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
T0 = 1_700_000_000.0  # records carry time.time()
# The gap finding is private to plots but the part worth testing exactly.
timeline_of = plots._timeline  # pylint: disable=protected-access


def run_records(epochs=3, steps_per_epoch=50, log_every=10, text=False,
                learning_rate=True, resume_at=None, downtime_s=600.0):
    """Records timed as train.py writes them: log points, then one per epoch.

    20 steps/s and 2 s per evaluation. A log window runs from the previous log
    record, so the one after an evaluation includes it in its steps/s. With
    `resume_at=(killed, restored)` the run logs up to step `killed`, stops,
    and `downtime_s` later restarts from the checkpoint at `restored`, logging
    the steps in between again.
    """
    records, now, step, window_start = [], T0, 0, T0
    end = epochs * steps_per_epoch
    while step < end:
        step += log_every
        now += log_every / 20.0
        rate = log_every / (now - window_start)
        window_start = now
        loss = 2.3 * math.exp(-step / 60) + 0.4
        record = {"step": step, "time": now, "train/loss": loss,
                  "perf/steps_per_sec": rate}
        if text:
            record.update({"train/bits_per_char": loss / math.log(2),
                           "train/perplexity": math.exp(loss),
                           "perf/chars_per_sec": rate * 64 * 128})
        else:
            record.update({"train/accuracy": 1 - loss / 3,
                           "perf/images_per_sec": rate * 128})
        if learning_rate:
            record["train/learning_rate"] = 0.1 * (1 - step / (end + 1))
        records.append(record)
        if step % steps_per_epoch == 0:
            now += 2.0
            epoch = {"step": step, "time": now, "epoch": step // steps_per_epoch,
                     "epoch/train_loss": loss + 0.05, "eval/loss": loss + 0.1}
            if text:
                epoch["eval/bits_per_char"] = (loss + 0.1) / math.log(2)
            else:
                epoch["eval/accuracy"] = 1 - (loss + 0.1) / 3
            records.append(epoch)
        if resume_at and step == resume_at[0]:
            step, resume_at = resume_at[1], None
            now += downtime_s
            window_start = now  # the new process times from its loop's start
    return records


def write_metrics(workdir, records, lines=()):
    """metrics.jsonl with `records`, then any raw `lines`."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, plots.METRICS_JSONL), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.writelines(lines)
    return str(workdir)


def assert_readable_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE, path
    pixels = mpl_image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.var() > 0, f"{path} is blank"
    colours = np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
    assert len(colours) > 1, f"{path} has one colour"


def names(paths):
    return [os.path.basename(p) for p in paths]


def test_classification_run_gives_loss_accuracy_and_learning_rate(tmp_path):
    workdir = write_metrics(tmp_path / "run", run_records())
    paths = plots.plot_run(workdir)
    assert names(paths) == ["loss.png", "accuracy.png", "learning_rate.png"]
    for path in paths:
        assert os.path.dirname(path) == os.path.join(workdir, plots.PLOTS_DIR)
        assert_readable_png(path)


def test_text_run_plots_loss_alone_without_learning_rate(tmp_path):
    records = run_records(text=True, learning_rate=False)
    paths = plots.plot_run(write_metrics(tmp_path, records))
    assert names(paths) == ["loss.png"]  # bits per char is its right-hand axis
    assert_readable_png(paths[0])


def test_single_record_and_missing_keys(tmp_path):
    one = [{"step": 4, "time": T0, "train/loss": 2.3}]
    assert names(plots.plot_run(write_metrics(tmp_path / "one", one))) == ["loss.png"]
    sparse = [{"step": 4, "time": T0, "train/loss": 2.3},
              {"step": 8, "train/loss": 2.1},  # no time: only on the step panel
              {"step": 8, "time": T0 + 9, "eval/accuracy": 0.3},
              {"time": T0 + 10, "eval/loss": "n/a"}]  # no step, junk value
    paths = plots.plot_run(write_metrics(tmp_path / "sparse", sparse))
    assert names(paths) == ["loss.png", "accuracy.png"]
    for path in paths:
        assert_readable_png(path)


def test_resumed_run_cuts_the_downtime_and_breaks_lines(tmp_path):
    records = run_records(resume_at=(120, 100), downtime_s=600.0)
    timeline = timeline_of(records, plots.GAP_S)
    assert sorted(set(timeline.segments)) == [0, 1]
    [(at, length, resumed)] = timeline.gaps
    killed = records.index(next(r for r in records if r["step"] == 120))
    assert resumed and at == timeline.seconds[killed]
    # The silence: the downtime plus the first re-run window (0.5 s), which a
    # resume cannot tell apart from it. Everything else stays on the axis.
    assert length == pytest.approx(600.5)
    elapsed = records[-1]["time"] - records[0]["time"]
    assert timeline.seconds[-1] == pytest.approx(elapsed - 600.5)
    for path in plots.plot_run(write_metrics(tmp_path, records)):
        assert_readable_png(path)


def test_silence_is_a_gap_but_evaluations_and_slow_windows_are_not():
    records = run_records()
    timeline = timeline_of(records, plots.GAP_S)
    assert timeline.gaps == [] and set(timeline.segments) == {0}
    elapsed = [r["time"] - records[0]["time"] for r in records]
    np.testing.assert_allclose(timeline.seconds, elapsed)
    # Restarted without losing steps (the checkpoint was at the last log).
    later = [dict(r, time=r["time"] + 30) for r in records[8:]]
    later[0]["perf/steps_per_sec"] = 20.0  # timed from the new loop's start
    timeline = timeline_of(records[:8] + later, plots.GAP_S)
    [(at, length, resumed)] = timeline.gaps
    assert not resumed and at == elapsed[7] and length == pytest.approx(30)
    np.testing.assert_allclose(timeline.seconds, elapsed)  # as if never stopped
    slow = [{"step": 10, "time": T0, "train/loss": 1.0, "perf/steps_per_sec": 20.0},
            {"step": 2010, "time": T0 + 1000, "train/loss": 0.9,
             "perf/steps_per_sec": 2.0}]  # 1000 s of logged training
    timeline = timeline_of(slow, plots.GAP_S)
    assert timeline.gaps == [] and list(timeline.seconds) == [0, 1000]


def test_torn_line_is_skipped(tmp_path):
    records = run_records(epochs=1)
    workdir = write_metrics(tmp_path, records[:3], ['{"step": 40, "ti'] +
                            [json.dumps(r) + "\n" for r in records[3:]])
    assert len(plots.plot_run(workdir)) == 3


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl not found"):
        plots.plot_run(str(tmp_path))


@pytest.mark.parametrize("lines", [[], ["\n", "  \n"], ["not json\n", "[1, 2]\n"]])
def test_file_without_records_is_a_value_error_naming_it(tmp_path, lines):
    workdir = write_metrics(tmp_path, [], lines)
    path = os.path.join(workdir, plots.METRICS_JSONL)
    with pytest.raises(ValueError, match=f"{path} holds no metric records"):
        plots.plot_run(workdir)
    assert not os.path.exists(os.path.join(workdir, plots.PLOTS_DIR))


def test_records_without_known_metrics_are_a_value_error(tmp_path):
    workdir = write_metrics(tmp_path, [{"step": 1, "time": T0, "perf/x": 1.0}])
    with pytest.raises(ValueError, match=r"no metric to plot.*found \['perf/x'"):
        plots.plot_run(workdir)


def test_confusion_matrix_by_hand():
    labels = [0, 0, 1, 1, 2, 2, 2]
    predictions = [0, 1, 1, 1, 2, 0, 2]
    expected = [[1, 1, 0],
                [0, 2, 0],
                [1, 0, 2]]
    matrix = plots.confusion_matrix(np.array(labels, np.int32), predictions, 3)
    np.testing.assert_array_equal(matrix, expected)
    assert matrix.dtype == np.int64
    np.testing.assert_array_equal(plots.confusion_matrix([], [], 2), np.zeros((2, 2)))


@pytest.mark.parametrize("labels, predictions, num_classes, message", [
    ([0, 1], [0], 2, "shape"),
    ([0, 2], [0, 1], 2, "labels hold class 2"),
    ([0, 1], [-1, 1], 2, r"predictions hold class -1, outside \[0, 2\)"),
    ([0.0, 1.0], [0, 1], 2, "integer class ids"),
    ([0], [0], 0, "positive"),
])
def test_confusion_matrix_rejects(labels, predictions, num_classes, message):
    with pytest.raises(ValueError, match=message):
        plots.confusion_matrix(labels, predictions, num_classes)


def test_plot_confusion_matrix(tmp_path):
    matrix = plots.confusion_matrix([0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 2, 0, 2], 3)
    path = str(tmp_path / "sub" / "confusion.png")
    assert plots.plot_confusion_matrix(matrix, ["cat", "dog", "ship"], path) == path
    assert_readable_png(path)


@pytest.mark.parametrize("matrix, class_names, message", [
    (np.ones((2, 3)), ["a", "b"], "square"),
    (np.ones(4), ["a"], "square"),
    (np.ones((2, 2)), ["a"], "1 class names for a 2 x 2"),
    (-np.ones((2, 2)), ["a", "b"], "negative"),
])
def test_plot_confusion_matrix_rejects(tmp_path, matrix, class_names, message):
    with pytest.raises(ValueError, match=message):
        plots.plot_confusion_matrix(matrix, class_names, str(tmp_path / "c.png"))


def test_training_and_plot_mode_write_plots_of_a_real_run(tmp_path):
    """A smoke run (mocked CIFAR-10) leaves its plots, confusion matrix
    included; `--mode=plot` redraws them for the workdir."""
    from research import evaluate, train  # pylint: disable=g-import-not-at-top
    from tests import helpers  # pylint: disable=g-import-not-at-top
    workdir = str(tmp_path / "run")
    config = helpers.tiny_config()
    helpers.mocked(train.train_and_evaluate, config, workdir)
    expected = {"loss.png", "accuracy.png", "learning_rate.png",
                "confusion_matrix.png"}
    plot_dir = os.path.join(workdir, "plots")
    assert set(os.listdir(plot_dir)) == expected
    for name in expected:
        os.remove(os.path.join(plot_dir, name))
    paths = helpers.mocked(evaluate.plot, config, workdir)
    assert set(names(paths)) == expected
    for path in paths:
        assert_readable_png(path)


def test_summary_matches_hand_counts_for_lenet():
    """62,006 parameters and 651,720 multiply-adds (1,303,440 FLOPs) forward
    per image, by layer as counted by hand."""
    from research import summary  # pylint: disable=g-import-not-at-top
    from tests import helpers  # pylint: disable=g-import-not-at-top
    config = helpers.tiny_config()
    result = helpers.mocked(summary.summarize, config, timed_steps=1)
    assert result["params"] == 62_006
    assert result["macs_per_example"] == 651_720
    assert result["macs_by_layer"] == {
        "Conv_0": 28 * 28 * 6 * 5 * 5 * 3, "Conv_1": 10 * 10 * 16 * 5 * 5 * 6,
        "Dense_0": 400 * 120, "Dense_1": 120 * 84, "Dense_2": 84 * 10}
    assert result["param_bytes"] == 4 * 62_006
    assert result["step_s"] > 0 and result["steps_per_epoch"] == 6
    text = summary.describe(result)
    assert "651,720 multiply-adds = 1,303,440 FLOPs" in text


def test_summary_counts_the_lstm_time_loop():
    """XLA counts a loop's body once; the count multiplies it by the length:
    per window, T (x_t W_x + h W_hh) per layer, the head, the token table."""
    from research.core import config_lib  # pylint: disable=g-import-not-at-top
    from research import costs, assembly  # pylint: disable=g-import-not-at-top
    from tests import helpers  # pylint: disable=g-import-not-at-top
    config = config_lib.load_config(f"{helpers.CONFIGS}/shakespeare_rnn.py")
    macs = costs.forward_macs(assembly.build(config, info={}))
    t, h, e, v = 128, 512, 64, 65
    assert macs == {"CharRNN/input_0": v * e * 4 * h, "CharRNN/cell_0": t * h * 4 * h,
                    "CharRNN/input_1": t * h * 4 * h, "CharRNN/cell_1": t * h * 4 * h,
                    "CharRNN/head": t * h * v}
