"""Metric writers: TensorBoard, the log, and `<workdir>/metrics.jsonl`."""
import json
import os
import time
from typing import Any, Mapping

import jax
from clu import metric_writers

METRICS_JSONL = "metrics.jsonl"


class JsonlWriter(metric_writers.MetricWriter):
    """Appends one JSON object per `write_scalars` call: {"step", "time", ...}."""

    def __init__(self, path: str):
        self._file = open(path, "a")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        record = {"step": int(step), "time": time.time()}
        record.update({k: float(v) for k, v in scalars.items()})
        self._file.write(json.dumps(record) + "\n")

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


def create_writer(workdir: str) -> metric_writers.MetricWriter:
    """TensorBoard + log + JSON lines on process 0; the log alone elsewhere."""
    if jax.process_index() > 0:
        return metric_writers.create_default_writer(workdir, just_logging=True)
    return metric_writers.MultiWriter([
        metric_writers.create_default_writer(workdir, asynchronous=False),
        JsonlWriter(os.path.join(workdir, METRICS_JSONL)),
    ])


def read_metrics(workdir: str) -> list[dict[str, float]]:
    """The records of `metrics.jsonl`, in order (for tests and notebooks)."""
    with open(os.path.join(workdir, METRICS_JSONL)) as f:
        return [json.loads(line) for line in f if line.strip()]
