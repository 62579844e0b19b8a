"""`train_and_evaluate(config, workdir)`: a run from its config, resumed from
its workdir; the loop itself is `core/trainer.py`."""
import contextlib
from typing import Any

from absl import logging
import ml_collections

from research import assembly
from research import evaluate
from research.core import trainer as trainer_lib
from research.core import workdir as workdir_lib

Interrupted = trainer_lib.Interrupted
NonFiniteLossError = trainer_lib.NonFiniteLossError


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after_step: int | None = None,
                       allow_config_change: bool = False) -> dict[str, Any]:
    """Trains `config` in `workdir`, resuming from its latest checkpoint.

    Args:
      config: the experiment config (see configs/).
      workdir: where config.json, metrics, TensorBoard events and checkpoints go.
      stop_after_step: save and return at this step even if the run is not
        finished (time-boxed jobs; the resume tests).
      allow_config_change: resume even if the config changes the experiment
        (see `workdir.check_resume`).

    Returns:
      The last evaluation's metrics ("eval/loss", "eval/accuracy", ...) and
      "step".

    Raises:
      UserError: bad config, data or workdir, another run holding the workdir,
        or a config that differs from the run being resumed (before any
        compute).
      NonFiniteLossError: the loss became NaN/inf; the last checkpoint is kept.
      Interrupted: SIGINT/SIGTERM arrived; the current step was saved.
    """
    assembly.validate(config)
    workdir_lib.prepare(workdir)
    with contextlib.ExitStack() as stack:
        stack.enter_context(workdir_lib.Lock(workdir))
        history = workdir_lib.check_resume(workdir, config, allow_config_change)
        exp = assembly.build(config)
        run_dir = trainer_lib.RunDir(workdir, config, history)
        stack.callback(run_dir.close)
        trainer = trainer_lib.Trainer(exp, run_dir)  # reads and checks the data
        run_dir.open()
        if not trainer.restore() and config.init_from:
            restored = assembly.restore_variables(config, config.init_from,
                                                  mesh=exp.mesh)
            trainer.start_from(restored.variables)
            logging.info("Starting from the model of %s, step %d.",
                         config.init_from, restored.step)
        run_dir.open_writer(trainer.step)
        return trainer.run(stop_after_step, on_trained=_write_plots)


def _write_plots(trainer: trainer_lib.Trainer) -> None:
    """Curves and confusion matrix into `<workdir>/plots/`; a plot that fails
    is a warning, never a failed run."""
    try:
        evaluate.write_plots(trainer.exp, trainer.state.eval_variables,
                             trainer.data.evaluation.data, trainer.out.path)
    except (ValueError, OSError) as e:
        logging.warning("Could not write the plots of %s: %s", trainer.out.path, e)
