"""The streaming input path: splits larger than memory, read step by step.

A streamed split stays on disk as ArrayRecord files of ready rows
(`records.py`, written by `python -m research.convert`); every process
reads, for each step, only the rows its own devices take of the global
batch. The order is the in-memory path's (the batch of step s is examples
`order[k * B:(k + 1) * B]` of epoch `s // steps_per_epoch`'s permutation,
k = s % steps_per_epoch), so both paths feed the same rows and example
numbers (`index`: the augmentation keys) to the same step: the parameters
are bitwise equal. The reader's position is the step's, so nothing of it is
checkpointed. Per process:

    Grain MapDataset over groups of steps --(threads: read, decode)--> host
    buffer (`prefetch_steps` batches) --(filler thread: stack a chunk and
    place it over the data axis)--> device queue (`device_prefetch` chunks)
    --> the jitted chunk of `steps_per_call` steps.

Memory is bounded by those depths, never by the split (the epoch's order,
4 bytes an example, is the only per-split host state). `config.input`
picks the path per split (`choose`). Design and numbers: docs/streaming.md.
"""
import dataclasses
import functools
import os
import queue
import threading
from typing import Any, Callable, Iterator

from absl import logging
import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from research import errors
from research.core import config_lib
from research.data import input_pipeline
from research.data import tfds_reader
from research import mesh as mesh_lib
from research.data import records

_NO_STREAM = ("config.input='stream', but dataset {!r} has no streaming rows (its "
              "spec defines no stream_features); use --config.input=memory.")
Batch = dict[str, jax.Array]


def _grain():
    # Imported on use: about a second, and only streamed runs need it.
    import grain  # pylint: disable=g-import-not-at-top
    return grain


def check(config: ml_collections.ConfigDict) -> None:
    """Raises UserError for bad stream settings, or "stream" for a dataset
    that cannot stream (the input path's name is checked by the assembly)."""
    if "input" not in config:  # configs saved before streaming existed
        return
    if config.input == "stream" and not can_stream(
            input_pipeline.get_dataset(config.dataset)):
        raise errors.UserError(_NO_STREAM.format(config.dataset))
    for key in ("threads", "prefetch_steps", "device_prefetch"):
        if config.stream[key] < 1:
            raise errors.UserError(
                f"config.stream.{key} must be >= 1, got {config.stream[key]}.")
    if not config.stream.memory_limit_mb > 0:
        raise errors.UserError("config.stream.memory_limit_mb must be positive, got "
                               f"{config.stream.memory_limit_mb}.")


def stream_dir(config: ml_collections.ConfigDict) -> str:
    """config.stream.dir, else $RESEARCH_STREAM_DIR, else "" (none)."""
    return config.stream.dir or os.environ.get("RESEARCH_STREAM_DIR", "")


def can_stream(dataset: input_pipeline.DatasetSpec) -> bool:
    """Whether the spec has the optional streaming methods."""
    return hasattr(dataset, "stream_features")


def choose(config: ml_collections.ConfigDict, dataset: input_pipeline.DatasetSpec,
           split: str) -> str:
    """"memory" or "stream" for `split`, from `config.input`.

    "auto" streams a split only if it is converted and its rows would take
    more than `config.stream.memory_limit_mb` per process; a split that is
    that large but not converted is refused with the command that converts
    it (reading it into memory would fail later, or swap).

    Raises:
      UserError: "stream" for a dataset that cannot stream, or a large split
        that is not converted.
    """
    mode = config.input if "input" in config else "memory"
    if mode == "memory":
        return "memory"
    if not can_stream(dataset):
        if mode == "stream":
            raise errors.UserError(_NO_STREAM.format(config.dataset))
        return "memory"
    if mode == "stream":
        return "stream"
    features = dataset.stream_features(config)
    limit = config.stream.memory_limit_mb * 2 ** 20
    examples = _converted_examples(config, dataset, split)
    converted = examples is not None
    if not converted:
        examples = tfds_reader.prepared_examples(dataset, config, split)
    if examples is None:
        return "memory"
    size = examples * records.row_bytes(features) / jax.process_count()
    if size <= limit:
        return "memory"
    if not converted:
        raise errors.UserError(
            f"Split {split!r} of {config.dataset} takes {size / 2 ** 20:,.1f} MB per "
            f"process, over config.stream.memory_limit_mb="
            f"{config.stream.memory_limit_mb}: stream it. Convert it once with `"
            + records.CONVERT_HINT.format(name=dataset.tfds_name,
                                          split=",".join(
                                              tfds_reader.base_splits(split)),
                                          out=stream_dir(config) or "DIR")
            + "` and set --config.stream.dir (or raise the limit).")
    logging.info("Streaming %s[%s]: %.0f MB per process, over the %g MB limit.",
                 config.dataset, split, size / 2 ** 20, config.stream.memory_limit_mb)
    return "stream"


def _converted_examples(config, dataset, split) -> int | None:
    """The converted split's example count, or None if any part is missing."""
    folder = stream_dir(config)
    names = tfds_reader.base_splits(split)
    if not folder or len(names) != 1:
        return None
    version = tfds_reader.dataset_version(dataset)
    if names[0] not in records.converted_splits(folder, dataset.tfds_name, version):
        return None
    return open_source(config, dataset, split).num_examples


def open_source(config: ml_collections.ConfigDict,
                dataset: input_pipeline.DatasetSpec, split: str) -> records.Source:
    """The converted rows of `split`: a named split, whole or sliced, checked.

    Example i is the in-memory path's example i: a whole split was converted
    in `tfds.load`'s order, and a slice (`train[:10%]`) of a split that TFDS
    stored in one file is a contiguous range of it. TFDS reads several files
    interleaved, so a slice of a split of several files, or a sum of splits
    (`train+test`), would hold other examples than in memory: those are
    refused rather than silently trained on different batches.

    Raises:
      UserError: no converted data, another version, a split not converted,
        other features or missing files (each with the command that fixes
        it), or a split string that cannot stream exactly.
    """
    names = tfds_reader.base_splits(split)
    if len(names) != 1 or "+" in split:
        raise errors.UserError(
            f"Split {split!r} adds splits, which TFDS reads interleaved; streaming "
            "reads one named split, whole or sliced. Use --config.input=memory.")
    reader = records.open_split(stream_dir(config), dataset.tfds_name,
                                tfds_reader.dataset_version(dataset), names[0],
                                dataset.stream_features(config))
    (_, start, stop), = tfds_reader.split_ranges(
        split, {names[0]: reader.num_records})
    sliced = (start, stop) != (0, reader.num_records)
    if sliced and reader.meta["source"].get("tfds_files", 1) > 1:
        raise errors.UserError(
            f"Split {split!r} slices {names[0]}, which TFDS stored in "
            f"{reader.meta['source']['tfds_files']} files and reads interleaved: "
            "the slice in memory holds other examples than a streamed one. Stream "
            f"the whole {names[0]!r}, or use --config.input=memory.")
    if stop <= start:
        raise errors.UserError(f"Split {split!r} of {dataset.tfds_name} is empty.")
    return records.Source(reader, start, stop, f"{dataset.tfds_name}[{split}]")


def process_rows(mesh: jax.sharding.Mesh, batch_size: int) -> tuple[int, int]:
    """The rows [lo, hi) of every global batch that this process's devices
    hold when a batch is split over the mesh's data axis."""
    sharding = NamedSharding(mesh, P(mesh_lib.batch_axes(mesh)))
    spans = sorted({(s[0].start or 0, batch_size if s[0].stop is None else s[0].stop)
                    for s in sharding.addressable_devices_indices_map(
                        (batch_size,)).values()})
    for (_, stop), (start, _) in zip(spans, spans[1:]):
        if stop != start:  # make_array_from_process_local_data needs one block
            raise errors.UserError(
                f"This process's devices hold rows {spans} of a batch, not one "
                "contiguous block; streaming needs a mesh whose data axis keeps "
                "each process's devices together.")
    return spans[0][0], spans[-1][1]


def host_order_fn(data_key: jax.Array, num_examples: int, mesh: jax.sharding.Mesh
                  ) -> Callable[[int], np.ndarray]:
    """epoch -> the epoch's order of example numbers, as a host array.

    The same permutation the in-memory trainer draws (`Trainer.order_fn`):
    `permutation(fold_in(data_key, epoch), n)`, run on one of this process's
    own mesh devices (the same backend, so the same bits), with no
    cross-process collective, so any process and any thread may call it.
    """
    device = mesh.local_devices[0]
    key = jax.device_put(data_key.addressable_data(0), device)
    fn = jax.jit(lambda key, epoch: jax.random.permutation(
        jax.random.fold_in(key, epoch), num_examples))
    return lambda epoch: np.asarray(fn(key, epoch))


def batch_spec(features: records.Features, batch_size: int, mesh: jax.sharding.Mesh,
               num_steps: int | None = None, extra: dict[str, Any] | None = None
               ) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and shardings of streamed batches, to compile ahead of time:
    [num_steps, batch, ...] (or [batch, ...] without num_steps)."""
    lead = (batch_size,) if num_steps is None else (num_steps, batch_size)
    axes = mesh_lib.batch_axes(mesh)
    spec = P(axes) if num_steps is None else P(None, axes)
    sharding = NamedSharding(mesh, spec)
    fields = {k: (tuple(s), np.dtype(d)) for k, (s, d) in features.items()}
    fields.update(extra or {})
    return {k: jax.ShapeDtypeStruct(lead + s, d, sharding=sharding)
            for k, (s, d) in fields.items()}


# Rows read per call at least: a read call costs ~150 us besides its rows
# (measured), which at batch 4 would double the step time; small batches are
# read several steps at a time.
ROWS_PER_READ = 256


def _read_steps(source: records.Source, order: np.ndarray, batch_size: int, lo: int,
                hi: int, stop: int, group: int, first: int
                ) -> dict[str, np.ndarray]:
    """This process's rows of the epoch's batches k = first .. first + group
    - 1 (up to `stop`), [steps, hi - lo, ...], with their numbers."""
    ks = np.arange(first, min(first + group, stop))
    examples = order[(ks[:, None] * batch_size + np.arange(lo, hi)[None, :])]
    rows = source.read(examples.ravel())
    return {**{k: v.reshape(examples.shape + v.shape[1:]) for k, v in rows.items()},
            "index": examples.astype(np.int32)}


@dataclasses.dataclass
class EpochCount:
    """Records one process read for one epoch (complete once it ended)."""
    reads: int = 0
    index_sum: int = 0


class TrainStream:
    """This process's share of the training batches of steps [start, stop),
    read ahead in threads and placed on the devices in chunks.

    `chunk_size(step)` says how many steps the trainer runs in the call that
    starts at `step` (its boundaries are deterministic), so whole chunks can
    be assembled and placed ahead; `next(step, n)` must then be asked for
    exactly those chunks, in order.
    """

    def __init__(self, source: records.Source, order_fn: Callable[[int], np.ndarray],
                 *, batch_size: int, steps_per_epoch: int, mesh: jax.sharding.Mesh,
                 start: int, stop: int, chunk_size: Callable[[int], int],
                 options: ml_collections.ConfigDict):
        self.source, self.order_fn = source, order_fn
        self.batch_size, self.steps_per_epoch = batch_size, steps_per_epoch
        self.start, self.stop, self.chunk_size = start, stop, chunk_size
        self.options = options
        self.lo, self.hi = process_rows(mesh, batch_size)
        self.sharding = NamedSharding(mesh, P(None, mesh_lib.batch_axes(mesh)))
        self.counts: dict[int, EpochCount] = {}
        self._lock = threading.Lock()
        self._queue = queue.Queue(maxsize=options.device_prefetch)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="TrainStream",
                                        daemon=True)
        self._thread.start()

    def _epoch_rows(self, epoch: int, first: int) -> Iterator[dict[str, np.ndarray]]:
        """Batches k = first.. of `epoch`, read by Grain's threads in order,
        `group` steps a read."""
        grain = _grain()
        group = max(1, ROWS_PER_READ // max(1, self.hi - self.lo))
        read = functools.partial(_read_steps, self.source, self.order_fn(epoch),
                                 self.batch_size, self.lo, self.hi,
                                 self.steps_per_epoch, group)
        dataset = grain.MapDataset.range(first, self.steps_per_epoch, group).map(read)
        iterator = iter(dataset.to_iter_dataset(grain.ReadOptions(
            num_threads=self.options.threads,
            prefetch_buffer_size=max(2, -(-self.options.prefetch_steps // group)))))
        try:
            for rows in iterator:
                for i in range(len(rows["index"])):
                    yield {k: v[i] for k, v in rows.items()}
        finally:
            iterator.close()

    def _host_steps(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        step = self.start
        while step < self.stop:
            epoch, first = divmod(step, self.steps_per_epoch)
            for rows in self._epoch_rows(epoch, first):
                with self._lock:
                    count = self.counts.setdefault(epoch + 1, EpochCount())
                    count.reads += len(rows["index"])
                    count.index_sum += int(rows["index"].sum(dtype=np.int64))
                yield step, rows
                step += 1
                if step >= self.stop or self._closed.is_set():
                    return

    def _fill(self) -> None:
        """The filler thread: chunks of host batches, placed on the devices."""
        try:
            steps = self._host_steps()
            step = self.start
            while step < self.stop and not self._closed.is_set():
                n = self.chunk_size(step)
                rows = [next(steps)[1] for _ in range(n)]
                local = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
                chunk = place(local, self.sharding, 1, self.batch_size)
                self._put((step, n, chunk))
                step += n
            steps.close()
        except BaseException as e:  # pylint: disable=broad-except
            self._put(e)  # re-raised in the training thread

    def _put(self, item: Any) -> None:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self, step: int, n: int) -> Batch:
        """The placed batches of steps [step, step + n): arrays [n, batch, ...]
        split over the data axis, with the examples' numbers in `index`."""
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        got_step, got_n, chunk = item
        if (got_step, got_n) != (step, n):  # a bug, not a user error
            raise RuntimeError(f"stream out of step: asked for {n} steps at {step}, "
                               f"read {got_n} at {got_step}")
        return chunk

    def epoch_count(self, epoch: int) -> EpochCount:
        """What this process read for `epoch` (1-based), so far."""
        with self._lock:
            return dataclasses.replace(self.counts.get(epoch, EpochCount()))

    def close(self) -> None:
        """Stops reading ahead; drops what was read but not used."""
        self._closed.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)


def place(local: dict[str, np.ndarray], sharding: NamedSharding, axis: int,
          batch_size: int) -> Batch:
    """This process's rows of batches (its block of axis `axis`) as global
    arrays of `batch_size` rows there, split over the mesh. One process: one
    batched `device_put` (1.8x faster here than an array at a time, which
    matters at batch 4); several: `jax.make_array_from_process_local_data`."""
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return {k: jax.make_array_from_process_local_data(
        sharding, v, v.shape[:axis] + (batch_size,) + v.shape[axis + 1:])
        for k, v in local.items()}


def _read_eval(source: records.Source, batch_size: int, lo: int, hi: int, b: int
               ) -> dict[str, np.ndarray]:
    """This process's rows of evaluation batch b, zero-padded past the end,
    with `mask` False on the padding."""
    positions = b * batch_size + np.arange(lo, hi)
    valid = positions < source.num_examples
    rows = source.read(positions[valid])
    out = {k: np.zeros((hi - lo,) + v.shape[1:], v.dtype) for k, v in rows.items()}
    for k, v in rows.items():
        out[k][:len(v)] = v  # valid positions come first: they ascend
    return {"mask": valid, **out}


def eval_batches(source: records.Source, batch_size: int, mesh: jax.sharding.Mesh,
                 options: ml_collections.ConfigDict) -> Iterator[Batch]:
    """The split in order, `batch_size` examples a batch (the last padded and
    masked), split over the data axis; each process reads only its rows."""
    grain = _grain()
    lo, hi = process_rows(mesh, batch_size)
    num_batches = -(-source.num_examples // batch_size)
    dataset = grain.MapDataset.range(num_batches).map(
        functools.partial(_read_eval, source, batch_size, lo, hi))
    sharding = NamedSharding(mesh, P(mesh_lib.batch_axes(mesh)))
    iterator = iter(dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=options.threads, prefetch_buffer_size=options.prefetch_steps)))
    try:
        for local in iterator:
            yield place(local, sharding, 0, batch_size)
    finally:
        iterator.close()


# Input path: "memory" reads a split whole onto the devices; "stream" reads
# each step's rows from ArrayRecord files (python -m research.convert); "auto"
# streams a converted split larger than stream.memory_limit_mb per process.
# Both give the same batches, so the section may change on resume.
SECTION = config_lib.Section("input", {
    "input": "auto",
    "stream": {
        "dir": "",                # converted data; "": $RESEARCH_STREAM_DIR
        "memory_limit_mb": 4096.0,  # "auto": larger splits stream
        "threads": 2,             # reader threads per process (Grain)
        "prefetch_steps": 16,     # batches read ahead on the host
        "device_prefetch": 2,     # chunks of steps placed on the devices ahead
    }}, check=check, free=("input", "stream", "stream."))
