"""Converts prepared TFDS splits to ArrayRecord files for the streaming path.

python -m research.convert --dataset=cifar10 --splits=train,test \
    --out_dir=/data/stream [--data_dir=/path/to/tensorflow_datasets]

Reads what TFDS already prepared (tfrecord, under --data_dir, else
$TFDS_DATA_DIR, else ~/tensorflow_datasets; nothing is downloaded), in the
order the in-memory path reads it, and writes every example's row, decoded,
to `<out_dir>/<dataset>/<version>/<split>.array_record-*` plus
`<split>.json` (`records.py`). Memory stays bounded by --batch_size examples.
Train with `--config.input=stream --config.stream.dir=<out_dir>` (or
`input=auto`, which streams converted splits too large for memory).
`--output=F.json` also writes what each split took (examples, seconds, bytes
on disk) to F.json and F.md, with how it was made (`provenance.py`).
"""
import glob
import os
import time

from absl import app
from absl import flags
from absl import logging
import ml_collections

from research import cli
from research import errors
from research import provenance
from research.data import input_pipeline
from research.data import tfds_reader
from research.data import records
from research.data import streaming

flags.DEFINE_string("dataset", None, "Key of input_pipeline.DATASETS.")
flags.DEFINE_list("splits", ["train", "test"], "Named TFDS splits to convert "
                  "(whole; slice them when training, e.g. train[:10%]).")
flags.DEFINE_string("out_dir", None, "Where the converted data goes (the stream "
                    "dir: --config.stream.dir or $RESEARCH_STREAM_DIR).")
flags.DEFINE_string("data_dir", "", "TFDS data_dir holding the prepared dataset; "
                    "'': $TFDS_DATA_DIR, else ~/tensorflow_datasets.")
flags.DEFINE_integer("batch_size", 1024, "Examples decoded at a time (memory).")
flags.DEFINE_float("shard_mb", 512, "Size of each ArrayRecord file, MB.")
flags.DEFINE_string("output", "", "Where to write the conversion's numbers "
                    "(F.json and F.md); '': nowhere.")
FLAGS = flags.FLAGS


def convert(dataset_name: str, splits: list[str], out_dir: str, data_dir: str = "",
            batch_size: int = 1024, shard_mb: float = 512,
            timings: dict[str, dict] | None = None) -> dict[str, int]:
    """Converts named `splits` of a prepared TFDS dataset; returns the
    example count of each (and fills `timings[split]` with its examples,
    seconds and bytes on disk).

    Raises:
      UserError: an unknown dataset, one that cannot stream, a sliced split
        name, or a dataset not prepared in the data_dir.
    """
    dataset = input_pipeline.get_dataset(dataset_name)
    if not streaming.can_stream(dataset):
        raise errors.UserError(
            f"Dataset {dataset_name!r} has no streaming rows (its spec defines no "
            "stream_features); it trains in memory only.")
    config = ml_collections.ConfigDict({"data_dir": data_dir, "download": False})
    features = dataset.stream_features(config)
    version = tfds_reader.dataset_version(dataset)
    per_shard = max(1, int(shard_mb * 2 ** 20) // records.row_bytes(features))
    counts = {}
    for split in splits:
        if tfds_reader.base_splits(split) != [split] or "[" in split:
            raise errors.UserError(
                f"--splits takes whole named splits, got {split!r}; convert "
                f"{tfds_reader.base_splits(split)} and slice when training.")
        start = time.perf_counter()
        num, batches = dataset.convert_batches(config, split, batch_size)
        counts[split] = records.write_split(
            out_dir, dataset.tfds_name, version, split, features, batches, num,
            per_shard, source={"data_dir": tfds_reader.resolve_data_dir(config),
                               "tfds_split": split, "tfds_files":
                               tfds_reader.split_files(dataset, config, split)})
        seconds = time.perf_counter() - start
        where = records.split_dir(out_dir, dataset.tfds_name, version)
        logging.info("Converted %s %s[%s]: %d examples in %.1fs", dataset.tfds_name,
                     version, split, num, seconds)
        print(f"{dataset.tfds_name} {version} {split}: {num} examples -> {where} "
              f"({seconds:.1f}s)")
        if timings is not None:
            timings[split] = {
                "dataset": f"{dataset.tfds_name}/{version}", "examples": num,
                "seconds": seconds, "row_bytes": records.row_bytes(features),
                "bytes_on_disk": sum(os.path.getsize(f) for f in glob.glob(
                    os.path.join(where, f"{split}.array_record-*")))}
    return counts


def write_timings(path: str, timings: dict[str, dict]) -> None:
    """`timings` (from `convert`) as path (JSON) and its .md twin."""
    lines = ["| dataset | split | examples | seconds | bytes a row | on disk |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {t['dataset']} | {split} | {t['examples']:,} | {t['seconds']:.1f} | "
              f"{t['row_bytes']:,} | {t['bytes_on_disk'] / 1e6:.1f} MB |"
              for split, t in timings.items()]
    provenance.write(path, provenance.about(), {"splits": timings}, lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    timings: dict[str, dict] = {}
    convert(FLAGS.dataset, FLAGS.splits, FLAGS.out_dir, FLAGS.data_dir,
            FLAGS.batch_size, FLAGS.shard_mb, timings)
    if FLAGS.output:
        write_timings(FLAGS.output, timings)


if __name__ == "__main__":
    flags.mark_flags_as_required(["dataset", "out_dir"])
    app.run(lambda argv: cli.guarded(main, argv))  # one-line errors, as main
