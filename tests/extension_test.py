"""The trainer's extension points, used from outside `research/`: a toy
dataset, model and objective registered here, trained through `main`,
augmented, resumed after a kill; and the trainer with the kernels removed."""
import dataclasses
import glob
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import struct

from research import mesh as mesh_lib
from research.data import input_pipeline
from research import main
from research.core import metrics as metrics_lib
from research import models
from research.core import inputs as inputs_lib
from research.core import objectives
from research.core import schemes
from research.core import state as state_lib
from research import train
from research.core import writers
from tests import helpers


@dataclasses.dataclass(frozen=True)
class ToyImages:
    """48 random 8x8 RGB images whose label is which half is brighter."""
    tfds_name: str = "toy_images"
    download_host: str = "localhost"
    default_objective: str = "toy_hinge"
    input_dtype: Any = jnp.float32
    num_examples: int = 48

    def info(self, config):
        return {"num_classes": 2}

    def input_shape(self, config):
        return (8, 8, 3)

    def _rows(self, seed):
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, (self.num_examples, 8, 8, 3), dtype=np.uint8)
        label = (images[:, :, :4].mean((1, 2, 3)) > images[:, :, 4:].mean((1, 2, 3)))
        return input_pipeline.Shard({"image": images, "label": label.astype(np.int32)},
                                    (self.num_examples,))

    def train_rows(self, config, info):
        return self._rows(0)

    def eval_rows(self, config, info):
        return self._rows(1)

    def preprocess(self, batch):
        return {**batch, "image": batch["image"].astype(jnp.float32) / 255.0}

    def throughput_unit(self, config):
        return "images", 1


class ToyCNN(nn.Module):
    """conv 4@3x3 -> mean pool -> dense."""
    num_classes: int = 2

    @nn.compact
    def __call__(self, x, *, train=False):
        del train
        x = nn.relu(nn.Conv(4, (3, 3))(x)).mean(axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


@dataclasses.dataclass(frozen=True)
class ToyHinge:
    """Multi-class hinge loss plus an L2 penalty on the params (a loss that
    depends on params directly)."""
    l2: float = 1e-3
    metrics_cls: Any = metrics_lib.ClassificationMetrics

    def model_input(self, batch):
        return batch["image"]

    def __call__(self, outputs, batch, *, params, aux, train):
        correct = jnp.take_along_axis(outputs, batch["label"][:, None], 1)
        margins = jnp.maximum(0.0, 1.0 + outputs - correct).sum(-1) - 1.0
        penalty = self.l2 * sum(jnp.sum(p ** 2) for p in jax.tree.leaves(params))
        mask = batch.get("mask")
        loss = margins.mean() if mask is None else (
            (margins * mask).sum() / mask.sum())
        return loss + penalty, self.metrics_cls.single_from_model_output(
            loss=margins, logits=outputs, labels=batch["label"], mask=mask)

    def check(self, output_shape, info):
        assert output_shape[-1] == info["num_classes"]


class ToyState(struct.PyTreeNode):
    """A scheme's own state: the train state and the examples it has seen."""
    inner: Any
    seen: jax.Array

    @property
    def step(self):
        return self.inner.step

    @property
    def params(self):
        return self.inner.params

    @property
    def eval_variables(self):
        return self.inner.eval_variables


@dataclasses.dataclass(frozen=True)
class ToyScheme:
    """Synchronous steps on a state of its own (`ToyState`), with its own
    checkpoint item and metric: every part of the `Scheme` interface."""

    @classmethod
    def from_config(cls, config):
        del config
        return cls()

    def create_mesh(self, num_devices):
        return mesh_lib.create_mesh(num_devices)

    def state_shardings(self, state, param_specs, mesh):
        del state, param_specs
        return mesh_lib.replicated(mesh)

    def distribute(self, state, total_steps, mesh):
        del total_steps
        return jax.device_put(ToyState(state, jnp.zeros((), jnp.int32)),
                              mesh_lib.replicated(mesh))

    def shardings(self, state, mesh):
        del state
        return mesh_lib.replicated(mesh)

    def train_step(self, state, batch, rng, aux, *, inner_step, mesh, constrain):
        del mesh
        inner, metrics, loss = inner_step(state.inner, batch, rng, aux,
                                          grad_accum_steps=1, constrain=constrain)
        return ToyState(inner, state.seen + batch["label"].shape[0]), metrics, loss

    def trace(self, fn):
        return fn

    def train_state(self, state):
        return state.inner

    def checkpoint_items(self, state, loop):
        items = state_lib.checkpoint_items(state.inner, loop)
        items["train"]["seen"] = state.seen
        return items

    def restore_items(self, state, items):
        inner, loop = state_lib.restore_items(state.inner, items)
        return ToyState(inner, items["train"]["seen"]), loop

    def communication(self, state, step, devices, final_step):
        del step, devices, final_step
        return {"toy/seen": float(state.seen)}


class ToyTrain:
    """An input path that stacks each chunk's batches on the host, in an
    order drawn with numpy from the epoch: every part of `TrainInput`."""

    def __init__(self, exp, split):
        del split
        self.rows = exp.dataset.train_rows(exp.config, exp.info).rows
        self.num_examples = len(self.rows["label"])
        self.batch_size, self.mesh = exp.config.batch_size, exp.mesh
        self.steps_per_epoch = self.num_examples // self.batch_size
        self.epochs_reported = []

    def first_examples(self, n, fn):
        return jax.jit(fn)({k: v[:n] for k, v in self.rows.items()})

    def spec(self, num_steps):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=mesh_lib.replicated(self.mesh)),
            self._stack(0, num_steps))

    def start(self, data_key, step, stop, chunk_size):
        del data_key, step, stop, chunk_size

    def _stack(self, step, num_steps):
        batches = []
        for s in range(step, step + num_steps):
            order = np.random.default_rng(s // self.steps_per_epoch).permutation(
                self.num_examples)
            k = s % self.steps_per_epoch
            index = order[k * self.batch_size:(k + 1) * self.batch_size]
            batches.append({**{k: v[index] for k, v in self.rows.items()},
                            "index": index.astype(np.int32)})
        return {k: np.stack([b[k] for b in batches]) for k in batches[0]}

    def inputs(self, step, num_steps):
        return jax.device_put(self._stack(step, num_steps),
                              mesh_lib.replicated(self.mesh))

    def batch(self, inputs, i, step, pipeline):
        del step
        rows = {k: v[i] for k, v in inputs.items() if k != "index"}
        return pipeline.constrain({**pipeline.preprocess_fn(rows),
                                   "index": inputs["index"][i]})

    def report_epoch(self, epoch):
        self.epochs_reported.append(epoch)

    def close(self):
        pass


class ToyEval:
    """The evaluation split as one masked batch: every part of `EvalInput`."""

    def __init__(self, exp, split):
        del split
        self.exp, self.data = exp, None
        rows = exp.dataset.eval_rows(exp.config, exp.info).rows
        self.batch = jax.device_put(
            {**rows, "mask": np.ones(len(rows["label"]), bool)},
            mesh_lib.batch_sharded(exp.mesh))

    def compile(self, variables, aux, final):
        exp = self.exp
        fn = exp.eval_batch_fn(final).lower(
            variables, exp.empty_metrics(), self.batch, aux).compile()
        return lambda v, a: fn(v, exp.empty_metrics(), self.batch, a)


def register():
    """Adds the toys to the registries (also in the subprocesses)."""
    input_pipeline.DATASETS["toy_images"] = ToyImages()
    models.MODELS["toy_cnn"] = ToyCNN
    objectives.OBJECTIVES["toy_hinge"] = ToyHinge


TOY_CONFIG = textwrap.dedent('''
    import ml_collections
    from configs import cifar_cnn


    def get_config():
        config = cifar_cnn.get_config()
        config.dataset = "toy_images"
        config.model = "toy_cnn"
        config.model_kwargs = ml_collections.ConfigDict({"num_classes": 2})
        config.objective_kwargs = ml_collections.ConfigDict({"l2": 1e-3})
        config.augment.flip = "random"
        config.augment.translate = 1
        config.augment.eval_views = "flip"
        config.learning_rate = 0.05
        config.lr_schedule = "cosine"
        config.warmup_steps = 8
        config.batch_size = 8
        config.num_epochs = 4
        config.steps_per_call = 2
        config.eval_batch_size = 16
        config.log_every_steps = 5
        config.checkpoint_every_steps = 5
        return config
''')


@pytest.fixture()
def toy(tmp_path, monkeypatch):
    """The toys registered for one test; the config file's path."""
    monkeypatch.setitem(input_pipeline.DATASETS, "toy_images", ToyImages())
    monkeypatch.setitem(models.MODELS, "toy_cnn", ToyCNN)
    monkeypatch.setitem(objectives.OBJECTIVES, "toy_hinge", ToyHinge)
    path = tmp_path / "toy_config.py"
    path.write_text(TOY_CONFIG)
    return str(path)


def _main(*args):
    argv = ["prog", *args]
    try:
        with mock.patch.object(sys, "argv", argv):
            main.FLAGS(argv)
        return main.run(["prog"])
    finally:
        main.FLAGS.unparse_flags()


def _params(workdir):
    from research.core import config_lib  # pylint: disable=g-import-not-at-top
    from research import assembly  # pylint: disable=g-import-not-at-top
    config = config_lib.load_workdir_config(workdir)
    return assembly.restore_variables(config, workdir).variables


def test_toy_dataset_model_objective_train_through_main_and_resume(toy, tmp_path):
    straight = str(tmp_path / "straight")
    result = _main(f"--config={toy}", f"--workdir={straight}")
    assert result["step"] == 24  # 48 // 8 = 6 steps an epoch, 4 epochs
    assert 0.0 <= result["eval/accuracy"] <= 1.0

    from research.core import config_lib  # pylint: disable=g-import-not-at-top
    resumed = str(tmp_path / "resumed")
    train.train_and_evaluate(config_lib.load_config(toy), resumed, stop_after_step=9)
    assert _main(f"--config={toy}", f"--workdir={resumed}")["step"] == 24
    helpers.assert_trees_equal(_params(resumed), _params(straight))

    # Augmentation changed the run: without it the parameters differ.
    plain = str(tmp_path / "plain")
    _main(f"--config={toy}", f"--workdir={plain}", "--config.augment.flip=none",
          "--config.augment.translate=0")
    assert not np.array_equal(_params(plain)["params"]["Dense_0"]["kernel"],
                              _params(straight)["params"]["Dense_0"]["kernel"])

    # The learning rate is logged (the cosine's warmup, then its decay).
    lrs = [r["train/learning_rate"] for r in writers.read_metrics(straight)
           if "train/learning_rate" in r]
    assert len(lrs) >= 4 and lrs[0] < max(lrs) and lrs[-1] < max(lrs)
    events = []
    for path in glob.glob(os.path.join(straight, "events.out.tfevents.*")):
        with open(path, "rb") as f:
            events.append(f.read())
    assert any(b"train/learning_rate" in e for e in events)


@pytest.mark.slow
def test_ema_extra_checkpoints_and_resumes_bitwise(toy, tmp_path):
    from research.core import config_lib  # pylint: disable=g-import-not-at-top
    from research import assembly  # pylint: disable=g-import-not-at-top
    config = config_lib.load_config(toy, {"ema_decay": 0.9})
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train.train_and_evaluate(config, straight)
    train.train_and_evaluate(config, resumed, stop_after_step=7)
    train.train_and_evaluate(config, resumed)
    helpers.assert_trees_equal(_params(resumed), _params(straight))
    # The model item holds the EMA, not the last weights.
    ema = assembly.restore_variables(config, straight).variables
    plain = str(tmp_path / "plain")
    train.train_and_evaluate(config_lib.load_config(toy), plain)
    assert not np.array_equal(ema["params"]["Dense_0"]["kernel"],
                              _params(plain)["params"]["Dense_0"]["kernel"])


_CHILD = textwrap.dedent("""
    import sys
    from absl import app
    from research import main
    from tests import extension_test
    extension_test.register()
    app.run(main.main, argv=sys.argv, flags_parser=main.parse_flags)
""")


def _tail(workdir):
    with open(workdir + ".log") as f:
        return f.read()[-3000:]


@pytest.mark.slow
def test_augmented_run_resumed_after_sigkill_is_bitwise_equal(toy, tmp_path):
    """Random flip and translation keyed by (seed, step, example): a run
    killed mid-way and resumed ends exactly where an uninterrupted run does."""
    long_run = ("--config.batch_size=1", "--config.num_epochs=40",
                "--config.checkpoint_every_steps=150",
                "--config.log_every_steps=150")
    workdir = str(tmp_path / "killed")
    env = {**os.environ, "PYTHONPATH": helpers.REPO}

    def spawn():
        with open(workdir + ".log", "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-c", _CHILD, f"--config={toy}",
                 f"--workdir={workdir}", *long_run], cwd=helpers.REPO, env=env,
                stdout=subprocess.DEVNULL, stderr=log)

    proc = spawn()
    deadline = time.time() + 120
    while not (os.path.isdir(os.path.join(workdir, "checkpoints"))
               and helpers.saved_steps(workdir)):
        assert proc.poll() is None and time.time() < deadline, _tail(workdir)
        time.sleep(0.02)
    proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert helpers.saved_steps(workdir)[-1] < 1920  # killed before the end
    assert spawn().wait(timeout=300) == 0, _tail(workdir)

    straight = str(tmp_path / "straight")
    _main(f"--config={toy}", f"--workdir={straight}", *long_run)
    helpers.assert_trees_equal(_params(workdir), _params(straight))


@pytest.mark.slow
def test_trains_and_evaluates_with_the_kernels_removed(tmp_path):
    """A copy of the repository without research/kernels/: LeNet and the
    LSTM fall back to XLA for training and evaluation."""
    copy = tmp_path / "repo"
    shutil.copytree(helpers.REPO, copy, ignore=shutil.ignore_patterns(
        ".venv*", ".git", "runs", "__pycache__", "*.egg-info", "build"))
    shutil.rmtree(copy / "research" / "kernels")
    # The editable install of the repository would find the real kernels.
    hide = ("import sys; sys.meta_path = [f for f in sys.meta_path if "
            "'__editable__' not in getattr(f, '__module__', '')]\n")
    code = hide + textwrap.dedent("""
        import sys
        import tensorflow_datasets as tfds
        from absl import app
        from research import main
        with tfds.testing.mock_data(num_examples=48):
            app.run(main.main, argv=sys.argv, flags_parser=main.parse_flags)
    """)
    env = {**os.environ, "PYTHONPATH": str(copy)}
    probe = subprocess.run(
        [sys.executable, "-c", hide + "import importlib.util, research; print("
         "research.__file__, importlib.util.find_spec('research.kernels'))"],
        cwd=copy, env=env, capture_output=True, text=True, check=True).stdout
    assert probe.startswith(str(copy)) and probe.split()[-1] == "None", probe
    for config, extra in (("cifar_cnn.py:smoke", ["--config.train_split=train",
                                                  "--config.eval_split=test"]),
                          ("shakespeare_rnn.py:smoke",
                           ["--config.model_kwargs.vocab_size=11",
                            "--config.seq_len=8", "--config.batch_size=4"])):
        workdir = str(tmp_path / config.split(".")[0])
        for mode in ("train", "eval"):
            proc = subprocess.run(
                [sys.executable, "-c", code, f"--config=configs/{config}",
                 f"--workdir={workdir}", f"--mode={mode}",
                 "--config.data_dir=/nonexistent", *extra],
                cwd=copy, env=env, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
        assert any("eval/loss" in r for r in writers.read_metrics(workdir))


def test_toy_scheme_and_input_path_train_end_to_end_and_resume(toy, tmp_path,
                                                              monkeypatch):
    """A parallel scheme and an input path registered here, outside
    `research/`, train a run, checkpoint their own state and resume it
    exactly (`core/schemes.py`, `core/inputs.py`)."""
    from research import assembly  # pylint: disable=g-import-not-at-top
    from research.core import config_lib  # pylint: disable=g-import-not-at-top
    monkeypatch.setitem(schemes.SCHEMES, "toy", ToyScheme.from_config)
    monkeypatch.setitem(inputs_lib.INPUTS, "toy",
                        inputs_lib.InputPath(ToyTrain, ToyEval))
    config = config_lib.load_config(toy, {"input": "toy",
                                          "data_parallel.scheme": "toy"})
    exp = assembly.build(config)
    assert isinstance(exp.scheme, ToyScheme)
    assert isinstance(exp.train_input(), ToyTrain)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    result = train.train_and_evaluate(config, straight)
    assert result["step"] == 24 and 0.0 <= result["eval/accuracy"] <= 1.0
    seen = [r["toy/seen"] for r in writers.read_metrics(straight) if "toy/seen" in r]
    assert seen[-1] == 24 * 8  # the scheme's state counted every example
    train.train_and_evaluate(config, resumed, stop_after_step=9)
    train.train_and_evaluate(config, resumed)
    helpers.assert_trees_equal(_params(resumed), _params(straight))
    resumed_seen = [r["toy/seen"] for r in writers.read_metrics(resumed)
                    if "toy/seen" in r]
    assert resumed_seen[-1] == 24 * 8  # restored from the checkpoint, not reset
    # Not the built-in path's batches: the memory path trains other weights.
    memory = str(tmp_path / "memory")
    train.train_and_evaluate(config_lib.load_config(toy), memory)
    assert not np.array_equal(_params(memory)["params"]["Dense_0"]["kernel"],
                              _params(straight)["params"]["Dense_0"]["kernel"])
