"""The command line of every entry point: the `--config`/`--workdir` flags,
one-line errors and exit statuses, logging to stderr and the workdir, the
compilation cache. `research.main`, `research.compress`, `research.sweep`
and `research.bench` run through it:

    app.run(lambda argv: cli.guarded(run, argv), flags_parser=cli.parse_flags)
"""
import errno
import logging as std_logging
import os
import re
import sys
import threading
import warnings

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from research import errors
from research import malloc
from research.core import config_lib
from research.core import trainer
from research.data import tfds_reader

config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/cifar_cnn.py[:smoke]; "
    "fields are overridden with --config.<field>=<value>.", lock_config=True)
flags.DEFINE_string("workdir", None, "Output folder for config, metrics and "
                    "checkpoints (default: runs/<config file name>[_<preset>]).")
# Here, not in main.py: research.sweep, compress and scaling resume runs too.
flags.DEFINE_bool("allow_config_change", False, "Resume a run whose config "
                  "changed in a field that changes the experiment (the change "
                  "is recorded in config.json).")
FLAGS = flags.FLAGS
LOG_FILE = "train.log"
# `--config.<field>=<value>` given with --workdir alone (no --config): applied
# to the config the workdir saved (`workdir_overrides`).
_workdir_overrides: list[tuple[str, str]] = []


def workdir_overrides() -> list[tuple[str, str]]:
    """(dotted key, text) of the `--config.x=y` given without `--config`."""
    return list(_workdir_overrides)


def default_workdir(config_spec: str) -> str:
    """runs/<config name>[_<preset>] for `configs/<name>.py[:<preset>]`."""
    path, _, preset = config_spec.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", f"{name}_{preset}" if preset else name)


def pipeline_workdir(argv: list[str], example_config: str) -> str:
    """For commands whose `--config` drives several runs (research.compress,
    research.sweep): checks the command line, turns on the compilation cache
    and the log file; returns the workdir that holds the runs."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.config is None:
        raise app.UsageError(f"--config is required, e.g. --config={example_config}")
    cache_compiled_programs()
    workdir = FLAGS.workdir or default_workdir(
        config_flags.get_config_filename(FLAGS["config"]))
    log_to_file(workdir)
    return workdir


def cache_compiled_programs() -> None:
    """JAX's persistent compilation cache, unless the user set one: a rerun of
    the same config loads its compiled steps instead of compiling them.

    Not in a multi-process job on CPUs: there a cached program's first
    cross-process collective (gloo) never completes, and the job hangs
    (jax 0.12; every process compiles instead, a few seconds).
    """
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        if jax.config.jax_compilation_cache_dir:
            logging.warning("Not using the compilation cache %s: cached programs "
                            "hang multi-process CPU jobs.",
                            jax.config.jax_compilation_cache_dir)
            jax.config.update("jax_enable_compilation_cache", False)
        return
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir",
                          os.path.join(tfds_reader.cache_dir(), "jax"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


class _QuietLibraries:
    """Keeps libraries' chatter (every checkpoint file Orbax writes, TFDS's
    notes) out of the terminal; the log file still has their warnings."""

    # asyncio: after a failed Orbax save, its abandoned write tasks are
    # reported ("Task exception was never retrieved") at shutdown.
    _NOISY = (f"{os.sep}orbax{os.sep}", f"{os.sep}tensorflow_datasets{os.sep}",
              f"{os.sep}tensorflow{os.sep}", f"{os.sep}asyncio{os.sep}")

    def __init__(self, threshold: int):
        self.threshold = threshold

    def filter(self, record) -> bool:
        return record.levelno >= self.threshold or not any(
            part in record.pathname for part in self._NOISY)


def verbose() -> bool:
    return FLAGS["verbosity"].present


def _setup_logging() -> None:
    """stderr: warnings and errors only, unless --verbosity is given."""
    handler = logging.get_absl_handler()
    if verbose():
        handler.addFilter(_QuietLibraries(std_logging.WARNING))
        return
    handler.setLevel(std_logging.WARNING)
    # Library errors are reported as one line by `main`; details go to the log.
    handler.addFilter(_QuietLibraries(std_logging.CRITICAL))
    # A failed Orbax restore abandons TensorStore reads whose callbacks later
    # find their event loop closed; TensorStore prints each such error
    # through sys.excepthook. They are harmless: into the log file with them.
    sys.excepthook = lambda *exc: logging.info("Background error", exc_info=exc)
    sys.unraisablehook = lambda u: logging.info("Background error: %s", u.exc_value)
    # The compilation cache only saves time: failing to read or write it (a
    # full disk) is a note for the log, not the terminal.
    show = warnings.showwarning

    def show_warning(message, category, *args, **kwargs):
        if "persistent compilation cache" in str(message):
            logging.info("%s: %s", category.__name__, message)
        else:
            show(message, category, *args, **kwargs)
    warnings.showwarning = show_warning


def log_to_file(workdir: str) -> None:
    """The full log (INFO and up) of a training run, in the workdir."""
    name = LOG_FILE if jax.process_index() == 0 else f"train.{jax.process_index()}.log"
    try:
        os.makedirs(workdir, exist_ok=True)
        file_handler = _LogFile(os.path.join(workdir, name))
    except OSError:
        return  # the trainer reports an unusable workdir itself
    file_handler.setLevel(std_logging.INFO)
    file_handler.setFormatter(logging.PythonFormatter())
    file_handler.addFilter(_QuietLibraries(std_logging.WARNING))
    std_logging.getLogger().addHandler(file_handler)


class _LogFile(std_logging.FileHandler):
    """The workdir's log file. When a write fails (a full disk), the file is
    dropped with one line on stderr, not a traceback for every record."""

    failed = False

    def emit(self, record: std_logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: std_logging.LogRecord) -> None:
        del record
        with _LOG_FILE_FAILED:  # writer threads (Orbax's) may fail at once
            if self.failed:
                return
            self.failed = True
        std_logging.getLogger().removeHandler(self)
        error = sys.exc_info()[1]
        print(f"warning: stopped writing {self.baseFilename}: "
              f"{type(error).__name__}: {error}", file=sys.stderr)


_LOG_FILE_FAILED = threading.Lock()


def _fail(message: str, code: int) -> None:
    logging.info("Exiting with status %d", code, exc_info=True)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _os_error(error: BaseException) -> tuple[int, str] | None:
    """(errno, which file) of the operating-system error behind `error`, if
    any: an OSError in the chain, or TensorStore's `[os_error_code='N']`
    (Orbax writes checkpoints through it). The file may be ""."""
    while error is not None:
        if isinstance(error, OSError) and error.errno is not None:
            return error.errno, error.filename or ""
        found = re.search(r"os_error_code='(\d+)'", str(error))
        if found:
            path = re.search(r'local file "([^"]+)"', str(error))
            return int(found.group(1)), path.group(1) if path else ""
        error = error.__cause__ or error.__context__
    return None


# Disk full, quota exceeded, file too large.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def guarded(fn, argv: list[str]) -> None:
    """Runs `fn(argv)` as a command: one-line errors and exit statuses (2: a
    mistake in the command, config or workdir; 1: a failure at run time)."""
    _setup_logging()
    malloc.keep_freed_memory()
    try:
        fn(argv)
    except (errors.UserError, app.UsageError) as e:
        _fail(str(e), 2)
    except trainer.NonFiniteLossError as e:
        _fail(str(e), 1)
    except trainer.Interrupted as e:
        logging.warning("%s", e)
        sys.exit(128 + e.signum)
    except Exception as e:  # pylint: disable=broad-except
        if verbose():
            raise
        os_error = _os_error(e)
        if os_error is not None:
            code, where = os_error
            if code in _NO_SPACE:
                _fail(f"{os.strerror(code)} while writing {where or 'the workdir'}; "
                      "free space (or raise the limit), then rerun to resume from "
                      "the last checkpoint.", 1)
            _fail(f"{os.strerror(code)}{': ' + where if where else ''} (the "
                  "traceback is in the workdir's train.log; rerun with "
                  "--verbosity=0 to print it)", 1)
        _fail(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              "(the traceback is in the workdir's train.log; rerun with "
              "--verbosity=0 to print it)", 1)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser with one-line errors (status 2) for bad flags, unknown
    or ill-typed config fields, missing config files and unknown presets."""
    argv = list(argv)
    # New keys of the kwargs sections: absl's locked config would refuse them.
    kwargs = [a for a in argv if a.startswith(tuple(
        f"--config.{s}." for s in config_lib.KWARGS_SECTIONS))]
    if not any(a.startswith("--config=") for a in argv):
        # Overrides of the config a workdir saved (--mode=eval/sample).
        for arg in [a for a in argv if a.startswith("--config.")]:
            key, _, value = arg[len("--config."):].partition("=")
            _workdir_overrides.append((key, value))
            argv.remove(arg)
        kwargs = []
    for arg in kwargs:
        argv.remove(arg)
    saved_argv, sys.argv = sys.argv, argv  # config_flags reads sys.argv itself
    try:
        rest = FLAGS(argv)
        spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")),
                    None)
        if spec and not os.path.isfile(spec.partition(":")[0]):
            raise errors.UserError(f"Config file {spec.partition(':')[0]!r} does "
                                   "not exist.")
        _ = FLAGS.config  # loads the file: errors surface here, not mid-run
        for arg in kwargs:
            key, _, value = arg[len("--config."):].partition("=")
            config_lib.override_from_text(FLAGS.config, key, value)
    except flags.Error as e:
        print(f"error: {_flag_message(e)}", file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError) as e:  # ml_collections: an unknown field
        message = " ".join(str(e).strip("'\"").replace("\\n", " ").replace(
            "\\'", "'").replace('\\"', '"').split())
        print(f"error: unknown config field: {message}", file=sys.stderr)
        sys.exit(2)
    except errors.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # pylint: disable=broad-except  (config files)
        print(f"error: bad --config: {_first_line(e)}", file=sys.stderr)
        sys.exit(2)
    finally:
        sys.argv = saved_argv
    return rest


def _flag_message(error: flags.Error) -> str:
    """absl's message, with the config file's own error where it wraps one."""
    first = str(error).splitlines()[0]
    if error.__cause__ is None and error.__context__ is None:
        return first
    return f"{first.rstrip(':')}: {_first_line(error)}"


def _first_line(error: BaseException) -> str:
    """The innermost non-empty message of an exception chain, on one line."""
    messages = []
    while error is not None:
        text = str(error).replace("\\n", " ").strip()
        if text:
            messages.append(text.splitlines()[0])
        error = error.__cause__ or error.__context__
    return messages[-1] if messages else "unknown error"


