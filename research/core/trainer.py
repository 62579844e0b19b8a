"""The training loop, nothing else: `Trainer(exp, run_dir).run()`.

Each jitted call runs up to `config.steps_per_call` steps and stops exactly
at the boundaries where a periodic action is due (`loop.py`): logging,
evaluation at epoch ends, checkpoints. The Python loop costs nothing per
step, even at batch 4. Where the batches come from (`core/inputs.py`) and
how a step runs over the mesh (`core/schemes.py`) are the experiment's
plug-ins; the trainer never asks which ones it has.
"""
import contextlib
import signal
import time
from typing import Any, Callable, NamedTuple

from absl import logging
import jax
import ml_collections

from research import errors
from research.core import checkpointing
from research.core import config_lib
from research.core import experiment as experiment_lib
from research.core import inputs as inputs_lib
from research.core import loop
from research.core import memory
from research.core import optimizers
from research.core import state as state_lib
from research.core import workdir as workdir_lib
from research.core import writers
from research import mesh as mesh_lib

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


class RunDir:
    """Where a run keeps what it makes: checkpoints (`manager`), metrics
    (`writer`) and config.json, written once the first checkpoint is on disk
    (a workdir with config.json holds a restorable run)."""

    def __init__(self, workdir: str, config: ml_collections.ConfigDict,
                 history: list[dict[str, Any]]):
        self.path, self.config, self.history = workdir, config, history
        self.manager = self.writer = None  # `open`: once the run's data is checked
        self.last_saved = None
        self.config_saved = False

    def open(self) -> None:
        """The checkpoint manager (it creates `checkpoints/`)."""
        self.manager = checkpointing.create_manager(self.path,
                                                    self.config.keep_checkpoints)

    def open_writer(self, step: int) -> None:
        self.writer = writers.create_writer(self.path, resume_step=step)

    def save(self, step: int, items: PyTree, info: dict[str, Any]) -> None:
        if self.last_saved == step:
            return
        checkpointing.save(self.manager, step, items, self.config, info)
        self.last_saved = step
        if not self.config_saved:
            self.manager.wait_until_finished()
            workdir_lib.save_config(self.config, self.path, self.history)
            self.config_saved = True

    def close(self) -> None:
        """Keeps pending saves, whatever the exit path."""
        try:
            if self.manager is not None:
                self.manager.wait_until_finished()
        finally:
            if self.manager is not None:
                self.manager.close()
            if self.writer is not None:
                self.writer.close()


class Length(NamedTuple):
    """A run's length in steps."""
    steps_per_epoch: int
    total_steps: int

    def epoch_ends(self) -> frozenset[int]:
        ends = range(self.steps_per_epoch, self.total_steps + 1, self.steps_per_epoch)
        return frozenset(ends) | {self.total_steps}


class Data(NamedTuple):
    """The run's training split (an input path's) and its evaluation."""
    train: inputs_lib.TrainInput
    evaluation: experiment_lib.Evaluation


class Trainer:
    """One run's data, state and loop; the methods are the loop's steps."""

    def __init__(self, exp: experiment_lib.Experiment, run_dir: RunDir):
        config = exp.config
        self.exp, self.out = exp, run_dir
        source = exp.train_input()
        if config.batch_size > source.num_examples:
            raise errors.UserError(
                f"config.batch_size={config.batch_size} is larger than the "
                f"{source.num_examples} examples of split {config.train_split!r}; "
                "lower it.")
        # num_epochs may be fractional (airbench trains 9.9 epochs).
        self.length = Length(source.steps_per_epoch, int(round(
            source.steps_per_epoch * config.num_epochs)))
        optimizers.check_schedule(config, self.length.total_steps)
        self.data = Data(source, exp.evaluation())
        self.aux = exp.aux()
        init_key, dropout, data_key, augment = jax.jit(
            _run_keys, static_argnums=0,
            out_shardings=mesh_lib.replicated(exp.mesh))(config.seed)
        self.keys = {"dropout": dropout, "augment": augment, "data": data_key}
        self.carry = exp.carry(exp.create_state(
            init_key, self.length.total_steps, self.length.steps_per_epoch, source))
        self.totals = {"epoch": exp.empty_metrics(), "log": exp.empty_metrics()}
        self.step, self.result, self.chunks, self.clock = 0, {}, {}, {}
        logging.info(
            "Model %s: %d parameters; %d steps (%d epochs of %d) at batch %d on %d "
            "devices (%d processes): %s", config.model,
            state_lib.count_params(self.state.params), self.length.total_steps,
            config.num_epochs, self.length.steps_per_epoch, config.batch_size,
            exp.mesh.size, jax.process_count(), exp.mesh.devices.tolist())

    @property
    def state(self):
        return self.carry.state

    @property
    def step_keys(self) -> dict[str, jax.Array]:
        """The keys the steps fold their number into."""
        return {"dropout": self.keys["dropout"], "augment": self.keys["augment"]}

    def checkpoint_items(self) -> PyTree:
        return self.exp.scheme.checkpoint_items(self.state, self.totals)

    def restore(self) -> bool:
        """Continues from the newest readable checkpoint; False if none."""
        # Restored with the live state's shardings (a scheme may split them).
        restored = checkpointing.restore_latest(self.out.manager, jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            self.checkpoint_items()))
        if restored is None:
            return False
        state, self.totals = self.exp.scheme.restore_items(self.state, restored)
        self.carry = self.carry._replace(state=state)
        self.step = self.out.last_saved = int(state.step)
        logging.info("Resuming at step %d of %d.", self.step, self.length.total_steps)
        return True

    def start_from(self, variables: PyTree) -> None:
        """Starts from another run's model variables (fine-tuning); the
        optimizer and the extras start afresh."""
        self.carry = self.carry._replace(state=self.exp.restart_state(
            self.state, variables, self.length.total_steps))

    def run(self, stop_after_step: int | None = None,
            on_trained: Callable[["Trainer"], None] | None = None) -> dict[str, Any]:
        """Trains to the end (or `stop_after_step`); returns the last metrics
        and "step". `on_trained` runs once training reached the stop."""
        if self.step == 0:
            self.out.writer.write_hparams(dict(_flatten(self.exp.config.to_dict())))
        self.compile()
        if self.step >= self.length.total_steps:
            workdir_lib.record_changes(self.exp.config, self.out.path,
                                       self.out.history)
            self.result = self.evaluate()
            described = writers.describe(self.result, self.exp.config.eval_split)
            writers.report(f"already trained to step {self.step}: {described}")
            return {**self.result, "step": self.step}
        self.train(min(self.length.total_steps,
                       stop_after_step or self.length.total_steps))
        self.out.manager.wait_until_finished()  # on disk before it is reported
        writers.report(f"trained to step {self.step} in "
                       f"{time.perf_counter() - self.clock['start']:.1f}s; checkpoint "
                       f"{self.out.path}/checkpoints/{self.step}")
        if on_trained is not None:
            on_trained(self)
        return {**self.result, "step": self.step}

    def compile(self) -> None:
        """Compiles the train chunks (`steps_per_call` steps, and 1 for the
        steps left before a boundary) and the evaluation, ahead of time."""
        start = time.perf_counter()
        state = self.state.eval_variables
        with jax.set_mesh(self.exp.mesh):  # models may shard kernels over it
            for n in {self.exp.config.steps_per_call, 1}:
                source = self.data.train
                self.chunks[n] = self.exp.train_chunk(source, n, self.state).lower(
                    self.carry, source.spec(n), self.step_keys, self.aux).compile()
                memory.check_fits(self.chunks[n], self.exp.config.device_memory_mib,
                                  f"train step ({n} per call)")
            self.data.evaluation.compile(state, self.aux)
            self.data.evaluation.compile(state, self.aux, final=True)
        logging.info("Compiled the train and eval functions in %.2fs.",
                     time.perf_counter() - start)
        self.clock = {"log": (time.perf_counter(), self.step),
                      "epoch": time.perf_counter(), "start": start}

    def train(self, stop: int) -> None:
        """Runs chunks to step `stop`, doing what is due at each boundary."""
        ends = self.length.epoch_ends()
        config = self.exp.config
        actions = [loop.Periodic(self.log_progress, config.log_every_steps,
                                 ends | {stop}),
                   loop.Periodic(self.evaluate_epoch, 0, ends),
                   loop.Periodic(self.save, config.checkpoint_every_steps,
                                 ends | {stop})]
        with contextlib.ExitStack() as stack:
            self.data.train.start(
                self.keys["data"], self.step, stop, lambda step: self.chunk_size(
                    step, loop.next_boundary(step, stop, actions)))
            stack.callback(self.data.train.close)
            preemption = stack.enter_context(loop.Preemption())
            while self.step < stop:
                if not self.advance(loop.next_boundary(self.step, stop, actions),
                                    preemption):
                    self.fold()
                    self.save(self.step)
                    raise Interrupted(preemption.signum, self.step)
                self.fold()
                loop.run_due(self.step, actions)

    def chunk_size(self, step: int, target: int) -> int:
        """Steps in the call that starts at `step` on the way to `target`."""
        n = self.exp.config.steps_per_call
        return n if target - step >= n else 1

    def advance(self, target: int, preemption: loop.Preemption) -> bool:
        """Runs chunks up to step `target` (never past an epoch's end); False
        if a stop was requested first."""
        keys = self.step_keys
        while self.step < target:
            if preemption.requested():
                return False
            n = self.chunk_size(self.step, target)
            self.carry = self.chunks[n](self.carry, self.data.train.inputs(
                self.step, n), keys, self.aux)
            self.step += n
        return True

    def fold(self) -> None:
        """Merges the steps since the last boundary into the running metrics;
        stops on a non-finite loss."""
        bad_step = int(self.carry.bad_step)
        if bad_step >= 0:
            last = self.out.last_saved
            kept = (f"the last checkpoint, step {last}, is kept in "
                    f"{self.out.path}/checkpoints" if last is not None
                    else "no checkpoint had been saved yet")
            raise NonFiniteLossError(
                f"Non-finite training loss at step {bad_step}; {kept}. Lower "
                "config.learning_rate or check the inputs.")
        window = self.carry.totals
        self.totals = {k: v.merge(window) for k, v in self.totals.items()}
        self.carry = self.carry._replace(totals=self.exp.empty_metrics())

    def log_progress(self, step: int) -> None:
        """Train metrics of the window since the last log, speed and ETA."""
        exp, total = self.exp, self.length.total_steps
        start, start_step = self.clock["log"]
        steps_per_sec = (step - start_step) / max(time.perf_counter() - start, 1e-9)
        unit, per_example = exp.dataset.throughput_unit(exp.config)
        metrics = {f"train/{k}": float(v)
                   for k, v in self.totals["log"].compute().items()}
        metrics["train/learning_rate"] = float(
            optimizers.create_learning_rate_fn(exp.config, total)(step - 1))
        metrics.update(exp.state_metrics(self.state))
        metrics.update(exp.scheme.communication(self.state, step, exp.mesh.size,
                                                total))
        self.out.writer.write_scalars(step, {
            **metrics, "perf/steps_per_sec": steps_per_sec,
            f"perf/{unit}_per_sec": steps_per_sec * exp.config.batch_size
            * per_example})
        logging.info("step %d/%d: train loss %.4f, lr %.3g, %.1f steps/s, ETA %s",
                     step, total, metrics["train/loss"],
                     metrics["train/learning_rate"], steps_per_sec,
                     _hms((total - step) / max(steps_per_sec, 1e-9)))
        self.totals["log"] = exp.empty_metrics()
        self.clock["log"] = (time.perf_counter(), step)

    def evaluate(self) -> dict[str, float]:
        """The eval split's metrics (the last evaluation of a run may use a
        costlier test-time augmentation: `augment.final_eval_views`)."""
        metrics = self.data.evaluation(self.state.eval_variables, self.aux,
                                       final=self.step >= self.length.total_steps)
        return {f"eval/{k}": float(v) for k, v in metrics.compute().items()}

    def evaluate_epoch(self, step: int) -> None:
        """Scores the eval split; logs the epoch's train loss beside it."""
        config = self.exp.config
        epoch = step / self.length.steps_per_epoch
        epoch = int(epoch) if epoch == int(epoch) else round(epoch, 2)
        self.data.train.report_epoch(epoch)
        train_loss = float(self.totals["epoch"].compute()["loss"])
        self.result = self.evaluate()
        self.out.writer.write_scalars(step, {"epoch": epoch, "epoch/train_loss":
                                             train_loss, **self.result})
        writers.report(f"epoch {epoch}/{config.num_epochs:g}: train loss "
                       f"{train_loss:.4f}, "
                       f"{writers.describe(self.result, config.eval_split)}, "
                       f"{time.perf_counter() - self.clock['epoch']:.1f}s")
        self.totals["epoch"] = self.exp.empty_metrics()
        self.clock["epoch"] = time.perf_counter()

    def save(self, step: int) -> None:
        """Checkpoints `step` (the run's first save also writes config.json)."""
        self.out.save(step, self.checkpoint_items(), self.exp.info)


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
