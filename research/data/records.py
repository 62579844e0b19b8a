"""Splits stored as ArrayRecord files of ready rows, read by example number.

The streaming input path (`streaming.py`) reads rows at random positions from
files that `python -m research.convert` writes once from a prepared TFDS
dataset. A record holds one example's row exactly as the in-memory path puts
it on the device (e.g. `image` uint8 [32, 32, 3] and `label` int32): the raw
bytes of each feature in the metadata's order, C order, little-endian. Images
are decoded once, at conversion, so reading a batch is a random read per
row and one `np.frombuffer`: ~10 us a row here, against ~190 us to parse and
decode TFDS's own serialized examples with `tfds.data_source`.

Layout (a TFDS-like data_dir):

    <stream_dir>/<tfds_name>/<version>/<split>.array_record-00000-of-00002
    <stream_dir>/<tfds_name>/<version>/<split>.json

The JSON metadata is written last, so a split without it was not (completely)
converted. Example i of a split is record i, counted across its shards in
order: the same numbering as the in-memory path (`tfds.load` without
shuffling), so both paths agree on what example i is.
"""
import dataclasses
import json
import os
import threading
from typing import Any, Iterable

import numpy as np

from research import errors

FORMAT = "research-rows"
FORMAT_VERSION = 1
Split = dict[str, np.ndarray]
# feature name -> (shape of one example's value, dtype)
Features = dict[str, tuple[tuple[int, ...], np.dtype]]
CONVERT_HINT = ("python -m research.convert --dataset={name} --splits={split} "
                "--out_dir={out}")


def _array_record():
    # Imported on use: only streaming and conversion need the C++ module.
    # pylint: disable-next=g-import-not-at-top
    from array_record.python import array_record_module
    return array_record_module


def _feature_json(features: Features) -> dict[str, Any]:
    return {k: {"shape": list(shape), "dtype": np.dtype(dtype).name}
            for k, (shape, dtype) in features.items()}


def _record_size(features: Features) -> int:
    return sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
               for shape, dtype in features.values())


def row_bytes(features: Features) -> int:
    """Bytes of one example's row (what the in-memory path keeps per example)."""
    return _record_size(features)


def split_dir(stream_dir: str, name: str, version: str) -> str:
    return os.path.join(stream_dir, name, version)


def _shard_name(split: str, index: int, count: int) -> str:
    return f"{split}.array_record-{index:05d}-of-{count:05d}"


class SplitWriter:
    """Writes one split's rows into ArrayRecord shards, then its metadata.

    Use as a context manager; `write` takes batches of rows. Shards hold
    `records_per_shard` records each (the last one fewer). The metadata is
    written on a clean exit only, so an interrupted conversion leaves a split
    that readers refuse as not converted.
    """

    def __init__(self, stream_dir: str, name: str, version: str, split: str,
                 features: Features, num_records: int, records_per_shard: int,
                 source: dict[str, Any] | None = None):
        self.folder = split_dir(stream_dir, name, version)
        self.name, self.version, self.split = name, version, split
        self.features = {k: (tuple(s), np.dtype(d)) for k, (s, d) in features.items()}
        self.num_records, self.source = num_records, source or {}
        self.per_shard = max(1, records_per_shard)
        self.num_shards = max(1, -(-num_records // self.per_shard))
        self.shards: list[dict[str, Any]] = []
        self.written = 0
        self._writer = None

    def __enter__(self) -> "SplitWriter":
        os.makedirs(self.folder, exist_ok=True)
        meta = os.path.join(self.folder, f"{self.split}.json")
        if os.path.exists(meta):  # the old files are about to be overwritten
            os.remove(meta)
        return self

    def _open_next(self) -> None:
        name = _shard_name(self.split, len(self.shards), self.num_shards)
        # group_size:1: every record is its own chunk, so a random read
        # decompresses nothing else; rows of pixels barely compress anyway.
        self._writer = _array_record().ArrayRecordWriter(
            os.path.join(self.folder, name), "group_size:1,uncompressed")
        self.shards.append({"file": name, "num_records": 0})

    def write(self, rows: Split) -> None:
        """Appends a batch of rows (every feature with a leading example axis)."""
        arrays = []
        for key, (shape, dtype) in self.features.items():
            value = np.asarray(rows[key])
            if value.shape[1:] != shape:
                raise ValueError(f"feature {key!r} has shape {value.shape[1:]}, "
                                 f"expected {shape}")
            arrays.append(np.ascontiguousarray(value.astype(dtype.newbyteorder("<"))))
        n = len(arrays[0])
        flat = np.concatenate([a.reshape(n, -1).view(np.uint8) for a in arrays],
                              axis=1)
        for record in flat:
            if self._writer is None or self.shards[-1]["num_records"] == self.per_shard:
                self._close_shard()
                self._open_next()
            self._writer.write(record.tobytes())
            self.shards[-1]["num_records"] += 1
        self.written += n

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __exit__(self, exc_type, *exc) -> None:
        self._close_shard()
        if exc_type is not None:
            return
        if self.written != self.num_records:
            raise ValueError(f"{self.name}[{self.split}]: wrote {self.written} "
                             f"records, expected {self.num_records}")
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "dataset": self.name, "version": self.version, "split": self.split,
                "num_records": self.written, "features": _feature_json(self.features),
                "record_bytes": _record_size(self.features),
                "shards": self.shards, "source": self.source}
        path = os.path.join(self.folder, f"{self.split}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(path + ".tmp", path)


@dataclasses.dataclass
class Counter:
    """Records read through a source, for logs and tests (thread-safe)."""
    reads: int = 0
    index_sum: int = 0
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock,
                                             repr=False)

    def add(self, indices: np.ndarray) -> None:
        with self.lock:
            self.reads += len(indices)
            self.index_sum += int(np.sum(indices, dtype=np.int64))

    def take(self) -> tuple[int, int]:
        """(records read, sum of their example numbers) since the last take."""
        with self.lock:
            out = (self.reads, self.index_sum)
            self.reads = self.index_sum = 0
            return out


class SplitReader:
    """Random access to one converted split's rows; open with `open_split`.

    Reads go straight to one `ArrayRecordReader` per file (a batch's
    positions are grouped per file with numpy): 3x faster here than Grain's
    `ArrayRecordDataSource`, whose per-record Python bookkeeping and thread
    pool cost more than the reads of small rows. The readers are safe to
    share between Grain's threads, as in that data source.
    """

    def __init__(self, folder: str, meta: dict[str, Any], features: Features):
        self.meta, self.features = meta, features
        self.num_records = meta["num_records"]
        self.record_bytes = _record_size(features)
        self.paths = [os.path.join(folder, s["file"]) for s in meta["shards"]]
        self.starts = np.cumsum([0] + [s["num_records"] for s in meta["shards"]])
        self._readers = [None] * len(self.paths)
        self._lock = threading.Lock()

    def _reader(self, shard: int):
        if self._readers[shard] is None:
            with self._lock:
                if self._readers[shard] is None:
                    # ArrayRecord's options for random access: no read-ahead,
                    # reads in the calling thread (Grain's threads are the
                    # parallelism). A buffer of about one record (Grain uses
                    # 32 KiB): 10% less CPU per 3 KB row here, where
                    # ArrayRecord's ~8 us of decoding per record is most of
                    # what reading costs.
                    buffer = int(min(max(self.record_bytes, 4096), 1 << 16))
                    self._readers[shard] = _array_record().ArrayRecordReader(
                        self.paths[shard],
                        options="readahead_buffer_size:0,max_parallelism:0",
                        file_reader_buffer_size=buffer)
        return self._readers[shard]

    def read_bytes(self, positions: np.ndarray) -> list[bytes]:
        """The raw records at `positions` (ints in [0, num_records)), in order."""
        positions = np.asarray(positions, np.int64)
        if len(self.paths) == 1:
            return self._reader(0).read(positions.tolist())
        shard = np.searchsorted(self.starts, positions, side="right") - 1
        out = [b""] * len(positions)
        for s in np.unique(shard):
            where = np.nonzero(shard == s)[0]
            local = (positions[where] - self.starts[s]).tolist()
            got = self._reader(int(s)).read(local)
            for i, record in zip(where.tolist(), got):
                out[i] = record
        return out

    def read(self, positions: np.ndarray) -> Split:
        """The rows of records `positions` (int array [n]), as arrays [n, ...]."""
        n = len(positions)
        flat = np.frombuffer(b"".join(self.read_bytes(positions)), np.uint8).reshape(
            n, self.record_bytes)
        out, offset = {}, 0
        for key, (shape, dtype) in self.features.items():
            size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            column = np.ascontiguousarray(flat[:, offset:offset + size])
            out[key] = column.view(dtype.newbyteorder("<")).astype(dtype).reshape(
                (n,) + shape)
            offset += size
        return out


class Source:
    """The rows of a converted split, or of a contiguous slice of it: example
    i of the (sliced) split is record `start + i`.

    Attributes:
      num_examples: examples in the (sliced) split.
      features: the row features.
      description: e.g. "cifar10[train[:256]]", for logs and errors.
      counter: how many records were read, and which (for logs and tests).
    """

    def __init__(self, reader: SplitReader, start: int, stop: int, description: str):
        self.reader, self.start = reader, start
        self.num_examples = stop - start
        self.features = reader.features
        self.description = description
        self.counter = Counter()

    def read(self, examples: np.ndarray) -> Split:
        """Rows of example numbers `examples` (int [n]) in that order."""
        examples = np.asarray(examples, np.int64)
        if examples.size and (examples.min() < 0
                              or examples.max() >= self.num_examples):
            raise IndexError(f"example numbers outside [0, {self.num_examples})")
        self.counter.add(examples)
        return self.reader.read(examples + self.start)


def converted_splits(stream_dir: str, name: str, version: str) -> list[str]:
    folder = split_dir(stream_dir, name, version)
    if not os.path.isdir(folder):
        return []
    return sorted(f[:-len(".json")] for f in os.listdir(folder) if f.endswith(".json"))


def open_split(stream_dir: str, name: str, version: str, split: str,
               features: Features) -> SplitReader:
    """Opens a converted split after checking it; fails fast with the fix.

    Raises:
      UserError: no converted data, another version, the split not converted,
        other features, or missing files; the message names the command that
        converts it.
    """
    fix = CONVERT_HINT.format(name=name, split=split, out=stream_dir or "DIR")
    if not stream_dir:
        raise errors.UserError(
            f"Streaming {name}[{split}] needs converted data: set "
            f"--config.stream.dir or $RESEARCH_STREAM_DIR to a folder written by "
            f"`{fix}`.")
    root = os.path.join(stream_dir, name)
    if not os.path.isdir(root):
        raise errors.UserError(
            f"No converted {name} in stream dir {stream_dir!r}; convert it once "
            f"with `{fix}`.")
    folder = split_dir(stream_dir, name, version)
    if not os.path.isdir(folder):
        found = sorted(os.listdir(root))
        raise errors.UserError(
            f"Converted {name} in {stream_dir!r} is version {', '.join(found)}, but "
            f"TFDS's {name} is {version}; convert it again with `{fix}`.")
    path = os.path.join(folder, f"{split}.json")
    if not os.path.isfile(path):
        have = converted_splits(stream_dir, name, version)
        raise errors.UserError(
            f"Split {split!r} of {name} {version} is not converted in "
            f"{stream_dir!r} (converted: {', '.join(have) or 'none'}); run `{fix}`.")
    with open(path) as f:
        meta = json.load(f)
    if (meta.get("format"), meta.get("format_version")) != (FORMAT, FORMAT_VERSION):
        raise errors.UserError(
            f"{path} is format {meta.get('format')} v{meta.get('format_version')}, "
            f"this code reads {FORMAT} v{FORMAT_VERSION}; convert again with "
            f"`{fix}`.")
    if (meta.get("dataset"), meta.get("split")) != (name, split):
        raise errors.UserError(
            f"{path} describes {meta.get('dataset')}[{meta.get('split')}], not "
            f"{name}[{split}] (renamed or copied files?); convert again with "
            f"`{fix}`.")
    if meta["features"] != _feature_json(features):
        raise errors.UserError(
            f"{path} holds features {meta['features']}, but the dataset's rows are "
            f"{_feature_json(features)}; convert again with `{fix}`.")
    for shard in meta["shards"]:
        shard_path = os.path.join(folder, shard["file"])
        if not os.path.isfile(shard_path):
            raise errors.UserError(
                f"{shard_path} is missing (the conversion did not finish or files "
                f"were moved); convert again with `{fix}`.")
        _check_shard(shard_path, shard["num_records"], fix)
    return SplitReader(folder, meta, features)


def _check_shard(path: str, num_records: int, fix: str) -> None:
    """Raises UserError unless the file opens and holds `num_records`
    records (a truncated or damaged file fails here, not mid-run)."""
    try:
        reader = _array_record().ArrayRecordReader(path)
        found = reader.num_records()
        reader.close()
    except Exception as e:  # pylint: disable=broad-except  (C++ errors)
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    else:
        if found == num_records:
            return
        why = f"{found} records where the conversion wrote {num_records}"
    raise errors.UserError(f"{path} is damaged ({why}); convert again with `{fix}`.")


def write_split(stream_dir: str, name: str, version: str, split: str,
                features: Features, batches: Iterable[Split], num_records: int,
                records_per_shard: int, source: dict[str, Any] | None = None) -> int:
    """Writes batches of rows as a converted split; returns the record count."""
    with SplitWriter(stream_dir, name, version, split, features, num_records,
                     records_per_shard, source) as writer:
        for rows in batches:
            writer.write(rows)
    return writer.written
