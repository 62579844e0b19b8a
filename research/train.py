"""`train_and_evaluate(config, workdir)`: the training loop, nothing else.

Data lives on the device; each jitted call runs up to `config.steps_per_call`
steps (`steps.train_steps`) and stops exactly at log, checkpoint and epoch
boundaries, so the Python loop costs nothing per step at batch 4.
"""
import functools
import os
import signal
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from research import checkpointing
from research import config_lib
from research import errors
from research import input_pipeline
from research import kernels
from research import models
from research import parallel
from research import sharded_data
from research import state as state_lib
from research import steps
from research import tasks
from research import writers


class Interrupted(Exception):
    """Raised after SIGINT/SIGTERM once the current step is checkpointed."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"Stopped by {signal.Signals(signum).name} at step {step}; "
                         "the checkpoint is saved. Rerun the same command to resume.")
        self.signum = signum
        self.step = step


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def prepare_workdir(workdir: str) -> None:
    """Creates `workdir` and checks it is writable, before any compute."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test.{os.getpid()}")  # per process
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise errors.UserError(
            f"Workdir {workdir!r} is not writable ({e.strerror}); pass a --workdir "
            "you can write to.") from None


class _SignalCatcher:
    """Turns SIGINT/SIGTERM into a flag the loop checks between calls."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        del frame
        if self.signum is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        logging.warning("Got %s: saving a checkpoint after the current steps.",
                        signal.Signals(signum).name)
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def create_state(config: ml_collections.ConfigDict, model: Any, dataset: Any,
                 mesh: jax.sharding.Mesh, rng: jax.Array, total_steps: int
                 ) -> state_lib.TrainState:
    """The initial train state, created replicated on every device of `mesh`."""
    return jax.jit(functools.partial(
        state_lib.create_train_state, config=config, model=model,
        input_shape=(1,) + dataset.input_shape(config),
        input_dtype=dataset.input_dtype, total_steps=total_steps),
        out_shardings=parallel.replicated(mesh))(rng)


def jit_train_chunk(config: ml_collections.ConfigDict, dataset: Any, task: Any,
                    mesh: jax.sharding.Mesh, num_steps: int, batch_size: int):
    """`steps.train_steps` jitted as the trainer runs it: state and metrics
    donated, batches split over `mesh`, outputs replicated."""
    return jax.jit(functools.partial(
        steps.train_steps, num_steps=num_steps, task=task, batch_size=batch_size,
        preprocess_fn=dataset.preprocess,
        gather_fn=functools.partial(sharded_data.gather_rows, mesh=mesh),
        grad_accum_steps=config.grad_accum_steps,
        batch_sharding=parallel.batch_sharded(mesh)),
        out_shardings=parallel.replicated(mesh), donate_argnums=(0, 1, 2))


def fresh_totals(task: Any, mesh: jax.sharding.Mesh) -> tuple[Any, jax.Array]:
    """Empty metrics and 'no bad step' (-1), replicated; new arrays every call
    because the chunks donate them."""
    return (parallel.put_replicated(task.metrics_cls.empty(), mesh),
            parallel.put_replicated(np.int32(-1), mesh))


def _next_boundary(step: int, every: int) -> int:
    return (step // every + 1) * every


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after_step: int | None = None) -> dict[str, float]:
    """Trains `config` in `workdir`, resuming from its latest checkpoint.

    Args:
      config: the experiment config (see configs/).
      workdir: where config.json, metrics, TensorBoard events and checkpoints go.
      stop_after_step: save and return at this step even if the run is not
        finished (time-boxed jobs; the resume tests).

    Returns:
      The last evaluation's metrics ("eval/loss", "eval/accuracy") and "step".

    Raises:
      UserError: bad config, data or workdir (before any compute).
      NonFiniteLossError: the loss became NaN/inf; the last checkpoint is kept.
      Interrupted: SIGINT/SIGTERM arrived; the current step was saved.
    """
    config_lib.validate(config)
    prepare_workdir(workdir)
    dataset = input_pipeline.get_dataset(config.dataset)
    task = tasks.get_task(dataset.task)
    model = models.create_model(config.model, **config.model_kwargs)
    mesh = parallel.create_mesh(config.num_devices)
    parallel.check_divisible("batch_size", config.batch_size, mesh,
                             config.grad_accum_steps)
    parallel.check_divisible("eval_batch_size", config.eval_batch_size, mesh)
    # Each process reads its share of the splits; see README, "Scaling out".
    train_rows, eval_rows = dataset.train_rows(config), dataset.eval_rows(config)
    num_train = sum(train_rows.counts)
    if config.batch_size > num_train:
        raise errors.UserError(
            f"config.batch_size={config.batch_size} is larger than the "
            f"{num_train} examples of split {config.train_split!r}; lower it.")
    steps_per_epoch = num_train // config.batch_size
    total_steps = steps_per_epoch * config.num_epochs

    init_key, dropout_key, data_key = jax.jit(
        lambda: jax.random.split(jax.random.key(config.seed), 3),
        out_shardings=parallel.replicated(mesh))()
    state = create_state(config, model, dataset, mesh, init_key, total_steps)
    epoch_totals = parallel.put_replicated(task.metrics_cls.empty(), mesh)
    logging.info("Model %s: %d parameters; %d steps (%d epochs of %d) at batch %d "
                 "on %d devices (%d processes): %s", config.model,
                 state_lib.count_params(state.params), total_steps, config.num_epochs,
                 steps_per_epoch, config.batch_size, mesh.size, jax.process_count(),
                 mesh.devices.tolist())

    for field in ("conv_impl", "lstm_impl"):
        if field in config.model_kwargs:
            logging.info("%s: %s (%r).", field, kernels.resolve(
                config.model_kwargs[field], field), config.model_kwargs[field])
    manager = checkpointing.create_manager(workdir, config.keep_checkpoints)
    writer = writers.create_writer(workdir)
    try:
        return _train_loop(config, workdir, manager, writer, mesh, state,
                           epoch_totals, dataset, task, train_rows, eval_rows,
                           dropout_key, data_key, steps_per_epoch, total_steps,
                           stop_after_step)
    finally:
        manager.wait_until_finished()  # every exit path keeps pending saves
        manager.close()
        writer.close()


def _train_loop(config, workdir, manager, writer, mesh, state, epoch_totals, dataset,
                task, train_rows, eval_rows, dropout_key, data_key, steps_per_epoch,
                total_steps, stop_after_step) -> dict[str, Any]:
    sharding = parallel.replicated(mesh)
    model_tree = state.variables
    train_tree = {"step": state.step, "opt_state": state.opt_state,
                  "epoch_metrics": epoch_totals}
    restored = checkpointing.restore_latest(
        manager,
        checkpointing.with_sharding(jax.eval_shape(lambda: model_tree), sharding),
        checkpointing.with_sharding(jax.eval_shape(lambda: train_tree), sharding))
    if restored is not None:
        variables, train_tree = restored
        state = state.replace(params=variables["params"],
                              batch_stats=variables.get("batch_stats", {}),
                              step=train_tree["step"],
                              opt_state=train_tree["opt_state"])
        epoch_totals = train_tree["epoch_metrics"]
        logging.info("Resuming at step %d of %d.", int(state.step), total_steps)
    if jax.process_index() == 0:
        config_lib.save_config(config, workdir)
    dataset_info = dataset.info(config)

    if restored is None:
        writer.write_hparams(dict(_flatten(config.to_dict())))

    # Each device holds its process's rows; batches are gathered on device.
    train_dev, row_of = sharded_data.place_rows(train_rows, mesh)
    eval_dev = sharded_data.place_eval(eval_rows, config.eval_batch_size, mesh)
    batch_sharding = parallel.batch_sharded(mesh)
    perm_fn = jax.jit(lambda epoch: row_of[jax.random.permutation(
        jax.random.fold_in(data_key, epoch), row_of.shape[0])],
        out_shardings=sharding)
    eval_fn = jax.jit(functools.partial(
        steps.evaluate_batches, state.apply_fn, task=task,
        preprocess_fn=dataset.preprocess, batch_sharding=batch_sharding),
        out_shardings=sharding)

    start = time.perf_counter()
    perm, perm_epoch = perm_fn(0), 0

    def empty():
        return fresh_totals(task, mesh)[0]

    # One compiled function per chunk length: steps_per_call, and 1 for the
    # steps left before a boundary that is not a multiple of it.
    chunk_fns = {}
    with jax.set_mesh(mesh):  # models may shard custom kernels over it
        for num_steps in {config.steps_per_call, 1}:
            chunk_fns[num_steps] = jit_train_chunk(
                config, dataset, task, mesh, num_steps, config.batch_size).lower(
                    state, *fresh_totals(task, mesh), train_dev, perm,
                    dropout_key).compile()
        eval_fn = eval_fn.lower(state.variables, eval_dev).compile()
    logging.info("Compiled the train and eval functions in %.2fs.",
                 time.perf_counter() - start)

    def evaluate() -> dict[str, float]:
        return {f"eval/{k}": float(v)
                for k, v in eval_fn(state.variables, eval_dev).compute().items()}

    step = int(state.step)
    result = {}
    if step >= total_steps:
        logging.info("Already trained to step %d; evaluating only.", step)
        result = evaluate()
        writer.write_scalars(step, result)
        return {**result, "step": step}

    # `window` (on device, merged inside the chunks) holds the steps since the
    # last boundary; it is folded into the log window and the epoch totals.
    (window, bad_step), log_totals = fresh_totals(task, mesh), empty()
    log_start, log_step = time.perf_counter(), step
    epoch_start = time.perf_counter()
    last_saved = step
    stop_at = min(total_steps, stop_after_step or total_steps)
    with _SignalCatcher() as signals:
        while step < stop_at and signals.signum is None:
            epoch = step // steps_per_epoch
            if epoch != perm_epoch:
                perm, perm_epoch = perm_fn(epoch), epoch
            epoch_end = (epoch + 1) * steps_per_epoch
            next_step = min(epoch_end, stop_at,
                            _next_boundary(step, config.log_every_steps),
                            _next_boundary(step, config.checkpoint_every_steps))
            while step < next_step and signals.signum is None:
                n = config.steps_per_call if next_step - step >= config.steps_per_call \
                    else 1
                state, window, bad_step = chunk_fns[n](
                    state, window, bad_step, train_dev, perm, dropout_key)
                step += n
            if int(bad_step) >= 0:
                raise NonFiniteLossError(
                    f"Non-finite training loss at step {int(bad_step)}. The last "
                    f"good checkpoint, step {last_saved}, is kept in "
                    f"{workdir}/checkpoints. Lower config.learning_rate or check "
                    "the inputs.")
            epoch_totals = epoch_totals.merge(window)
            log_totals = log_totals.merge(window)
            window = empty()

            if step > log_step and (step % config.log_every_steps == 0
                                    or step in (epoch_end, stop_at)):
                now = time.perf_counter()
                steps_per_sec = (step - log_step) / (now - log_start)
                train_metrics = {f"train/{k}": float(v)
                                 for k, v in log_totals.compute().items()}
                unit, per_example = dataset.throughput_unit(config)
                items_per_sec = steps_per_sec * config.batch_size * per_example
                writer.write_scalars(step, {
                    **train_metrics, "perf/steps_per_sec": steps_per_sec,
                    f"perf/{unit}_per_sec": items_per_sec})
                logging.info(
                    "step %d/%d epoch %d: train loss %.4f, %.1f steps/s, %.0f "
                    "%s/s, ETA %s", step, total_steps, epoch + 1,
                    train_metrics["train/loss"], steps_per_sec, items_per_sec, unit,
                    _hms((total_steps - step) / steps_per_sec))
                log_totals = empty()
                log_start, log_step = time.perf_counter(), step

            if step == epoch_end:
                train_loss = float(epoch_totals.compute()["loss"])
                result = evaluate()
                seconds = time.perf_counter() - epoch_start
                writer.write_scalars(step, {"epoch": epoch + 1,
                                            "epoch/train_loss": train_loss, **result})
                logging.info("epoch %d/%d: train loss %.4f, %s, %.1fs", epoch + 1,
                             config.num_epochs, train_loss,
                             describe(result, config.eval_split), seconds)
                epoch_totals = empty()
                epoch_start = time.perf_counter()

            if step != last_saved and (
                    step % config.checkpoint_every_steps == 0 or step == epoch_end
                    or step == stop_at or signals.signum is not None):
                checkpointing.save(
                    manager, step, state.variables,
                    {"step": state.step, "opt_state": state.opt_state,
                     "epoch_metrics": epoch_totals}, config, dataset_info)
                last_saved = step
        if signals.signum is not None and step < stop_at:  # saved by now
            raise Interrupted(signals.signum, step)
    return {**result, "step": step}


def _flatten(tree: dict[str, Any], prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            scalar = isinstance(value, (int, float, str, bool))
            yield f"{prefix}{key}", value if scalar else str(value)


def describe(eval_metrics: dict[str, float], split: str = "test") -> str:
    """'test loss 1.2345, test accuracy 0.5678' for the log."""
    return ", ".join(f"{split} {k.split('/')[-1]} {v:.4f}"
                     for k, v in eval_metrics.items())


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
