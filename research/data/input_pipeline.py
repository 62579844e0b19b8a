"""Dataset specs and their registry: how a dataset's splits become rows.

Each spec (`DatasetSpec`) says how its splits become rows: one per training
example, and one per evaluation example or stream (`train_rows`,
`eval_rows`); the specs read TFDS through `tfds_reader.py`. Small datasets
are read once, whole, and live on the devices; shuffling and batching happen
there (`inputs.py`), so input never stalls a step. In a multi-process job
each process reads and keeps only its share of the rows (`Shard`);
`sharded_data` places the shares on the devices. Adding a dataset is one
spec plus a line in `DATASETS`.

Splits larger than memory stream instead (`streaming.py`) from ArrayRecord
files of the same rows, written once by `python -m research.convert` from a
spec's optional `stream_features` and `convert_batches`.
"""
import dataclasses
from typing import Any, Iterator, Protocol

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from research import errors
from research.core import config_lib
from research.data import tfds_reader

Split = dict[str, np.ndarray]  # feature name -> array with a leading example axis


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
        return self._rows(tfds_reader.read(self, config, split, ("image", "label")))

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
        num, batches = tfds_reader.iter_split(self, config, split, ("image", "label"),
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
        share = tfds_reader.even_split(split, jax.process_count(),
                                       jax.process_index())
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
    (stride `seq_len`, so every character is a target once an epoch; with
    `config.window_jitter`, rows that many characters longer, from which
    every step cuts a window at a random place); the
    evaluation split is cut into `config.eval_batch_size` contiguous streams,
    each read whole with the carry passed along, and every character after
    the first is scored once (or, with `config.eval_windows`, cut into windows
    like the training text, for models with a fixed context).
    """
    tfds_name: str
    download_host: str
    default_objective: str = "language_model"
    input_dtype: Any = jnp.int32

    def input_shape(self, config: ml_collections.ConfigDict) -> tuple[int, ...]:
        return (config.seq_len,)

    def text(self, config: ml_collections.ConfigDict, split: str) -> str:
        """A split's text (all its records joined)."""
        rows = tfds_reader.read(self, config, split, ("text",))
        return b"".join(rows["text"]).decode("utf-8")

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
        t, jitter = config.seq_len, config.get("window_jitter", 0)
        n = (len(text) - 1 - jitter) // t
        if n < 1:
            raise errors.UserError(
                f"The training text has {len(text)} characters, fewer than "
                f"config.seq_len + 1 + config.window_jitter = {t + 1 + jitter}; "
                "lower config.seq_len.")
        # With jitter, a row holds `jitter` characters more; every step cuts
        # a random window of seq_len + 1 out of it (augment.crop_windows).
        idx = np.arange(n)[:, None] * t + np.arange(t + 1 + jitter)[None, :]
        return share_of({"tokens": text[idx]})

    def eval_rows(self, config: ml_collections.ConfigDict,
                  info: dict[str, Any]) -> Shard:
        """`eval_batch_size` contiguous streams, one row each (a recurrent
        model's carry runs through each), or, with `config.eval_windows`,
        windows of `seq_len + 1` (a model with a fixed context); a mask is
        False past the end of the text."""
        text = self.load(config, config.eval_split, info["vocab"])["text"]
        if config.get("eval_windows"):
            return share_of(self.windows(text, config.seq_len))
        return share_of(self.streams(text, config.eval_batch_size))

    @staticmethod
    def windows(text: np.ndarray, seq_len: int) -> Split:
        """Windows of `seq_len + 1` characters with stride `seq_len`, the last
        one padded; every character after the first is a target once."""
        count = -(-(len(text) - 1) // seq_len)
        positions = (np.arange(count)[:, None] * seq_len
                     + np.arange(seq_len + 1)[None, :])
        tokens = np.where(positions < len(text),
                          text[np.minimum(positions, len(text) - 1)], 0)
        return {"tokens": tokens.astype(np.int32), "mask": positions[:, 1:] < len(text)}

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


# Text datasets' windows and `--mode=sample`'s options (`base_config("text")`).
TEXT_SECTION = config_lib.Section("text", {
    "seq_len": 128,               # characters per training window (BPTT length)
    "window_jitter": 0,           # training rows hold this many characters more,
    #                               and every step cuts a random window of them
    "eval_windows": False,        # evaluate windows of seq_len + 1 (a model with a
    #                               fixed context), not eval_batch_size streams
    "sample": {
        "prompt": "ROMEO:",       # text to continue; its characters must be known
        "length": 500,            # characters to generate
        "temperature": 0.8,       # 0: greedy (argmax)
        "top_k": 0,               # sample from the k likeliest; 0: all
        "top_p": 1.0,             # from the fewest likeliest reaching p; 1: all
        "seed": 0,                # same seed, same text
    }}, free=("sample.",), optional=True, check=lambda config: _check_text(config))


def _check_text(config: ml_collections.ConfigDict) -> None:
    if config.window_jitter < 0:
        raise errors.UserError(f"config.window_jitter={config.window_jitter}; "
                               "use 0 (fixed windows) or more characters.")
