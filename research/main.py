"""Command-line entry point: flags, logging, and the chosen mode.

python -m research.main --config=configs/cifar_cnn.py [--workdir=runs/cifar_cnn]
python -m research.main --workdir=runs/cifar_cnn --mode=eval [--step=N]
"""
import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from research import config_lib
from research import errors
from research import evaluate
from research import parallel
from research import sample
from research import train

config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/cifar_cnn.py[:smoke]; "
    "fields are overridden with --config.<field>=<value>.", lock_config=True)
flags.DEFINE_string("workdir", None, "Output folder for config, metrics and "
                    "checkpoints (default: runs/<config file name>[_<preset>]).")
flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"],
                  "train: train (resuming from the workdir's latest checkpoint) "
                  "and evaluate; eval: evaluate a checkpoint only; sample: "
                  "continue config.sample.prompt with a text model.")
flags.DEFINE_integer("step", None, "--mode=eval/sample: the checkpoint step "
                     "to use (default: the latest).")
flags.DEFINE_string("coordinator_address", None, "Multi-process jobs: host:port of "
                    "process 0 (else read from the cluster's environment, if any).")
flags.DEFINE_integer("num_processes", None, "Multi-process jobs: how many.")
flags.DEFINE_integer("process_id", None, "Multi-process jobs: this one's index.")
flags.DEFINE_integer("distributed_timeout_s", 120, "Give up joining a "
                     "multi-process job after this many seconds.")
FLAGS = flags.FLAGS


def default_workdir(config_spec: str) -> str:
    """runs/<config name>[_<preset>] for `configs/<name>.py[:<preset>]`."""
    path, _, preset = config_spec.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", f"{name}_{preset}" if preset else name)


def run(argv: list[str]) -> dict[str, float]:
    """Runs the mode the parsed flags ask for; returns its final metrics."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id, FLAGS.distributed_timeout_s)
    config = FLAGS.config
    workdir = FLAGS.workdir
    if config is None:
        if FLAGS.mode == "train" or workdir is None:
            raise app.UsageError("--config is required (e.g. "
                                 "--config=configs/cifar_cnn.py); --mode=eval may "
                                 "instead read the config a --workdir saved.")
        config = config_lib.load_workdir_config(workdir)
    if workdir is None:
        workdir = default_workdir(config_flags.get_config_filename(FLAGS["config"]))
    logging.info("Mode %s, workdir %s, config:\n%s", FLAGS.mode, workdir, config)
    if FLAGS.mode == "eval":
        return evaluate.evaluate(config, workdir, FLAGS.step)
    if FLAGS.mode == "sample":
        text = sample.sample(config, workdir, FLAGS.step)
        print(text)
        return {"text": text}
    return train.train_and_evaluate(config, workdir)


class _QuietLibraries:
    """Drops INFO lines of libraries that log every checkpoint file they write."""

    _NOISY = (f"{os.sep}orbax{os.sep}", f"{os.sep}tensorflow_datasets{os.sep}")

    def filter(self, record) -> bool:
        return record.levelno > std_logging.INFO or not any(
            part in record.pathname for part in self._NOISY)


def main(argv: list[str]) -> None:
    logging.get_absl_handler().python_handler.addFilter(_QuietLibraries())
    try:
        run(argv)
    except errors.UserError as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except train.Interrupted as e:
        logging.warning("%s", e)
        sys.exit(128 + e.signum)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, plus a one-line error for unknown --config.<field>."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:  # raised by ml_collections
        print(f"FATAL Flags parsing error: unknown config field: {e}".replace(
            "\\n", " "), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
