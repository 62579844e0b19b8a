"""Metric writers: TensorBoard, the log, and `<workdir>/metrics.jsonl`."""
import json
import os
import time
from typing import Any, Mapping

import jax
from clu import metric_writers

METRICS_JSONL = "metrics.jsonl"


class JsonlWriter(metric_writers.MetricWriter):
    """Appends one JSON object per `write_scalars` call: {"step", "time", ...},
    flushed at once, so a crash loses no record written before it.

    A run resumed at step s first drops the records after s (they belong to
    steps it will take again), so each step appears once, in order.
    """

    def __init__(self, path: str, resume_step: int = 0):
        _drop_records_after(path, resume_step)
        self._file = open(path, "a")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        record = {"step": int(step), "time": time.time()}
        record.update({k: float(v) for k, v in scalars.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def write_hparams(self, hparams: Mapping[str, Any]):
        pass  # config.json holds them

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def flush(self):
        self._file.flush()

    def close(self):
        self._file.close()


def _drop_records_after(path: str, step: int) -> None:
    """Rewrites `path` (atomically) without the records after `step`."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if _step_of(line) <= step]
    if len(kept) == len(lines):
        return
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # a line cut short by a crash
        return float("inf")


def create_writer(workdir: str, resume_step: int = 0) -> metric_writers.MetricWriter:
    """TensorBoard + log + JSON lines on process 0; the log alone elsewhere.

    `resume_step`: the step the run continues from; later records of an
    earlier attempt are dropped from `metrics.jsonl`.
    """
    if jax.process_index() > 0:
        return metric_writers.create_default_writer(workdir, just_logging=True)
    return metric_writers.MultiWriter([
        metric_writers.create_default_writer(workdir, asynchronous=False),
        JsonlWriter(os.path.join(workdir, METRICS_JSONL), resume_step),
    ])


def read_metrics(workdir: str) -> list[dict[str, float]]:
    """The records of `metrics.jsonl`, in order (for tests and notebooks)."""
    with open(os.path.join(workdir, METRICS_JSONL)) as f:
        return [json.loads(line) for line in f if line.strip()]
