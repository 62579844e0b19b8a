"""TFDS datasets as in-memory numpy arrays; the only module importing TensorFlow.

Small datasets are read once, whole, and live on the device; shuffling and
batching happen there (see `steps.train_steps`), so input never stalls a step.
Each dataset spec (`DatasetSpec`) says how its splits become rows: one per
training example, and one per evaluation example or stream (`train_rows`,
`eval_rows`). In a multi-process job each process reads and keeps only its
share of the rows (`Shard`); `sharded_data` places the shares on the devices.
Adding a dataset is one spec plus a line in `DATASETS`.

Splits larger than memory stream instead (`streaming.py`) from ArrayRecord
files of the same rows, written once by `python -m research.convert`; this
module gives it what needs TFDS: the rows of a split in order
(`convert_batches`), the dataset's version and split arithmetic.
"""
import dataclasses
import hashlib
import json
import os
import socket
import sys
import time
from typing import Any, Iterator, Protocol

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from research import errors

Split = dict[str, np.ndarray]  # feature name -> array with a leading example axis


def resolve_data_dir(config: ml_collections.ConfigDict) -> str:
    """config.data_dir, else $TFDS_DATA_DIR, else TFDS's default folder."""
    return (config.data_dir or os.environ.get("TFDS_DATA_DIR")
            or os.path.expanduser("~/tensorflow_datasets"))


def pad_to_batches(data: Split, batch_size: int, num_batches: int | None = None
                   ) -> Split:
    """Pads rows to whole batches, [num_batches, batch, ...], with a `mask`
    that is False on the padding (a `mask` already in `data` is kept)."""
    n = len(next(iter(data.values())))
    num_batches = num_batches or -(-n // batch_size)
    data = {"mask": np.ones(n, bool), **data}
    pad = num_batches * batch_size - n
    out = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
           for k, v in data.items()}
    return {k: v.reshape((num_batches, batch_size) + v.shape[1:])
            for k, v in out.items()}


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's rows of a split (in split order) and the row count of
    every process, in process order; one process holds the whole split."""
    rows: Split
    counts: tuple[int, ...]


class DatasetSpec(Protocol):
    """The contract every dataset spec follows (see `ImageClassification`).

    Attributes:
      tfds_name: the TFDS dataset it reads.
      download_host: probed before a download, so that offline runs fail fast.
      default_objective: key of `objectives.OBJECTIVES` used when the config
        names none.
      input_dtype: the model input's dtype.
    """
    tfds_name: str
    download_host: str
    default_objective: str
    input_dtype: Any

    def info(self, config: ml_collections.ConfigDict) -> dict[str, Any]:
        """What the model and the rows need besides the data (e.g. the number
        of classes, a vocabulary). Computed once per run and saved in every
        checkpoint, so a checkpoint is usable on its own; JSON-serialisable."""

    def input_shape(self, config: ml_collections.ConfigDict) -> tuple[int, ...]:
        """One example's model input shape (no batch axis)."""

    def train_rows(self, config: ml_collections.ConfigDict,
                   info: dict[str, Any]) -> "Shard":
        """This process's share of the training rows, one per example."""

    def eval_rows(self, config: ml_collections.ConfigDict,
                  info: dict[str, Any]) -> "Shard":
        """This process's share of the evaluation rows; a row may carry its
        own boolean `mask`."""

    def preprocess(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Raw rows to model inputs on device (e.g. uint8 to float); pure."""

    def throughput_unit(self, config: ml_collections.ConfigDict) -> tuple[str, int]:
        """What speed is counted in, and how many of it an example holds."""

    # Optional, for streaming (`config.input`): a spec without these methods
    # keeps its splits in memory, and `config.input="stream"` is refused.
    #
    # def stream_features(self, config) -> records.Features:
    #     """One training/evaluation row's features: name -> (shape, dtype).
    #     Streamed splits hold one such row per example, exactly the rows
    #     `train_rows` and `eval_rows` give."""
    #
    # def convert_batches(self, config, split, batch_size
    #                     ) -> tuple[int, Iterator[Split]]:
    #     """A split's example count and its rows in split order, a batch at a
    #     time (never the whole split at once), for `research.convert`."""


def even_bounds(n: int, parts: int) -> np.ndarray:
    """Where n rows split into `parts` nearly equal contiguous pieces."""
    return np.array([n * i // parts for i in range(parts + 1)])


def share_of(rows: Split) -> Shard:
    """This process's even share of rows that every process has read."""
    bounds = even_bounds(len(next(iter(rows.values()))), jax.process_count())
    p = jax.process_index()
    return Shard({k: v[bounds[p]:bounds[p + 1]] for k, v in rows.items()},
                 tuple(np.diff(bounds).tolist()))


@dataclasses.dataclass(frozen=True)
class ImageClassification:
    """A TFDS image dataset with `image` (uint8 HWC) and integer `label`."""
    tfds_name: str
    image_shape: tuple[int, ...]
    num_classes: int
    download_host: str
    class_names: tuple[str, ...] = ()
    default_objective: str = "classification"
    input_dtype: Any = jnp.float32

    def input_shape(self, config: ml_collections.ConfigDict) -> tuple[int, ...]:
        """One example's model input shape (no batch axis)."""
        del config
        return self.image_shape

    def load(self, config: ml_collections.ConfigDict, split: str) -> Split:
        return self._rows(_read_tfds(self, config, split, ("image", "label")))

    @staticmethod
    def _rows(parts: Split) -> Split:
        return {"image": parts["image"].astype(np.uint8),
                "label": parts["label"].astype(np.int32)}

    def stream_features(self, config: ml_collections.ConfigDict
                        ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """A row's features when streamed: the same rows as `load`."""
        del config
        return {"image": (tuple(self.image_shape), np.dtype(np.uint8)),
                "label": ((), np.dtype(np.int32))}

    def convert_batches(self, config: ml_collections.ConfigDict, split: str,
                        batch_size: int) -> tuple[int, Iterator[Split]]:
        """The split's size and its rows in split order, `batch_size` at a time."""
        num, batches = iter_tfds(self, config, split, ("image", "label"),
                                 batch_size)
        return num, (self._rows(parts) for parts in batches)

    def train_rows(self, config: ml_collections.ConfigDict,
                   info: dict[str, Any]) -> Shard:
        """One row per training example; each process reads only its share."""
        del info
        return self._read_share(config, config.train_split)

    def eval_rows(self, config: ml_collections.ConfigDict,
                  info: dict[str, Any]) -> Shard:
        del info
        return self._read_share(config, config.eval_split)

    def _read_share(self, config: ml_collections.ConfigDict, split: str) -> Shard:
        if jax.process_count() == 1:
            rows = self.load(config, split)
            return Shard(rows, (len(rows["label"]),))
        # pylint: disable-next=g-import-not-at-top
        import tensorflow_datasets as tfds
        share = tfds.even_splits(split, n=jax.process_count(),
                                 drop_remainder=False)[jax.process_index()]
        rows = self.load(config, share)
        counts = multihost_utils.process_allgather(np.int64(len(rows["label"])))
        counts = tuple(int(c) for c in np.ravel(counts))
        logging.info("process %d of %d read %d of the %d examples of %s",
                     jax.process_index(), jax.process_count(), len(rows["label"]),
                     sum(counts), split)
        return Shard(rows, counts)

    def throughput_unit(self, config: ml_collections.ConfigDict) -> tuple[str, int]:
        del config
        return "images", 1

    def info(self, config: ml_collections.ConfigDict) -> dict[str, Any]:
        del config
        info = {"num_classes": self.num_classes}
        if self.class_names:
            info["class_names"] = list(self.class_names)
        return info

    def preprocess(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """uint8 pixels to float32 in [0, 1]; runs on device inside the step."""
        return {**batch, "image": batch["image"].astype(jnp.float32) / 255.0}


@dataclasses.dataclass(frozen=True)
class CharacterText:
    """A TFDS text dataset (`text` feature) as a character language model.

    The vocabulary is the sorted characters of the training split. Training
    examples are the text cut into windows of `config.seq_len + 1` characters
    (stride `seq_len`, so every character is a target once an epoch); the
    evaluation split is cut into `config.eval_batch_size` contiguous streams,
    each read whole with the carry passed along, and every character after
    the first is scored once.
    """
    tfds_name: str
    download_host: str
    default_objective: str = "language_model"
    input_dtype: Any = jnp.int32

    def input_shape(self, config: ml_collections.ConfigDict) -> tuple[int, ...]:
        return (config.seq_len,)

    def text(self, config: ml_collections.ConfigDict, split: str) -> str:
        """A split's text (all its records joined)."""
        return b"".join(_read_tfds(self, config, split, ("text",))["text"]).decode(
            "utf-8")

    def vocab(self, config: ml_collections.ConfigDict) -> str:
        """The sorted characters of the training split."""
        return "".join(sorted(set(self.text(config, "train"))))

    def load(self, config: ml_collections.ConfigDict, split: str,
             vocab: str) -> Split:
        return {"text": encode(self.text(config, split), vocab)}

    def train_rows(self, config: ml_collections.ConfigDict,
                   info: dict[str, Any]) -> Shard:
        """Windows of `seq_len + 1` characters, one row each. The text is a
        single TFDS record, so every process reads it and keeps its share."""
        text = self.load(config, config.train_split, info["vocab"])["text"]
        t = config.seq_len
        n = (len(text) - 1) // t
        if n < 1:
            raise errors.UserError(
                f"The training text has {len(text)} characters, fewer than "
                f"config.seq_len + 1 = {t + 1}; lower config.seq_len.")
        idx = np.arange(n)[:, None] * t + np.arange(t + 1)[None, :]
        return share_of({"tokens": text[idx]})

    def eval_rows(self, config: ml_collections.ConfigDict,
                  info: dict[str, Any]) -> Shard:
        """`eval_batch_size` contiguous streams, one row each, with a mask
        that is False past the end of the text."""
        text = self.load(config, config.eval_split, info["vocab"])["text"]
        return share_of(self.streams(text, config.eval_batch_size))

    @staticmethod
    def streams(text: np.ndarray, num_streams: int) -> Split:
        """The text cut into `num_streams` contiguous pieces; every character
        after the first is a target in exactly one of them."""
        length = -(-(len(text) - 1) // num_streams)  # targets per stream
        starts = np.arange(num_streams)[:, None] * length
        positions = starts + np.arange(length + 1)[None, :]
        tokens = np.where(positions < len(text),
                          text[np.minimum(positions, len(text) - 1)], 0)
        return {"tokens": tokens.astype(np.int32), "mask": positions[:, 1:] < len(text)}

    def throughput_unit(self, config: ml_collections.ConfigDict) -> tuple[str, int]:
        return "chars", config.seq_len

    def info(self, config: ml_collections.ConfigDict) -> dict[str, Any]:
        return {"vocab": self.vocab(config)}

    def preprocess(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return batch


DATASETS = {
    "cifar10": ImageClassification(
        "cifar10", (32, 32, 3), 10, "www.cs.toronto.edu",
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
         "ship", "truck")),
    "tiny_shakespeare": CharacterText("tiny_shakespeare",
                                      "raw.githubusercontent.com"),
}


def get_dataset(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise errors.UserError(
            f"Unknown dataset {name!r}; choose from {sorted(DATASETS)}.")
    return DATASETS[name]


def encode(text: str, vocab: str) -> np.ndarray:
    """Characters to int32 ids; raises UserError naming unknown characters."""
    index = {c: i for i, c in enumerate(vocab)}
    unknown = sorted(set(text) - set(index))
    if unknown:
        raise errors.UserError(
            f"Characters not in the vocabulary: {''.join(unknown)!r}; the model "
            f"knows only {vocab!r}.")
    return np.array([index[c] for c in text], np.int32)


def _read_tfds(dataset, config: ml_collections.ConfigDict, split: str,
               features: tuple[str, ...]) -> Split:
    """`features` of a TFDS split as whole arrays, from the decoded-split cache
    when the same files were read before (`cache_dir()`)."""
    data_dir = resolve_data_dir(config)
    path = _cache_path(dataset.tfds_name, data_dir, split, features)
    if path is not None and os.path.exists(path):
        with np.load(path) as cached:
            arrays = {k: cached[k] for k in features}
        logging.info("Loaded %s[%s] from the cache %s", dataset.tfds_name, split, path)
        return arrays
    arrays = _decode_tfds(dataset, config, data_dir, split, features)
    if path is not None:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(f"{path}.{os.getpid()}.tmp", "wb") as f:
                # Text records as fixed-width bytes: loading needs no pickle.
                np.savez(f, **{k: v.astype(bytes) if v.dtype == object else v
                               for k, v in arrays.items()})
            os.replace(f"{path}.{os.getpid()}.tmp", path)
        except OSError as e:  # a cache is an optimisation: never fail for it
            logging.warning("Could not cache %s[%s] in %s: %s", dataset.tfds_name,
                            split, path, e)
    return arrays


def cache_dir() -> str:
    """Where decoded splits (and compiled programs) are cached: $RESEARCH_CACHE_DIR,
    else ~/.cache/research. Safe to delete at any time."""
    return os.environ.get("RESEARCH_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "research")


def _cache_path(name: str, data_dir: str, split: str, features: tuple[str, ...]
                ) -> str | None:
    """The cache file of a split, keyed by what was read: the prepared files'
    names, sizes and times, the split and the features. None when the
    dataset is not prepared on disk (e.g. under tfds.testing.mock_data)."""
    root = os.path.join(data_dir, name)
    if not os.path.isdir(root) or _tfds_mocked():
        return None
    files = []
    for folder, _, names in os.walk(root):
        for n in sorted(names):
            stat = os.stat(os.path.join(folder, n))
            files.append((os.path.relpath(os.path.join(folder, n), root),
                          stat.st_size, stat.st_mtime_ns))
    key = hashlib.sha256(json.dumps([os.path.abspath(root), sorted(files), str(split),
                                     list(features)]).encode()).hexdigest()[:24]
    return os.path.join(cache_dir(), "datasets", name, f"{key}.npz")


def _tfds_mocked() -> bool:
    """Whether `tfds.testing.mock_data` is active: it fakes what TFDS reads,
    so the cache (keyed by the real files) must not answer for it."""
    tfds = sys.modules.get("tensorflow_datasets")
    if tfds is None:  # never imported: nothing can be mocked
        return False
    as_dataset = tfds.core.dataset_builder.DatasetBuilder.as_dataset
    return getattr(as_dataset, "__module__", "").startswith(
        "tensorflow_datasets.testing")


def _decode_tfds(dataset, config: ml_collections.ConfigDict, data_dir: str,
                 split: str, features: tuple[str, ...]) -> Split:
    """Reads and decodes `features` of a TFDS split with TFDS."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    start = time.perf_counter()
    ds = _load_tfds(dataset, config, data_dir, split)
    parts = {key: [] for key in features}
    # Never batch_size=-1: it aborts the process under tfds.testing.mock_data.
    for batch in tfds.as_numpy(ds.batch(10_000)):
        for key in parts:
            parts[key].append(batch[key])
    if not parts[features[0]]:
        raise errors.UserError(f"Split {split!r} of {dataset.tfds_name} is empty.")
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    logging.info("Decoded %s[%s]: %d examples from %s in %.1fs", dataset.tfds_name,
                 split, len(arrays[features[0]]), data_dir,
                 time.perf_counter() - start)
    return arrays


def _load_tfds(dataset, config: ml_collections.ConfigDict, data_dir: str,
               split: str):
    """`tfds.load` of a split in file order, with one-line errors (and a
    download only when the config allows it and the host is reachable)."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    try:
        try:
            return tfds.load(dataset.tfds_name, split=split, data_dir=data_dir,
                             download=False, shuffle_files=False)
        except AssertionError:  # not prepared under data_dir
            if not config.download:
                raise
            _check_reachable(dataset.download_host, dataset.tfds_name, data_dir)
            return tfds.load(dataset.tfds_name, split=split, data_dir=data_dir,
                             download=True, shuffle_files=False)
    except (AssertionError, tfds.core.registered.DatasetNotFoundError) as e:
        raise errors.UserError(
            f"Dataset {dataset.tfds_name!r} is not prepared in data_dir "
            f"{data_dir!r} ({type(e).__name__}: {str(e).splitlines()[0]}). Fix: point "
            f"--config.data_dir or $TFDS_DATA_DIR at a TFDS data_dir that holds "
            f"{dataset.tfds_name}/ (in this project: ../shared/tensorflow_datasets), "
            f"or, on a machine with network access, pass --config.download=True."
        ) from None
    except ValueError as e:  # bad split syntax or an unknown split name
        raise errors.UserError(f"Bad split {split!r} for {dataset.tfds_name}: "
                               f"{str(e).splitlines()[0]}") from None


def iter_tfds(dataset, config: ml_collections.ConfigDict, split: str,
              features: tuple[str, ...], batch_size: int
              ) -> tuple[int, Iterator[Split]]:
    """A TFDS split's example count and its `features` in the in-memory
    path's order (`tfds.load` without shuffling), `batch_size` examples at a
    time: memory stays bounded by the batch, whatever the split's size."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    data_dir = resolve_data_dir(config)
    ds = _load_tfds(dataset, config, data_dir, split)
    num = tfds.builder(dataset.tfds_name, data_dir=data_dir).info.splits[
        split].num_examples

    def batches():
        for batch in tfds.as_numpy(ds.batch(batch_size)):
            yield {k: batch[k] for k in features}
    return num, batches()


def split_files(dataset, config: ml_collections.ConfigDict, split: str) -> int:
    """How many files TFDS stored a prepared split in (it reads several
    interleaved, so a slice of such a split is not a range of its order)."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = tfds.builder(dataset.tfds_name, data_dir=resolve_data_dir(config))
    return builder.info.splits[split].num_shards


def dataset_version(dataset) -> str:
    """The TFDS version of `dataset` that this code reads (its builder's)."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    try:
        return str(tfds.builder_cls(dataset.tfds_name).VERSION)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise errors.UserError(
            f"TFDS has no dataset {dataset.tfds_name!r} "
            f"({str(e).splitlines()[0]}).") from None


def base_splits(split: str) -> list[str]:
    """The named splits a TFDS split string reads ("train[:10%]+test" ->
    ["train", "test"])."""
    names = [part.split("[")[0].strip() for part in split.split("+")]
    return list(dict.fromkeys(names))


def split_ranges(split: str, lengths: dict[str, int]) -> list[tuple[str, int, int]]:
    """A TFDS split string as (named split, start, stop) ranges, in reading
    order, with TFDS's own slicing rules (percent rounding, negative ends).

    Raises:
      UserError: a split string TFDS cannot parse or slice.
    """
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    class _Info:  # what TFDS's slicing reads of a split
        def __init__(self, n):
            self.num_examples, self.shard_lengths = n, [n]
    try:
        instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(
            {name: _Info(n) for name, n in lengths.items()})
    except (ValueError, AssertionError) as e:
        raise errors.UserError(f"Bad split {split!r}: "
                               f"{str(e).splitlines()[0]}") from None
    out = []
    for ins in instructions:
        n = lengths[ins.splitname]
        start = 0 if ins.from_ is None else ins.from_
        stop = n if ins.to is None else ins.to
        # TFDS resolves negative ends already; this keeps both in [0, n].
        start, stop = (min(max(v + n if v < 0 else v, 0), n) for v in (start, stop))
        out.append((ins.splitname, int(start), int(stop)))
    return out


def prepared_examples(dataset, config: ml_collections.ConfigDict, split: str
                      ) -> int | None:
    """The example count of a whole named split prepared in the TFDS
    data_dir (its newest version), from `dataset_info.json` alone: no TFDS
    import, nothing read. None if unknown: not prepared, a sliced or summed
    split, or under `tfds.testing.mock_data` (its metadata is not the data's)."""
    root = os.path.join(resolve_data_dir(config), dataset.tfds_name)
    if "[" in split or "+" in split or _tfds_mocked() or not os.path.isdir(root):
        return None

    def version(name):
        try:
            return tuple(int(p) for p in name.split("."))
        except ValueError:
            return ()
    versions = sorted((v for v in os.listdir(root) if version(v)), key=version)
    path = os.path.join(root, versions[-1], "dataset_info.json") if versions else ""
    try:
        with open(path) as f:
            splits = json.load(f).get("splits", [])
        return sum(int(n) for s in splits if s.get("name") == split
                   for n in s.get("shardLengths", [])) or None
    except (OSError, ValueError):
        return None  # the in-memory read reports what is wrong, with the fix


def _check_reachable(host: str, name: str, data_dir: str) -> None:
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as e:
        raise errors.UserError(
            f"config.download=True but {host} is unreachable ({e}); {name} cannot be "
            f"downloaded into {data_dir!r}. Prepare it on a machine with network "
            f"access and point --config.data_dir or $TFDS_DATA_DIR at it.") from None
