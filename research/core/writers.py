"""Metric writers: TensorBoard, the log, `<workdir>/metrics.jsonl`, and the
one-line reports a run prints on stdout.

TensorBoard events are written with tensorboard's own event-file writer, not
through TensorFlow (importing TensorFlow costs seconds of start-up, and a
cached run never needs it).
"""
import json
import os
import socket
import time
from typing import Any, Mapping

from absl import logging
import jax
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.summary.writer import record_writer

METRICS_JSONL = "metrics.jsonl"


def report(line: str) -> None:
    """A result line for the user: stdout (process 0) and the log."""
    logging.info("%s", line)
    if jax.process_index() == 0:
        print(line, flush=True)


def describe(eval_metrics: Mapping[str, float], split: str = "test") -> str:
    """'test loss 1.2345, test accuracy 0.5678' for reports and the log."""
    return ", ".join(f"{split} {k.split('/')[-1]} {v:.4f}"
                     for k, v in eval_metrics.items())


class JsonlWriter:
    """Appends one JSON object per `write_scalars` call: {"step", "time", ...},
    flushed at once, so a crash loses no record written before it.

    A run resumed at step s first drops the records after s (they belong to
    steps it will take again), so each step appears once, in order.
    """

    def __init__(self, path: str, resume_step: int = 0):
        _drop_records_after(path, resume_step)
        self._file = open(path, "a")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        record = {"step": int(step), "time": time.time()}
        record.update({k: float(v) for k, v in scalars.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        del hparams  # config.json holds them

    def close(self) -> None:
        self._file.close()


class TensorBoardWriter:
    """Scalars and hparams as a TensorBoard event file in the workdir, each
    record flushed as it is written. (tensorboard's EventFileWriter would
    import TensorFlow for its file I/O: seconds of start-up.)"""

    def __init__(self, workdir: str):
        name = (f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}."
                f"{os.getpid()}.0")
        self._records = record_writer.RecordWriter(
            open(os.path.join(workdir, name), "wb"))
        self._write(event_pb2.Event(wall_time=time.time(),
                                    file_version="brain.Event:2"))

    def _write(self, event: event_pb2.Event) -> None:
        self._records.write(event.SerializeToString())
        self._records.flush()

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        summary = summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=k, simple_value=float(v))
            for k, v in scalars.items()])
        self._write(event_pb2.Event(wall_time=time.time(), step=int(step),
                                    summary=summary))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self._write(event_pb2.Event(
            wall_time=time.time(), summary=hparams_summary.hparams_pb(dict(hparams))))

    def close(self) -> None:
        self._records.close()


class Writers:
    """Writes every record to each writer, and the scalars to the log."""

    def __init__(self, writers: list[Any]):
        self._writers = writers

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        logging.info("[%d] %s", step, ", ".join(f"{k}={float(v):.6g}"
                                                for k, v in scalars.items()))
        for writer in self._writers:
            writer.write_scalars(step, scalars)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        for writer in self._writers:
            writer.write_hparams(hparams)

    def close(self) -> None:
        for writer in self._writers:
            writer.close()


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


def create_writer(workdir: str, resume_step: int = 0) -> Writers:
    """TensorBoard + log + JSON lines on process 0; the log alone elsewhere.

    `resume_step`: the step the run continues from; later records of an
    earlier attempt are dropped from `metrics.jsonl`.
    """
    if jax.process_index() > 0:
        return Writers([])
    if resume_step == 0:
        _set_aside_earlier_metrics(workdir)
    return Writers([TensorBoardWriter(workdir),
                    JsonlWriter(os.path.join(workdir, METRICS_JSONL), resume_step)])


def _set_aside_earlier_metrics(workdir: str) -> None:
    """A run starting from step 0 in a workdir with metrics of an earlier
    start (one that died before its first checkpoint, or whose checkpoints
    and config.json were deleted): those go to `earlier/<time>/`, so that
    TensorBoard does not overlay two runs and nothing is lost."""
    names = [n for n in os.listdir(workdir)
             if n == METRICS_JSONL or n.startswith("events.out.tfevents.")]
    if not names:
        return
    target = os.path.join(workdir, "earlier", time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(target, exist_ok=True)
    for name in names:
        os.replace(os.path.join(workdir, name), os.path.join(target, name))
    logging.warning("Starting from step 0: moved the metrics of an earlier start "
                    "(%s) to %s.", ", ".join(sorted(names)), target)


def read_metrics(workdir: str) -> list[dict[str, float]]:
    """The records of `metrics.jsonl`, in order (for tests and notebooks)."""
    with open(os.path.join(workdir, METRICS_JSONL)) as f:
        return [json.loads(line) for line in f if line.strip()]
