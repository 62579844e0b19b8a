"""Command-line entry point: flags, logging, and the chosen mode.

python -m research.main --config=configs/cifar_cnn.py [--workdir=runs/cifar_cnn]
python -m research.main --workdir=runs/cifar_cnn --mode=eval [--step=N] \
    [--config.eval_split=test]

stdout carries the results (a line per epoch, the final metrics, sampled
text); stderr carries warnings and errors, one line each. The full log is
in `<workdir>/train.log`; `--verbosity=0` (or higher) also prints it, with
tracebacks, on stderr.
"""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from research import cli
from research import evaluate
from research import sample
from research import summary
from research import train
from research.core import config_lib
from research.core import writers
from research import mesh as mesh_lib

flags.DEFINE_enum("mode", "train", ["train", "eval", "sample", "plot", "summary"],
                  "train: train (resuming from the workdir's latest checkpoint) "
                  "and evaluate; eval: evaluate a checkpoint only; sample: "
                  "continue config.sample.prompt with a text model; plot: PNG "
                  "plots of a workdir's run into <workdir>/plots; summary: the "
                  "model's parameters, FLOPs, memory and time per epoch, without "
                  "training.")
flags.DEFINE_integer("step", None, "--mode=eval/sample: the checkpoint step "
                     "to use (default: the latest).")
flags.DEFINE_string("coordinator_address", None, "Multi-process jobs: host:port of "
                    "process 0 (else read from the cluster's environment, if any).")
flags.DEFINE_integer("num_processes", None, "Multi-process jobs: how many.")
flags.DEFINE_integer("process_id", None, "Multi-process jobs: this one's index.")
flags.DEFINE_integer("distributed_timeout_s", 120, "Give up joining a "
                     "multi-process job after this many seconds.")
FLAGS = flags.FLAGS
parse_flags = cli.parse_flags  # app.run(main, flags_parser=parse_flags)


def run(argv: list[str]) -> dict[str, float]:
    """Runs the mode the parsed flags ask for; returns its final metrics."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.step is not None and FLAGS.mode == "train":
        raise app.UsageError("--step picks a checkpoint for --mode=eval or sample; "
                             "training always resumes from the latest checkpoint.")
    mesh_lib.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id, FLAGS.distributed_timeout_s)
    config, workdir = _config_and_workdir()
    cli.cache_compiled_programs()
    if FLAGS.mode == "eval":
        result = evaluate.evaluate(config, workdir, FLAGS.step)
        writers.report(f"step {result['step']}: " + writers.describe(
            {k: v for k, v in result.items() if k != "step"}, config.eval_split))
        return result
    if FLAGS.mode == "sample":
        text = sample.sample(config, workdir, FLAGS.step)
        writers.report(text)
        return {"text": text}
    if FLAGS.mode == "plot":
        paths = evaluate.plot(config, workdir, FLAGS.step)
        writers.report("\n".join(paths))
        return {"plots": paths}
    if FLAGS.mode == "summary":
        result = summary.summarize(config)
        writers.report(summary.describe(result))
        return result
    cli.log_to_file(workdir)
    return train.train_and_evaluate(config, workdir,
                                    allow_config_change=FLAGS.allow_config_change)


def _config_and_workdir():
    config, workdir = FLAGS.config, FLAGS.workdir
    if config is None:
        if FLAGS.mode == "train" or workdir is None:
            raise app.UsageError("--config is required (e.g. "
                                 "--config=configs/cifar_cnn.py); --mode=eval or "
                                 "sample may instead read the config a --workdir "
                                 "saved.")
        config = config_lib.load_workdir_config(workdir)
        for key, text in cli.workdir_overrides():
            config_lib.override_from_text(config, key, text)
    if workdir is None:
        workdir = cli.default_workdir(config_flags.get_config_filename(FLAGS["config"]))
    logging.info("Mode %s, workdir %s, config:\n%s", FLAGS.mode, workdir, config)
    return config, workdir


def main(argv: list[str]) -> None:
    cli.guarded(run, argv)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
