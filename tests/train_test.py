"""End to end under tfds.testing.mock_data: main, resume, eval, bad input."""
import glob
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from unittest import mock

import jax
import numpy as np
import pytest

from research.core import config_lib
from research import errors
from research import evaluate
from research import main
from research import train
from research.core import writers
from tests import helpers


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """An uninterrupted tiny run: (config, workdir, result)."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    config = helpers.tiny_config()
    result = helpers.mocked(train.train_and_evaluate, config, workdir)
    return config, workdir, result


def test_main_smoke_preset_end_to_end(tmp_path):
    workdir = str(tmp_path / "smoke")
    argv = ["prog", f"--config={helpers.SMOKE}", f"--workdir={workdir}"]
    try:
        with mock.patch.object(sys, "argv", argv):
            main.FLAGS(argv)
        result = helpers.mocked(main.run, ["prog"])
    finally:
        main.FLAGS.unparse_flags()
    config = config_lib.load_workdir_config(workdir)
    assert config.batch_size == 8 and config.train_split == "train[:256]"
    records = writers.read_metrics(workdir)
    epochs = [r for r in records if "eval/accuracy" in r]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert all(0 <= r["eval/accuracy"] <= 1 and np.isfinite(r["eval/loss"])
               for r in epochs)
    assert any("perf/images_per_sec" in r for r in records)
    assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
    # 48 mocked examples // 8 = 6 steps an epoch; saves at 6 and 12.
    assert helpers.saved_steps(workdir) == [6, 12]
    assert result["step"] == 12
    assert result["eval/accuracy"] == epochs[-1]["eval/accuracy"]


def test_straight_run_writes_checkpoints_and_metrics(straight_run):
    _, workdir, result = straight_run
    # every 4 steps and each epoch end (6, 12); the newest 3 are kept.
    assert helpers.saved_steps(workdir) == [6, 8, 12]
    assert result["step"] == 12
    lines = [r for r in writers.read_metrics(workdir) if "train/loss" in r]
    assert [r["step"] for r in lines] == [4, 6, 8, 12]


def test_resume_equals_uninterrupted_run_bitwise(straight_run, tmp_path):
    config, straight_dir, straight_result = straight_run
    workdir = str(tmp_path / "resumed")
    first = helpers.mocked(train.train_and_evaluate, config, workdir, stop_after_step=5)
    assert first["step"] == 5 and 5 in helpers.saved_steps(workdir)
    second = helpers.mocked(train.train_and_evaluate, config, workdir)
    assert second["step"] == 12
    helpers.assert_trees_equal(helpers.final_params(config, workdir),
                               helpers.final_params(config, straight_dir))
    assert second["eval/loss"] == straight_result["eval/loss"]

    # The epoch-2 train loss spans the restart: the running sums are checkpointed.
    def epoch_losses(d):
        return [r["epoch/train_loss"] for r in writers.read_metrics(d)
                if "epoch/train_loss" in r]
    assert epoch_losses(workdir) == epoch_losses(straight_dir)


def test_eval_mode_reproduces_final_metrics(straight_run):
    config, workdir, result = straight_run
    evaluated = helpers.mocked(evaluate.evaluate, config, workdir)
    assert evaluated["step"] == 12
    assert evaluated["eval/accuracy"] == result["eval/accuracy"]
    assert evaluated["eval/loss"] == pytest.approx(result["eval/loss"], rel=1e-6)
    # Only the workdir: the saved config is used; an older step can be chosen.
    saved = config_lib.load_workdir_config(workdir)
    assert helpers.mocked(evaluate.evaluate, saved, workdir, 8)["step"] == 8
    with pytest.raises(errors.UserError,
                       match=r"No checkpoint for step 7.*\[6, 8, 12\]"):
        helpers.mocked(evaluate.evaluate, saved, workdir, 7)


def test_eval_without_checkpoints_says_train_first(tmp_path):
    with pytest.raises(errors.UserError, match="train first"):
        helpers.mocked(evaluate.evaluate, helpers.tiny_config(), str(tmp_path))


def test_corrupt_latest_checkpoint_falls_back_to_previous(straight_run, tmp_path):
    config, straight_dir, _ = straight_run
    workdir = str(tmp_path / "corrupt")
    shutil.copytree(straight_dir, workdir)
    helpers.corrupt(os.path.join(workdir, "checkpoints", "12"))
    result = helpers.mocked(train.train_and_evaluate, config, workdir)
    # Step 12 was moved aside (kept, not deleted), training redone from step 8.
    assert os.path.isdir(os.path.join(workdir, "corrupt_checkpoints", "12"))
    assert result["step"] == 12
    helpers.assert_trees_equal(helpers.final_params(config, workdir),
                               helpers.final_params(config, straight_dir))


def test_checkpoints_of_another_model_stop_with_clear_error(straight_run, tmp_path):
    _, straight_dir, _ = straight_run
    workdir = str(tmp_path / "other")
    shutil.copytree(straight_dir, workdir)
    config = helpers.tiny_config(**{"model_kwargs.num_classes": 12})  # another head
    with pytest.raises(errors.UserError, match="None of the 3 checkpoints"):
        helpers.mocked(train.train_and_evaluate, config, workdir,
                       allow_config_change=True)
    assert helpers.saved_steps(workdir) == [6, 8, 12]  # nothing moved or deleted
    assert not os.path.exists(os.path.join(workdir, "corrupt_checkpoints"))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path / "nan")
    helpers.mocked(train.train_and_evaluate, helpers.tiny_config(), workdir,
                   stop_after_step=4)
    with pytest.raises(train.NonFiniteLossError,
                       match=r"Non-finite training loss at step \d+.*step 4"):
        helpers.mocked(train.train_and_evaluate, helpers.tiny_config(learning_rate=1e9),
                       workdir, allow_config_change=True)
    assert helpers.saved_steps(workdir) == [4]
    # config.json still describes the checkpoint, not the failed attempt.
    assert config_lib.load_workdir_config(workdir).learning_rate == 0.001
    params = helpers.final_params(helpers.tiny_config(), workdir)
    assert all(np.isfinite(p).all() for p in jax.tree.leaves(params))


@pytest.mark.parametrize("overrides, message", [
    ({"model": "vgg"}, r"Unknown model 'vgg'.*lenet"),
    ({"dataset": "mnist"}, r"Unknown dataset 'mnist'.*cifar10"),
    ({"batch_size": 64}, r"batch_size=64 is larger than the 48 examples"),
])
def test_bad_config_fails_before_compute(tmp_path, overrides, message):
    with pytest.raises(errors.UserError, match=message):
        helpers.mocked(train.train_and_evaluate, helpers.tiny_config(**overrides),
                       str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")


def test_unwritable_workdir_fails_clearly(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(errors.UserError, match="is not writable"):
        helpers.mocked(train.train_and_evaluate, helpers.tiny_config(),
                       str(blocker / "run"))


def test_missing_data_fails_fast_with_the_fix(tmp_path):
    config = helpers.tiny_config(data_dir=str(tmp_path / "no_data"))
    start = time.perf_counter()
    with pytest.raises(errors.UserError,
                       match=r"not prepared in data_dir.*TFDS_DATA_DIR"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert time.perf_counter() - start < 30


def test_download_without_network_fails_fast(tmp_path):
    config = helpers.tiny_config(data_dir=str(tmp_path / "no_data"), download=True)
    start = time.perf_counter()
    with mock.patch("socket.create_connection", side_effect=OSError("unreachable")):
        with pytest.raises(errors.UserError, match="unreachable"):
            train.train_and_evaluate(config, str(tmp_path / "run"))
    assert time.perf_counter() - start < 30


# A training process under mock_data, for the signal tests.
_CHILD = textwrap.dedent("""
    import sys
    import tensorflow_datasets as tfds
    from absl import app
    from research import main
    with tfds.testing.mock_data(num_examples={n}):
        app.run(main.main, argv=sys.argv, flags_parser=main.parse_flags)
""").format(n=helpers.NUM_EXAMPLES)


def _spawn(workdir, *overrides):
    argv = [sys.executable, "-c", _CHILD, f"--config={helpers.SMOKE}",
            f"--workdir={workdir}",
            "--config.train_split=train", "--config.eval_split=test",
            "--config.data_dir=/nonexistent/tfds", *overrides]
    env = {**os.environ, "PYTHONPATH": helpers.REPO}
    log = open(workdir + ".log", "ab")  # a file: a full pipe would block the child
    proc = subprocess.Popen(argv, cwd=helpers.REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=log)
    log.close()
    return proc


def _log_tail(workdir):
    with open(workdir + ".log", "rb") as f:
        return f.read().decode(errors="replace")[-3000:]


def _wait_for_checkpoint(proc, workdir, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (os.path.isdir(os.path.join(workdir, "checkpoints"))
                and helpers.saved_steps(workdir)):
            return
        assert proc.poll() is None, _log_tail(workdir)
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.slow
def test_sigterm_saves_and_sigkill_resumes_exactly(tmp_path):
    """SIGTERM saves the current step; after SIGKILL a rerun ends bitwise equal."""
    # batch 1: 48 steps an epoch, 2,880 steps in all.
    long_run = ("--config.batch_size=1", "--config.num_epochs=60",
                "--config.checkpoint_every_steps=200", "--config.log_every_steps=200")
    config = helpers.tiny_config(batch_size=1, num_epochs=60,
                                 checkpoint_every_steps=200, log_every_steps=200)
    workdir = str(tmp_path / "signals")

    proc = _spawn(workdir, *long_run)
    _wait_for_checkpoint(proc, workdir)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    stopped_at = helpers.saved_steps(workdir)[-1]
    assert 0 < stopped_at < 2880 and stopped_at % 200 != 0, helpers.saved_steps(workdir)

    proc = _spawn(workdir, *long_run)
    deadline = time.time() + 60
    while helpers.saved_steps(workdir)[-1] == stopped_at and time.time() < deadline:
        assert proc.poll() is None, _log_tail(workdir)
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no handler runs, an async save may be half-written
    assert proc.wait(timeout=30) == -signal.SIGKILL

    proc = _spawn(workdir, *long_run)
    assert proc.wait(timeout=300) == 0, _log_tail(workdir)
    assert helpers.saved_steps(workdir)[-1] == 2880

    straight = str(tmp_path / "straight")
    helpers.mocked(train.train_and_evaluate, config, straight)
    helpers.assert_trees_equal(helpers.final_params(config, workdir),
                               helpers.final_params(config, straight))


def test_signal_right_after_a_save_stops_without_saving_twice(tmp_path, monkeypatch):
    """SIGTERM landing just after a boundary's save: stop there, no second save."""
    from research.core import checkpointing  # pylint: disable=g-import-not-at-top
    real_save = checkpointing.save
    calls = []

    def save_then_signal(manager, step, *args):
        real_save(manager, step, *args)
        calls.append(step)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(checkpointing, "save", save_then_signal)
    with pytest.raises(train.Interrupted) as stopped:
        helpers.mocked(train.train_and_evaluate, helpers.tiny_config(), str(tmp_path))
    assert calls == [4] and stopped.value.step == 4
    assert helpers.saved_steps(str(tmp_path)) == [4]
