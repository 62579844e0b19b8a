"""Reading TFDS splits into numpy: the only module that imports TensorFlow.

A split is read once and cached decoded (`cache_dir`), so a rerun or a test
loads it in a second; a dataset that is not prepared fails fast with what to
do (nothing is downloaded unless the config asks). Also what the streaming
path needs from TFDS: a split's rows in order (`iter_split`), the dataset's
version, how many files a split has, and split arithmetic (`split_ranges`).
"""
import hashlib
import json
import os
import socket
import sys
import time
from typing import Iterator

from absl import logging
import ml_collections
import numpy as np

from research import errors

Split = dict[str, np.ndarray]  # feature name -> array with a leading example axis


def resolve_data_dir(config: ml_collections.ConfigDict) -> str:
    """config.data_dir, else $TFDS_DATA_DIR, else TFDS's default folder."""
    return (config.data_dir or os.environ.get("TFDS_DATA_DIR")
            or os.path.expanduser("~/tensorflow_datasets"))


def read(dataset, config: ml_collections.ConfigDict, split: str,
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


def iter_split(dataset, config: ml_collections.ConfigDict, split: str,
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




def even_split(split: str, parts: int, index: int) -> str:
    """Part `index` of `split` cut into `parts` nearly equal TFDS splits."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    return tfds.even_splits(split, n=parts, drop_remainder=False)[index]
