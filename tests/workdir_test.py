"""Trusting the workdir: one writer, durable metrics, no silent config drift,
and one-line errors for foreseeable mistakes (`research/workdir.py`, main)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from research.core import config_lib
from research import errors
from research import train
from research.core import workdir as workdir_lib
from research.core import writers
from tests import helpers

SMOKE = helpers.SMOKE
MOCK = ("--config.train_split=train", "--config.eval_split=test",
        "--config.data_dir=/nonexistent/tfds")
# main under mock_data, as a user would run it (a fresh process each time).
_CHILD = textwrap.dedent("""
    import sys
    import tensorflow_datasets as tfds
    from absl import app
    from research import main
    with tfds.testing.mock_data(num_examples={n}):
        app.run(main.main, argv=sys.argv, flags_parser=main.parse_flags)
""").format(n=helpers.NUM_EXAMPLES)


def _run(*args, limit_file_kb=None, timeout=300):
    """main in a subprocess; returns (status, stdout, stderr). `limit_file_kb`
    caps the size of any file it writes (a full disk, as far as it can tell)."""
    env = {**os.environ, "PYTHONPATH": helpers.REPO}
    argv = [sys.executable, "-c", _CHILD, *args]
    if limit_file_kb:
        argv = ["bash", "-c", f'ulimit -f {limit_file_kb}; exec "$0" "$@"', *argv]
    proc = subprocess.run(argv, cwd=helpers.REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def _spawn(workdir, *args):
    env = {**os.environ, "PYTHONPATH": helpers.REPO}
    log = open(workdir + ".log", "ab")  # a file: a full pipe would block the child
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, f"--config={SMOKE}",
                             f"--workdir={workdir}", *MOCK, *args],
                            cwd=helpers.REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=log)
    log.close()
    return proc


def _timeless(records):
    """metrics.jsonl records without wall times and speeds."""
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith("perf/")}
            for r in records]


LONG = ("--config.batch_size=1", "--config.num_epochs=30",
        "--config.checkpoint_every_steps=100", "--config.log_every_steps=50")


def _lock_holder(workdir):
    path = os.path.join(workdir, workdir_lib.LOCK_FILE)
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        return f.read()


@pytest.mark.slow
def test_second_writer_stops_at_once_and_the_first_is_untouched(tmp_path):
    workdir = str(tmp_path / "shared")
    first = _spawn(workdir, *LONG)
    deadline = time.time() + 120
    while not _lock_holder(workdir):
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.05)
    start = time.time()
    status, _, stderr = _run(f"--config={SMOKE}", f"--workdir={workdir}", *MOCK,
                             "--config.learning_rate=0.5")
    assert status == 2 and time.time() - start < 60
    assert f"is in use by pid {first.pid}" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert first.wait(timeout=300) == 0
    straight = str(tmp_path / "straight")
    assert _run(f"--config={SMOKE}", f"--workdir={straight}", *MOCK, *LONG)[0] == 0
    assert _timeless(writers.read_metrics(workdir)) == _timeless(
        writers.read_metrics(straight))
    assert config_lib.load_workdir_config(workdir).learning_rate == 0.001


def test_stale_lock_of_a_dead_run_is_taken_over(tmp_path):
    workdir = str(tmp_path / "stale")
    os.makedirs(workdir)
    with open(os.path.join(workdir, workdir_lib.LOCK_FILE), "w") as f:
        json.dump({"host": "gone", "pid": 999999, "since": 0}, f)
    with pytest.raises(errors.UserError, match="is in use") as busy:
        with workdir_lib.Lock(workdir):
            with workdir_lib.Lock(workdir):
                pass
    assert f"pid {os.getpid()}" in str(busy.value)
    with workdir_lib.Lock(workdir):  # released on the way out
        pass
    assert _lock_holder(workdir) == ""


@pytest.mark.slow
def test_metrics_after_sigkill_and_resume_equal_an_uninterrupted_run(tmp_path):
    """Killed once metrics past the last checkpoint are on disk (so the
    resumed run must drop them and write them again, once)."""
    workdir = str(tmp_path / "killed")
    proc = _spawn(workdir, *LONG)
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None and time.time() < deadline
        saved = helpers.saved_steps(workdir) if os.path.isdir(
            os.path.join(workdir, "checkpoints")) else []
        if saved and _logged_steps(workdir) and max(
                _logged_steps(workdir)) > max(saved) + 2:
            break
        time.sleep(0.01)
    proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL
    checkpoint = max(helpers.saved_steps(workdir))
    assert max(_logged_steps(workdir)) > checkpoint  # records to deduplicate
    assert _spawn(workdir, *LONG).wait(timeout=300) == 0
    straight = str(tmp_path / "straight")
    assert _run(f"--config={SMOKE}", f"--workdir={straight}", *MOCK, *LONG)[0] == 0
    resumed = writers.read_metrics(workdir)
    steps = [r["step"] for r in resumed]
    assert steps == sorted(steps)
    assert _timeless(resumed) == _timeless(writers.read_metrics(straight))
    assert len([r for r in resumed if "eval/accuracy" in r]) == 30  # every epoch


def _logged_steps(workdir) -> list[int]:
    """Steps of the complete lines of metrics.jsonl (a run may be writing)."""
    path = os.path.join(workdir, writers.METRICS_JSONL)
    if not os.path.exists(path):
        return []
    steps = []
    with open(path) as f:
        for line in f:
            try:
                steps.append(int(json.loads(line)["step"]))
            except (ValueError, KeyError):
                pass
    return steps


def test_changed_learning_rate_is_refused_and_longer_training_continues(tmp_path):
    workdir = str(tmp_path / "drift")
    helpers.mocked(train.train_and_evaluate, helpers.tiny_config(), workdir)
    with pytest.raises(errors.UserError,
                       match=r"learning_rate: 0.001 -> 0.1.*--allow_config_change"):
        helpers.mocked(train.train_and_evaluate,
                       helpers.tiny_config(learning_rate=0.1), workdir)
    assert config_lib.load_workdir_config(workdir).learning_rate == 0.001
    result = helpers.mocked(train.train_and_evaluate,
                            helpers.tiny_config(num_epochs=3), workdir)
    assert result["step"] == 18
    # With the flag the change is made and recorded.
    helpers.mocked(train.train_and_evaluate,
                   helpers.tiny_config(num_epochs=4, learning_rate=0.1),
                   workdir, allow_config_change=True)
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    assert saved["learning_rate"] == 0.1
    assert {"field": "learning_rate", "from": 0.001, "to": 0.1} in (
        saved["_history"][-1]["changes"])
    # A finished run only evaluated with the flag records the change too, so
    # the next plain run of the new config is accepted.
    changed = helpers.tiny_config(num_epochs=4, learning_rate=0.1,
                                  **{"prune.exclude": "Dense_2"})
    helpers.mocked(train.train_and_evaluate, changed, workdir,
                   allow_config_change=True)
    assert config_lib.load_workdir_config(workdir).prune.exclude == "Dense_2"
    assert helpers.mocked(train.train_and_evaluate, changed, workdir)["step"] == 24


def test_fields_added_since_a_run_are_no_change_while_off():
    old = {"lr": 0.1, "prune": {"sparsity": 0.5}}
    assert workdir_lib.diff(old, {"lr": 0.1, "prune": {"sparsity": 0.5, "exclude": ""},
                                  "stream": {"workers": 0}}) == []
    assert workdir_lib.diff(old, {"lr": 0.1, "prune": {"sparsity": 0.5,
                                                       "exclude": "whiten"}}) == [
        ("prune.exclude", None, "whiten")]
    assert workdir_lib.diff({**old, "x": 1}, {**old, "x": 0}) == [("x", 1, 0)]


def test_vanished_checkpoints_are_refused(tmp_path):
    workdir = str(tmp_path / "vanished")
    helpers.mocked(train.train_and_evaluate, helpers.tiny_config(), workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints"))
    with pytest.raises(errors.UserError, match="checkpoints are gone"):
        helpers.mocked(train.train_and_evaluate, helpers.tiny_config(), workdir)


def _trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("trained") / "run")
    assert _run(f"--config={SMOKE}", f"--workdir={workdir}", *MOCK)[0] == 0
    return workdir


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _trained(tmp_path_factory)


@pytest.fixture(scope="module")
def trained_text(tmp_path_factory):
    """A character model trained on mocked text (letters a-j and spaces)."""
    workdir = str(tmp_path_factory.mktemp("text") / "run")
    config = os.path.join(helpers.CONFIGS, "shakespeare_rnn.py:smoke")
    status, _, stderr = _run(f"--config={config}", f"--workdir={workdir}",
                             "--config.data_dir=/nonexistent/tfds",
                             "--config.model_kwargs.vocab_size=11", "--config.seq_len=8",
                             "--config.batch_size=4", "--config.eval_batch_size=2")
    assert status == 0, stderr
    return workdir


def _corrupted(trained, tmp_path):
    workdir = str(tmp_path / "corrupt")
    shutil.copytree(trained, workdir)
    for step in helpers.saved_steps(workdir):
        helpers.corrupt(os.path.join(workdir, "checkpoints", str(step)))
    return workdir


def _cases(trained, trained_text, tmp_path):
    """(name, argv, expected status, a phrase of the error)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    partial = tmp_path / "partial.py"
    partial.write_text("import ml_collections\n\ndef get_config():\n"
                       "    return ml_collections.ConfigDict({'dataset': 'cifar10'})\n")
    text_config = os.path.join(helpers.CONFIGS, "shakespeare_rnn.py:smoke")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        ("teacher missing", [f"--config={SMOKE}", *MOCK, f"--workdir={tmp_path / 'w5'}",
                             "--config.objective=distill",
                             "--config.objective_kwargs={'teacher_workdir': '/no/t'}"],
         2, "objective_kwargs.teacher_workdir='/no/t' holds no trained run"),
        ("teacher by a dotted override", [
            f"--config={SMOKE}", *MOCK, f"--workdir={tmp_path / 'w5'}",
            "--config.objective=distill",
            "--config.objective_kwargs.teacher_workdir=/no/t"], 2,
         "it takes teacher_workdir, temperature, alpha"),
        ("QAT on the LSTM", [f"--config={text_config}", "--config.quant.qat=True",
                             "--config.model_kwargs.lstm_impl=xla",
                             "--config.data_dir=/nonexistent/tfds",
                             f"--workdir={tmp_path / 'w6'}"], 2,
         "Quantization does not support char_rnn"),
        ("config without core fields", [f"--config={partial}",
                                        f"--workdir={tmp_path / 'w7'}"], 2,
         "lacks the fields adam_b2, batch_size, checkpoint_every_steps"),
        ("batch size changed on resume", [
            f"--config={SMOKE}", *MOCK, f"--workdir={trained}", "--allow_config_change",
            "--config.batch_size=2"], 2,
         f"cannot change when resuming the run in '{trained}'"),
        ("sync to DiLoCo on resume", [
            f"--config={SMOKE}", *MOCK, f"--workdir={trained}", "--allow_config_change",
            "--config.data_parallel.scheme=diloco"], 2,
         "data_parallel.scheme cannot change when resuming"),
        ("eval on more devices than exist", [
            "--mode=eval", f"--workdir={trained}", "--config.num_devices=8"], 2,
         "pass --config.num_devices=0"),
        ("a job that never forms", [
            f"--config={SMOKE}", *MOCK, f"--workdir={tmp_path / 'w8'}",
            f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
            "--process_id=0", "--distributed_timeout_s=3"], 2,
         "did not form within 3s"),
        ("log file and checkpoints cannot be written", [
            f"--config={SMOKE}", *MOCK, f"--workdir={tmp_path / 'w9'}"], 1,
         "File too large while writing"),
        ("missing config", ["--config=configs/nope.py", "--workdir=/tmp/x"], 2,
         "does not exist"),
        ("unknown preset", [f"--config={helpers.CONFIGS}/cifar_cnn.py:huge"], 2,
         "Unknown preset 'huge'"),
        ("unknown field", [f"--config={SMOKE}", "--config.batch_sise=3"], 2,
         "batch_size"),
        ("bad type", [f"--config={SMOKE}", "--config.batch_size=abc"], 2,
         "invalid literal"),
        ("warmup beyond the run", [f"--config={SMOKE}", *MOCK,
                                   f"--workdir={tmp_path / 'w1'}",
                                   "--config.lr_schedule=cosine",
                                   "--config.warmup_steps=1000"], 2, "warmup_steps"),
        ("workdir is a file", [f"--config={SMOKE}", *MOCK, f"--workdir={blocker}"],
         2, "is a file"),
        ("--step in train mode", [f"--config={SMOKE}", "--step=3"], 2, "--step"),
        ("label mismatch", [f"--config={SMOKE}", *MOCK, f"--workdir={tmp_path / 'w2'}",
                            "--config.model_kwargs.num_classes=5"], 2,
         "outputs 5 classes but the dataset has 10"),
        ("model change", [f"--config={SMOKE}", *MOCK, f"--workdir={trained}",
                          "--allow_config_change", "--config.num_epochs=3",
                          "--config.model_kwargs.num_classes=12"], 2,
         "could be restored"),
        ("corrupt checkpoints", [f"--config={SMOKE}", *MOCK,
                                 f"--workdir={_corrupted(trained, tmp_path)}",
                                 "--config.num_epochs=3"], 2,
         "start again in a new --workdir"),
        ("non-finite loss", [f"--config={SMOKE}", *MOCK,
                             f"--workdir={tmp_path / 'w3'}",
                             "--config.learning_rate=1e6"], 1,
         "no checkpoint had been saved"),
        ("top_k beyond the vocabulary", [
            "--mode=sample", f"--workdir={trained_text}", "--config.sample.top_k=1000"],
         2, "top_k=1000 but the model knows only 11 characters"),
        ("sample from an image model", [
            f"--config={text_config}", "--mode=sample", f"--workdir={trained}"], 2,
         "could not be restored"),
        ("disk full (file size limit)", [f"--config={SMOKE}", *MOCK,
                                         f"--workdir={tmp_path / 'w4'}"], 1,
         "File too large while writing"),
    ]


def test_foreseeable_errors_are_one_line(trained, trained_text, tmp_path):
    """Each case exits with status 2 (usage) or 1 (runtime) and at most 3
    lines on stderr, without a traceback."""
    for name, argv, status, phrase in _cases(trained, trained_text, tmp_path):
        limit = {"disk full (file size limit)": 100,
                 "log file and checkpoints cannot be written": 8}.get(name)
        code, stdout, stderr = _run(*argv, limit_file_kb=limit)
        lines = stderr.strip().splitlines()
        # A checkpoint is reported only once it is on disk.
        assert code == 0 or "trained to step" not in stdout, (name, stdout)
        assert code == status and phrase in stderr and len(lines) <= 3, (
            name, code, stderr[-3000:])
        assert "Traceback" not in stderr, (name, stderr[-3000:])


def test_eval_and_sample_take_overrides_with_the_workdir_alone(trained):
    code, stdout, stderr = _run("--mode=eval", f"--workdir={trained}",
                                "--config.eval_split=test[:10]")
    assert code == 0, stderr
    assert stdout.startswith("step 12: test[:10] loss"), stdout


def test_training_prints_a_line_per_epoch_and_nothing_else(tmp_path):
    code, stdout, stderr = _run(f"--config={SMOKE}", *MOCK,
                                f"--workdir={tmp_path / 'quiet'}")
    assert code == 0, stderr
    lines = stdout.strip().splitlines()
    assert len(lines) == 3, stdout
    assert lines[0].startswith("epoch 1/2: train loss ")
    assert lines[1].startswith("epoch 2/2: train loss ")
    assert lines[2].startswith("trained to step 12 in ")
    assert len(lines) + len(stderr.strip().splitlines()) <= 15, stderr
    with open(tmp_path / "quiet" / "train.log") as f:
        assert "Compiled the train and eval functions" in f.read()


def test_longer_run_refused_where_the_schedule_depends_on_its_length(tmp_path):
    """num_epochs is free for a constant rate (above); with a cosine decay a
    longer run would restart the decay mid-course: refused, saying why."""
    workdir = str(tmp_path / "cosine")
    cosine = {"lr_schedule": "cosine", "end_learning_rate": 1e-5}
    helpers.mocked(train.train_and_evaluate, helpers.tiny_config(**cosine),
                   workdir, stop_after_step=4)
    with pytest.raises(errors.UserError, match=r"num_epochs: 2 -> 4 \(the run's "
                       r"length shapes its cosine learning rate.*allow_config_change"):
        helpers.mocked(train.train_and_evaluate,
                       helpers.tiny_config(num_epochs=4, **cosine), workdir)
    result = helpers.mocked(train.train_and_evaluate,
                            helpers.tiny_config(num_epochs=4, **cosine),
                            workdir, allow_config_change=True)
    assert result["step"] == 24


def test_eval_beside_training_reads_the_checkpoint_that_replaced_its_own(
        trained, tmp_path, monkeypatch):
    """A run saving with keep_checkpoints=1 deletes the checkpoint an
    evaluation is reading: the evaluation reads the new latest one."""
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    from research import evaluate  # pylint: disable=g-import-not-at-top
    workdir = str(tmp_path / "run")
    shutil.copytree(trained, workdir)
    checkpoints = os.path.join(workdir, "checkpoints")
    latest = max(helpers.saved_steps(workdir))
    # What the trainer does meanwhile: a newer checkpoint, the read one gone.
    newer = os.path.join(checkpoints, str(latest + 1))
    restore = ocp.CheckpointManager.restore
    calls = []

    def racing_restore(self, step, *args, **kwargs):
        calls.append(step)
        if len(calls) == 1:
            shutil.copytree(os.path.join(checkpoints, str(step)), newer)
            shutil.rmtree(os.path.join(checkpoints, str(step)))
            raise FileNotFoundError(2, "No such file or directory",
                                    os.path.join(checkpoints, str(step)))
        return restore(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", racing_restore)
    result = helpers.mocked(evaluate.evaluate,
                            config_lib.load_workdir_config(workdir), workdir)
    assert calls == [latest, latest + 1] and result["step"] == latest + 1
    # An explicit --step is not swapped for another one.
    calls.clear()
    with pytest.raises(errors.UserError, match="could not be restored"):
        helpers.mocked(evaluate.evaluate, config_lib.load_workdir_config(workdir),
                       workdir, latest + 1)


def test_os_errors_say_what_they_are(tmp_path, capsys):
    """Only a full disk (or a size limit) is reported as one."""
    from research import cli  # pylint: disable=g-import-not-at-top

    def fail(error):
        def fn(argv):
            raise RuntimeError("restore failed") from error
        with pytest.raises(SystemExit) as exited:
            cli.guarded(fn, [])
        assert exited.value.code == 1
        return capsys.readouterr().err.strip()

    missing = fail(FileNotFoundError(2, "No such file or directory", "/w/ckpt/7"))
    assert missing.startswith("error: No such file or directory: /w/ckpt/7 (")
    assert "free space" not in missing
    full = fail(OSError(28, "No space left on device", "/w/ckpt/8"))
    assert "No space left on device while writing /w/ckpt/8; free space" in full


def test_a_fresh_start_sets_earlier_metrics_aside(tmp_path):
    """Checkpoints and config.json deleted, metrics left: the new run's
    metrics do not overlay the old ones, which are kept."""
    workdir = str(tmp_path / "run")
    config = helpers.tiny_config()
    helpers.mocked(train.train_and_evaluate, config, workdir)
    old = writers.read_metrics(workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints"))
    os.remove(os.path.join(workdir, "config.json"))
    helpers.mocked(train.train_and_evaluate, config, workdir, stop_after_step=4)
    (earlier,) = os.listdir(os.path.join(workdir, "earlier"))
    earlier = os.path.join(workdir, "earlier", earlier)
    assert writers.read_metrics(earlier) == old
    assert any(n.startswith("events.out.tfevents.") for n in os.listdir(earlier))
    assert max(r["step"] for r in writers.read_metrics(workdir)) == 4
    events = [n for n in os.listdir(workdir) if n.startswith("events.out.tfevents.")]
    assert len(events) == 1


def test_pipelines_pass_allow_config_change_and_check_every_stage_first(
        tmp_path, monkeypatch):
    from research import compress, sweep  # pylint: disable=g-import-not-at-top
    seen = []

    def fake_train(config, workdir, allow_config_change=False):
        seen.append(allow_config_change)
        raise errors.UserError("stop here")

    monkeypatch.setattr(train, "train_and_evaluate", fake_train)
    sweep_config = config_lib.load_config(
        os.path.join(helpers.CONFIGS, "pipelines/diloco_cifar.py"))
    compress_config = config_lib.load_config(
        os.path.join(helpers.CONFIGS, "pipelines/compress_cifar.py"))
    for run in (lambda: sweep.run(sweep_config, str(tmp_path / "s"), True),
                lambda: compress.run(compress_config, str(tmp_path / "c"), True)):
        with pytest.raises(errors.UserError, match="stop here"):
            run()
    assert seen == [True, True]
    # A bad distillation setting stops before the teacher trains.
    with compress_config.unlocked():
        compress_config.distill.temperature = 0.0
    with pytest.raises(errors.UserError, match="config.distill.temperature must be"):
        compress.run(compress_config, str(tmp_path / "c2"))
    assert seen == [True, True]


def test_joining_another_server_ends_in_one_line(tmp_path):
    """Process 1 pointed at an address where some other server listens."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)  # the kernel accepts; nothing ever answers
        port = server.getsockname()[1]
        start = time.time()
        code, _, stderr = _run(f"--config={SMOKE}", *MOCK,
                               f"--workdir={tmp_path / 'w'}",
                               f"--coordinator_address=127.0.0.1:{port}",
                               "--num_processes=2", "--process_id=1",
                               "--distributed_timeout_s=3")
    assert code == 2 and "did not form within 3s" in stderr, stderr[-2000:]
    assert len(stderr.strip().splitlines()) == 1 and time.time() - start < 60


def test_replicas_that_do_not_fit_name_the_choices():
    from research import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
    with pytest.raises(errors.UserError, match=r"replicas=4 does not divide the 1 "
                       r"devices .*pick one of 1, or run on more devices"):
        mesh_lib.create_mesh(1, replicas=4)
