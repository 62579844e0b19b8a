"""`train_and_evaluate(config, workdir)`: the training loop, nothing else.

Data lives on the device, or streams from disk for splits larger than memory
(`streaming.py`, `config.input`); each jitted call runs up to
`config.steps_per_call` steps and stops exactly at the boundaries where a
periodic action is due (`loop.py`): logging, evaluation at epoch ends,
checkpoints. The Python loop costs nothing per step, even at batch 4.
"""
import contextlib
import math
import signal
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from research import checkpointing
from research import config_lib
from research import diloco
from research import errors
from research import evaluate
from research import experiment
from research import input_pipeline
from research import loop
from research import optimizers
from research import parallel
from research import sharded_data
from research import state as state_lib
from research import streaming
from research import workdir as workdir_lib
from research import writers

PyTree = Any
AUGMENT_STREAM = 0x61756720  # the augmentation key: fold_in(root, this)


class Interrupted(Exception):
    """Raised after SIGINT/SIGTERM once the current step is checkpointed."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"Stopped by {signal.Signals(signum).name} at step {step}; "
                         "the checkpoint is saved. Rerun the same command to resume.")
        self.signum = signum
        self.step = step


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after_step: int | None = None,
                       allow_config_change: bool = False) -> dict[str, float]:
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
    config_lib.validate(config)
    workdir_lib.prepare(workdir)
    with contextlib.ExitStack() as stack:
        stack.enter_context(workdir_lib.Lock(workdir))
        history = workdir_lib.check_resume(workdir, config, allow_config_change)
        trainer = Trainer(experiment.build(config), workdir, history)
        trainer.manager = checkpointing.create_manager(workdir, config.keep_checkpoints)
        # Every exit path keeps pending saves.
        stack.callback(trainer.manager.close)
        stack.callback(trainer.manager.wait_until_finished)
        trainer.restore()
        trainer.writer = writers.create_writer(workdir, resume_step=trainer.step)
        stack.callback(trainer.writer.close)
        return trainer.run(stop_after_step)


class Trainer:
    """One run's data, state and loop; methods are the loop's steps."""

    def __init__(self, exp: experiment.Experiment, workdir: str,
                 history: list[dict[str, Any]]):
        config, mesh = exp.config, exp.mesh
        self.exp, self.config, self.workdir = exp, config, workdir
        self.history, self.config_saved = history, False
        self.manager = self.writer = None  # set by train_and_evaluate
        self.input = streaming.choose(config, exp.dataset, config.train_split)
        self.stream = None  # the TrainStream of a streamed run, while it runs
        if self.input == "stream":
            self.source = streaming.open_source(config, exp.dataset,
                                                config.train_split)
            num_train = self.source.num_examples
        else:
            train_rows = exp.dataset.train_rows(config, exp.info)
            num_train = sum(train_rows.counts)
        self.num_train = num_train
        if config.batch_size > num_train:
            raise errors.UserError(
                f"config.batch_size={config.batch_size} is larger than the "
                f"{num_train} examples of split {config.train_split!r}; lower it.")
        self.steps_per_epoch = num_train // config.batch_size
        # num_epochs may be fractional (airbench trains 9.9 epochs).
        self.total_steps = int(round(self.steps_per_epoch * config.num_epochs))
        config_lib.check_schedule(config, self.total_steps)
        if self.input == "memory":
            rows, row_of = sharded_data.place_rows(train_rows, mesh)
            self.data = {"rows": rows, "row_of": row_of}
        else:
            self.data = self.init_rows() if hasattr(exp.model, "init_from_data") else None
            logging.info("Training streams %s: %d examples; process %d reads rows "
                         "[%d, %d) of every batch.", self.source.description,
                         num_train, jax.process_index(),
                         *streaming.process_rows(mesh, config.batch_size))
        self.evaluation = exp.evaluation()
        self.aux = exp.aux()
        init_key, dropout_key, self.data_key, augment_key = jax.jit(
            _run_keys, static_argnums=0,
            out_shardings=parallel.replicated(mesh))(config.seed)
        self.keys = {"dropout": dropout_key, "augment": augment_key}
        self.state = exp.create_state(init_key, self.total_steps, self.steps_per_epoch,
                                      self.data)
        self.lr_fn = optimizers.create_learning_rate_fn(config, self.total_steps)
        self.empty = lambda: parallel.put_replicated(
            exp.objective.metrics_cls.empty(), mesh)
        self.totals = {"epoch": self.empty(), "log": self.empty()}
        self.step, self.last_saved, self.result = 0, None, {}
        logging.info(
            "Model %s: %d parameters; %d steps (%d epochs of %d) at batch %d on %d "
            "devices (%d processes): %s", config.model,
            state_lib.count_params(self.state.params), self.total_steps,
            config.num_epochs, self.steps_per_epoch, config.batch_size, mesh.size,
            jax.process_count(), mesh.devices.tolist())

    def init_rows(self) -> dict[str, jax.Array]:
        """Streaming: the first examples placed as in memory, for models that
        initialise from data (`Experiment.create_state`)."""
        n = min(experiment.DATA_INIT_EXAMPLES, self.num_train)
        bounds = input_pipeline.even_bounds(n, jax.process_count())
        mine = np.arange(bounds[jax.process_index()], bounds[jax.process_index() + 1])
        rows, row_of = sharded_data.place_rows(input_pipeline.Shard(
            self.source.read(mine), tuple(int(c) for c in np.diff(bounds))),
            self.exp.mesh)
        return {"rows": rows, "row_of": row_of}

    def restore(self) -> None:
        """Continues from the newest readable checkpoint, if any."""
        # Restored with the live state's shardings (DiLoCo splits replicas).
        restored = checkpointing.restore_latest(self.manager, jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            state_lib.checkpoint_items(self.state, self.totals)))
        if restored is None:
            if self.config.init_from:
                self.init_from(self.config.init_from)
            return
        self.state, self.totals = state_lib.restore_items(self.state, restored)
        self.step = self.last_saved = int(self.state.step)
        logging.info("Resuming at step %d of %d.", self.step, self.total_steps)

    def init_from(self, workdir: str) -> None:
        """Starts from another run's model variables (fine-tuning); the
        optimizer and the extras start afresh."""
        restored = experiment.restore_variables(self.config, workdir,
                                                mesh=self.exp.mesh)
        self.state = self.exp.restart_state(self.state, restored.variables)
        logging.info("Starting from the model of %s, step %d.", workdir,
                     restored.step)

    def run(self, stop_after_step: int | None) -> dict[str, Any]:
        """Trains to the end (or `stop_after_step`); returns the last metrics."""
        if self.step == 0:
            self.writer.write_hparams(dict(_flatten(self.config.to_dict())))
        self.compile()
        if self.step >= self.total_steps:
            workdir_lib.record_changes(self.config, self.workdir, self.history)
            self.result = self.evaluate()
            writers.report(f"already trained to step {self.step}: "
                           f"{writers.describe(self.result, self.config.eval_split)}")
            return {**self.result, "step": self.step}
        stop = min(self.total_steps, stop_after_step or self.total_steps)
        epoch_ends = frozenset(range(self.steps_per_epoch, self.total_steps + 1,
                                     self.steps_per_epoch)) | {self.total_steps}
        actions = [
            loop.Periodic(self.log_progress, self.config.log_every_steps,
                          epoch_ends | {stop}),
            loop.Periodic(self.evaluate_epoch, 0, epoch_ends),
            loop.Periodic(self.save, self.config.checkpoint_every_steps,
                          epoch_ends | {stop})]
        with contextlib.ExitStack() as stack:
            if self.input == "stream":
                # The chunks the loop will run are known ahead (its boundaries
                # are), so the stream assembles and places them ahead.
                self.stream = streaming.TrainStream(
                    self.source, self.host_order, batch_size=self.config.batch_size,
                    steps_per_epoch=self.steps_per_epoch, mesh=self.exp.mesh,
                    start=self.step, stop=stop, options=self.config.stream,
                    chunk_size=lambda step: self.chunk_size(
                        step, loop.next_boundary(step, stop, actions)))
                stack.callback(self.stream.close)
            preemption = stack.enter_context(loop.Preemption())
            while self.step < stop:
                target = loop.next_boundary(self.step, stop, actions)
                if not self.advance(target, preemption):
                    self.fold()
                    self.save(self.step)
                    raise Interrupted(preemption.signum, self.step)
                self.fold()
                loop.run_due(self.step, actions)
        self.manager.wait_until_finished()  # on disk before it is reported
        writers.report(f"trained to step {self.step} in "
                       f"{time.perf_counter() - self.clock['start']:.1f}s; checkpoint "
                       f"{self.workdir}/checkpoints/{self.step}")
        self.plot()
        return {**self.result, "step": self.step}

    def plot(self) -> None:
        """Curves and confusion matrix into `<workdir>/plots/`; a plot that
        fails is a warning, never a failed run."""
        try:
            evaluate.write_plots(self.exp, self.state.eval_variables,
                                 self.evaluation.data, self.workdir)
        except (ValueError, OSError) as e:
            logging.warning("Could not write the plots of %s: %s", self.workdir, e)

    def compile(self) -> None:
        """Compiles the train chunks (`steps_per_call` steps, and 1 for the
        steps left before a boundary) and the evaluation, ahead of time."""
        start = time.perf_counter()
        if self.input == "memory":
            # An epoch's order of example numbers: a permutation drawn from the
            # seed and the epoch, the same for any device or process count.
            # Drawn outside the mesh context, as in `advance`: one trace.
            num_examples = self.data["row_of"].shape[0]
            self.order_fn = jax.jit(
                lambda key, epoch: jax.random.permutation(
                    jax.random.fold_in(key, epoch), num_examples),
                out_shardings=parallel.replicated(self.exp.mesh))
            self.order_epoch = self.step // self.steps_per_epoch
            self.order = self.order_fn(self.data_key, self.order_epoch)
        else:
            # The same permutation, drawn for the host (`streaming.py`).
            self.host_order = streaming.host_order_fn(
                self.data_key, self.num_train, self.exp.mesh)
        self.window, self.bad_step = self.empty(), parallel.put_replicated(
            np.int32(-1), self.exp.mesh)
        self.chunks = {}
        with jax.set_mesh(self.exp.mesh):  # models may shard kernels over it
            for n in {self.config.steps_per_call, 1}:
                self.chunks[n] = (self.compile_memory(n) if self.input == "memory"
                                  else self.compile_stream(n))
            self.evaluation.compile(self.state.eval_variables, self.aux)
            self.evaluation.compile(self.state.eval_variables, self.aux, final=True)
        logging.info("Compiled the train and eval functions in %.2fs.",
                     time.perf_counter() - start)
        self.clock = {"log": (time.perf_counter(), self.step),
                      "epoch": time.perf_counter(), "start": start}

    def compile_memory(self, n: int):
        """The in-memory path's chunk of n steps (rows on the devices)."""
        return self.exp.train_chunk(n).lower(
            self.state, self.window, self.bad_step, self.data, self.order,
            self.keys, self.aux).compile()

    def compile_stream(self, n: int):
        """The streaming path's chunk of n steps (batches as an argument)."""
        batches = streaming.batch_spec(
            self.source.features, self.config.batch_size, self.exp.mesh, n,
            extra={"index": ((), np.dtype(np.int32))})
        return self.exp.stream_chunk(self.steps_per_epoch).lower(
            self.state, self.window, self.bad_step, batches, self.keys,
            self.aux).compile()

    def chunk_size(self, step: int, target: int) -> int:
        """Steps in the call that starts at `step` on the way to `target`."""
        n = self.config.steps_per_call
        return n if target - step >= n else 1

    def advance(self, target: int, preemption: loop.Preemption) -> bool:
        """Runs chunks up to step `target` (never past an epoch's end); False
        if a stop was requested first."""
        epoch = self.step // self.steps_per_epoch
        if self.input == "memory" and epoch != self.order_epoch:
            self.order, self.order_epoch = self.order_fn(self.data_key, epoch), epoch
        while self.step < target:
            if preemption.requested():
                return False
            n = self.chunk_size(self.step, target)
            if self.input == "memory":
                self.state, self.window, self.bad_step = self.chunks[n](
                    self.state, self.window, self.bad_step, self.data, self.order,
                    self.keys, self.aux)
            else:
                self.state, self.window, self.bad_step = self.chunks[n](
                    self.state, self.window, self.bad_step,
                    self.stream.next(self.step, n), self.keys, self.aux)
            self.step += n
        return True

    def fold(self) -> None:
        """Merges the steps since the last boundary into the running metrics;
        stops on a non-finite loss."""
        bad_step = int(self.bad_step)
        if bad_step >= 0:
            kept = (f"the last checkpoint, step {self.last_saved}, is kept in "
                    f"{self.workdir}/checkpoints" if self.last_saved is not None
                    else "no checkpoint had been saved yet")
            raise NonFiniteLossError(
                f"Non-finite training loss at step {bad_step}; {kept}. Lower "
                "config.learning_rate or check the inputs.")
        self.totals = {k: v.merge(self.window) for k, v in self.totals.items()}
        self.window = self.empty()

    def log_progress(self, step: int) -> None:
        """Train metrics of the window since the last log, speed and ETA."""
        start, start_step = self.clock["log"]
        now = time.perf_counter()
        steps_per_sec = (step - start_step) / max(now - start, 1e-9)
        unit, per_example = self.exp.dataset.throughput_unit(self.config)
        metrics = {f"train/{k}": float(v)
                   for k, v in self.totals["log"].compute().items()}
        metrics["train/learning_rate"] = float(self.lr_fn(step - 1))
        metrics.update(state_lib.state_metrics(self.state))
        metrics.update(diloco.communication(self.state, step, self.exp.mesh.size,
                                            self.total_steps))
        self.writer.write_scalars(step, {
            **metrics, "perf/steps_per_sec": steps_per_sec,
            f"perf/{unit}_per_sec": steps_per_sec * self.config.batch_size
            * per_example})
        logging.info("step %d/%d: train loss %.4f, lr %.3g, %.1f steps/s, ETA %s",
                     step, self.total_steps, metrics["train/loss"],
                     metrics["train/learning_rate"], steps_per_sec,
                     _hms((self.total_steps - step) / max(steps_per_sec, 1e-9)))
        self.totals["log"] = self.empty()
        self.clock["log"] = (time.perf_counter(), step)

    def evaluate(self) -> dict[str, float]:
        """The eval split's metrics (the last evaluation of a run may use a
        costlier test-time augmentation: `augment.final_eval_views`)."""
        metrics = self.evaluation(self.state.eval_variables, self.aux,
                                  final=self.step >= self.total_steps)
        return {f"eval/{k}": float(v) for k, v in metrics.compute().items()}

    def evaluate_epoch(self, step: int) -> None:
        """Scores the eval split; logs the epoch's train loss beside it."""
        epoch = step / self.steps_per_epoch
        epoch = int(epoch) if epoch == int(epoch) else round(epoch, 2)
        if self.stream is not None:  # what this process read: its share only
            count = self.stream.epoch_count(math.ceil(epoch))
            logging.info("process %d of %d read %d records of %s for epoch %d "
                         "(example numbers sum to %d)", jax.process_index(),
                         jax.process_count(), count.reads, self.source.description,
                         math.ceil(epoch), count.index_sum)
        train_loss = float(self.totals["epoch"].compute()["loss"])
        self.result = self.evaluate()
        self.writer.write_scalars(step, {"epoch": epoch, "epoch/train_loss":
                                         train_loss, **self.result})
        writers.report(f"epoch {epoch}/{self.config.num_epochs}: train loss "
                       f"{train_loss:.4f}, "
                       f"{writers.describe(self.result, self.config.eval_split)}, "
                       f"{time.perf_counter() - self.clock['epoch']:.1f}s")
        self.totals["epoch"] = self.empty()
        self.clock["epoch"] = time.perf_counter()

    def save(self, step: int) -> None:
        """Checkpoints `step`. The run's first save completes before config.json
        is written: a workdir with config.json holds a restorable run."""
        if self.last_saved == step:
            return
        checkpointing.save(self.manager, step, state_lib.checkpoint_items(
            self.state, self.totals), self.config, self.exp.info)
        self.last_saved = step
        if not self.config_saved:
            self.manager.wait_until_finished()
            workdir_lib.save_config(self.config, self.workdir, self.history)
            self.config_saved = True


def _run_keys(seed: int) -> tuple[jax.Array, ...]:
    """The run's init, dropout, data-order and augmentation keys."""
    root = jax.random.key(seed)
    return (*jax.random.split(root, 3), jax.random.fold_in(root, AUGMENT_STREAM))


def _flatten(tree: dict[str, Any]):
    """Hyperparameters for TensorBoard: dotted keys, scalars or strings."""
    for key, value in config_lib.dotted_items(tree):
        yield key, value if isinstance(value, (int, float, str, bool)) else str(value)


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
