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

from research import input_pipeline
from research import main
from research import metrics as metrics_lib
from research import models
from research import objectives
from research import train
from research import writers
from tests import conftest
from tests import train_test


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
    from research import config_lib, experiment  # pylint: disable=g-import-not-at-top
    config = config_lib.load_workdir_config(workdir)
    return experiment.restore_variables(config, workdir).variables


def test_toy_dataset_model_objective_train_through_main_and_resume(toy, tmp_path):
    straight = str(tmp_path / "straight")
    result = _main(f"--config={toy}", f"--workdir={straight}")
    assert result["step"] == 24  # 48 // 8 = 6 steps an epoch, 4 epochs
    assert 0.0 <= result["eval/accuracy"] <= 1.0

    from research import config_lib  # pylint: disable=g-import-not-at-top
    resumed = str(tmp_path / "resumed")
    train.train_and_evaluate(config_lib.load_config(toy), resumed, stop_after_step=9)
    assert _main(f"--config={toy}", f"--workdir={resumed}")["step"] == 24
    train_test.assert_trees_equal(_params(resumed), _params(straight))

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
    from research import config_lib, experiment  # pylint: disable=g-import-not-at-top
    config = config_lib.load_config(toy, {"ema_decay": 0.9})
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train.train_and_evaluate(config, straight)
    train.train_and_evaluate(config, resumed, stop_after_step=7)
    train.train_and_evaluate(config, resumed)
    train_test.assert_trees_equal(_params(resumed), _params(straight))
    # The model item holds the EMA, not the last weights.
    ema = experiment.restore_variables(config, straight).variables
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
    env = {**os.environ, "PYTHONPATH": conftest.REPO}

    def spawn():
        with open(workdir + ".log", "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-c", _CHILD, f"--config={toy}",
                 f"--workdir={workdir}", *long_run], cwd=conftest.REPO, env=env,
                stdout=subprocess.DEVNULL, stderr=log)

    proc = spawn()
    deadline = time.time() + 120
    while not (os.path.isdir(os.path.join(workdir, "checkpoints"))
               and train_test.saved_steps(workdir)):
        assert proc.poll() is None and time.time() < deadline, _tail(workdir)
        time.sleep(0.02)
    proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert train_test.saved_steps(workdir)[-1] < 1920  # killed before the end
    assert spawn().wait(timeout=300) == 0, _tail(workdir)

    straight = str(tmp_path / "straight")
    _main(f"--config={toy}", f"--workdir={straight}", *long_run)
    train_test.assert_trees_equal(_params(workdir), _params(straight))


@pytest.mark.slow
def test_trains_and_evaluates_with_the_kernels_removed(tmp_path):
    """A copy of the repository without research/kernels/: LeNet and the
    LSTM fall back to XLA for training and evaluation."""
    copy = tmp_path / "repo"
    shutil.copytree(conftest.REPO, copy, ignore=shutil.ignore_patterns(
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
