"""Data parallelism: 8 simulated devices, 2 real processes, micro-batches.

Multi-device checks run in subprocesses, because the device count is fixed
when JAX starts (`--xla_force_host_platform_device_count`).
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests import helpers

# --- run inside a subprocess with 8 devices ---------------------------------


def _worker(workdir: str) -> dict:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    from research import errors, assembly, train  # noqa: E401
    from research import mesh as mesh_lib  # noqa: E401
    from research.core import writers  # noqa: E401
    assert jax.device_count() == 8
    out = {}
    for model, kwargs in (("lenet", {"num_classes": 10}),
                          ("convnet", {"features": (8, 16), "num_classes": 10,
                                       "dropout_rate": 0.3})):
        params, losses = {}, {}
        for devices in (1, 8):
            config = helpers.tiny_config(model=model, model_kwargs=kwargs,
                                         num_devices=devices, learning_rate=0.01)
            run_dir = os.path.join(workdir, f"{model}_{devices}")
            with tfds.testing.mock_data(num_examples=helpers.NUM_EXAMPLES):
                train.train_and_evaluate(config, run_dir)
            one_device = mesh_lib.create_mesh(1)
            variables = assembly.restore_variables(config, run_dir,
                                                     mesh=one_device).variables
            params[devices] = variables
            losses[devices] = [r["train/loss"] for r in writers.read_metrics(run_dir)
                               if "train/loss" in r]
        out[model] = {"max_param_diff": helpers.max_diff(params[1], params[8]),
                      "bitwise": helpers.max_diff(params[1], params[8]) == 0.0,
                      "losses_1": losses[1], "losses_8": losses[8],
                      "has_batch_stats": "batch_stats" in params[8]}
    # Text rows (windows) and evaluation streams split over 2 devices.
    rnn = {}
    for devices in (1, 2):
        config = helpers.rnn_tiny_config(num_devices=devices)
        run_dir = os.path.join(workdir, f"rnn_{devices}")
        result = helpers.rnn_mocked(train.train_and_evaluate, config, run_dir)
        variables = assembly.restore_variables(config, run_dir,
                                                 mesh=mesh_lib.create_mesh(1)).variables
        rnn[devices] = (variables, result["eval/loss"])
    out["char_rnn"] = {"max_param_diff": helpers.max_diff(rnn[1][0], rnn[2][0]),
                       "eval_loss": [rnn[1][1], rnn[2][1]]}
    config = helpers.tiny_config(batch_size=12)
    try:
        with tfds.testing.mock_data(num_examples=helpers.NUM_EXAMPLES):
            train.train_and_evaluate(config, os.path.join(workdir, "bad"))
    except errors.UserError as e:
        out["indivisible_error"] = str(e)
    return out


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("eight"))
    proc = subprocess.run(
        [sys.executable, __file__, "worker", workdir], env=helpers.device_env(8),
        cwd=helpers.REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("model", ["lenet", "convnet"])
def test_eight_devices_match_one_device(eight_devices, model):
    """Same global batches, dropout masks and BatchNorm statistics on 1 or 8."""
    result = eight_devices[model]
    assert result["max_param_diff"] < helpers.TOLERANCE, result
    np.testing.assert_allclose(result["losses_8"], result["losses_1"], rtol=1e-5)
    assert len(result["losses_1"]) == 4
    assert result["has_batch_stats"] == (model == "convnet")


def test_text_rows_and_eval_streams_split_over_devices(eight_devices):
    result = eight_devices["char_rnn"]
    assert result["max_param_diff"] < helpers.TOLERANCE, result
    np.testing.assert_allclose(*result["eval_loss"], rtol=1e-5)


def test_indivisible_batch_names_both_numbers(eight_devices):
    assert "batch_size=12 does not divide across 8 devices" in (
        eight_devices["indivisible_error"])


# --- gradient accumulation (one device, in process) -------------------------

def test_gradient_accumulation_equals_the_large_batch():
    state, data = helpers.lenet_setup(learning_rate=0.1)
    batch = jax.tree.map(lambda a: a[:16], data)
    whole, m_whole = helpers.jit_train_step()(state, batch, jax.random.key(0))
    accum, m_accum = helpers.jit_train_step(grad_accum_steps=4)(
        state, batch, jax.random.key(0))
    assert helpers.max_diff(whole.params, accum.params) < 1e-6
    assert helpers.max_diff(whole.params, state.params) > 1e-3  # the step did move
    np.testing.assert_allclose(float(m_whole.compute()["loss"]),
                               float(m_accum.compute()["loss"]), rtol=1e-6)
    assert int(m_accum.loss.count) == 16


# --- two real processes -----------------------------------------------------

def test_two_processes_train_save_and_restore_on_one_device(tmp_path):
    """2 processes x 2 CPU devices over gloo on 127.0.0.1 = the 1-device run.

    A real (tiny) TFDS dataset on disk, because mock_data returns the same
    examples for every sub-split: each process must read only its half.
    """
    # pylint: disable-next=g-import-not-at-top
    from research import assembly, train
    from research.core import writers
    from tests import tiny_tfds  # pylint: disable=g-import-not-at-top
    data_dir = str(tmp_path / "tfds")
    tiny_tfds.prepare(data_dir)
    tiny_tfds.register()
    data = {"dataset": tiny_tfds.NAME, "data_dir": data_dir}
    workdir = str(tmp_path / "two")
    port = helpers.free_port()
    common = [f"--config={helpers.SMOKE}", f"--workdir={workdir}",
              "--config.train_split=train", "--config.eval_split=test",
              f"--config.dataset={tiny_tfds.NAME}", f"--config.data_dir={data_dir}",
              "--config.checkpoint_every_steps=4",
              "--config.log_every_steps=4", f"--coordinator_address=127.0.0.1:{port}",
              "--num_processes=2", "--distributed_timeout_s=60",
              "--verbosity=0"]  # the INFO log on stderr, for the asserts below
    procs = [helpers.spawn_main(common + [f"--process_id={i}"], 2,
                                str(tmp_path / f"p{i}.log"))
             for i in range(2)]
    codes = [p.wait(timeout=300) for p in procs]
    logs = [(tmp_path / f"p{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert "Process 1 of 2; 2 local and 4 global devices" in logs[1]
    assert "on 4 devices (2 processes)" in logs[0]
    for i in range(2):  # each process read half of each split
        assert f"process {i} of 2 read 24 of the 48 examples of train" in logs[i]
        assert f"process {i} of 2 read 24 of the 48 examples of test" in logs[i]

    config = helpers.tiny_config(checkpoint_every_steps=4, log_every_steps=4,
                                 **data)
    single = str(tmp_path / "single")
    one_result = train.train_and_evaluate(config, single)
    two, step, _, _ = assembly.restore_variables(config, workdir)
    assert step == 12
    one = assembly.restore_variables(config, single).variables
    assert helpers.max_diff(two, one) < helpers.TOLERANCE
    # The 2-process run's final evaluation (each device scoring the rows it
    # holds) agrees with the single process's.
    two_metrics = [r for r in writers.read_metrics(workdir) if "eval/loss" in r]
    np.testing.assert_allclose(two_metrics[-1]["eval/loss"], one_result["eval/loss"],
                               rtol=1e-5)
    assert two_metrics[-1]["eval/accuracy"] == one_result["eval/accuracy"]


def _two_processes(args, tmp_path, name):
    port = helpers.free_port()
    return [helpers.spawn_main(args + [f"--coordinator_address=127.0.0.1:{port}",
                                       "--num_processes=2",
                                       "--distributed_timeout_s=60",
                                       f"--process_id={i}"], 2,
                               str(tmp_path / f"{name}{i}.log"))
            for i in range(2)]


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    """JAX's preemption service: both processes stop and save at one agreed
    step; the rerun ends bitwise equal to an uninterrupted 2-process run."""
    import re  # pylint: disable=g-import-not-at-top
    from research.core import config_lib  # pylint: disable=g-import-not-at-top
    from research import assembly  # pylint: disable=g-import-not-at-top
    from tests import tiny_tfds  # pylint: disable=g-import-not-at-top
    data_dir = str(tmp_path / "tfds")
    tiny_tfds.prepare(data_dir)
    tiny_tfds.register()

    def args(workdir):
        return [f"--config={helpers.SMOKE}", f"--workdir={workdir}",
                "--config.train_split=train", "--config.eval_split=test",
                f"--config.dataset={tiny_tfds.NAME}", f"--config.data_dir={data_dir}",
                "--config.batch_size=4", "--config.num_epochs=25",
                "--config.checkpoint_every_steps=1000", "--config.log_every_steps=1000"]

    workdir = str(tmp_path / "stopped")
    procs = _two_processes(args(workdir), tmp_path, "stop")
    deadline = time.time() + 240
    while not (os.path.isdir(os.path.join(workdir, "checkpoints"))
               and helpers.saved_steps(workdir)):
        assert all(p.poll() is None for p in procs) and time.time() < deadline
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGTERM)  # process 1 alone
    codes = [p.wait(timeout=120) for p in procs]
    logs = [(tmp_path / f"stop{i}.log").read_text() for i in range(2)]
    assert codes == [128 + signal.SIGTERM] * 2, logs[0][-2000:] + logs[1][-2000:]
    stops = [re.findall(r"Stopped by SIGTERM at step (\d+)", log) for log in logs]
    assert stops[0] == stops[1] and len(stops[0]) == 1, stops
    stopped_at = int(stops[0][0])
    assert 0 < stopped_at < 300 and helpers.saved_steps(workdir)[-1] == stopped_at

    procs = _two_processes(args(workdir), tmp_path, "resume")
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    straight = str(tmp_path / "straight")
    procs = _two_processes(args(straight), tmp_path, "straight")
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    config = config_lib.load_workdir_config(straight)
    resumed = assembly.restore_variables(config, workdir)
    assert resumed.step == 300
    helpers.assert_trees_equal(
        resumed.variables, assembly.restore_variables(config, straight).variables)


def test_unreachable_coordinator_fails_within_the_timeout(tmp_path):
    start = time.time()
    log = str(tmp_path / "log")
    proc = helpers.spawn_main([f"--config={helpers.SMOKE}",
                               f"--workdir={tmp_path / 'w'}",
                               f"--coordinator_address=127.0.0.1:{helpers.free_port()}",
                               "--num_processes=2", "--process_id=1",
                               "--distributed_timeout_s=5"], 1, log)
    assert proc.wait(timeout=120) == 2
    assert time.time() - start < 60
    with open(log) as f:
        assert "Could not join the distributed job" in f.read()


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    # worker DIR [OUT.json]: OUT is docs/results/data_parallel_8_devices.json.
    helpers.worker_main(_worker)
