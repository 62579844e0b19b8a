"""DiLoCo (research/parallel/diloco.py) on 8 simulated devices and 2 real processes.

Multi-device checks run in subprocesses: the device count is fixed when JAX
starts. One worker runs the in-process checks and reports them as JSON.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers

DILOCO = {"data_parallel.scheme": "diloco", "data_parallel.replicas": 4}
# H = 1, outer SGD lr 1 without momentum: synchronous SGD, up to rounding.
AS_SYNC = {**DILOCO, "data_parallel.sync_every": 1,
           "data_parallel.outer_learning_rate": 1.0,
           "data_parallel.outer_momentum": 0.0, "momentum": 0.0}


def _groups(hlo_line: str, devices: int) -> list[list[int]]:
    """The replica groups of one collective in compiled HLO text (explicit
    `{{0,1},{2,3}}` or iota `[4,2]<=[8]`, optionally transposed)."""
    found = re.search(r"replica_groups=(\{\{[\d,{}]*\}\}|\{\})", hlo_line)
    if found:
        text = found.group(1)
        if text == "{}":
            return [list(range(devices))]
        return [[int(x) for x in g.split(",") if x]
                for g in re.findall(r"\{([\d,]*)\}", text[1:-1])]
    found = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", hlo_line)
    if found:  # mesh['axis_0'=4,'axis_1'=2] {'axis_1'}: groups along axis_1
        dims = re.findall(r"'(\w+)'=(\d+)", found.group(1))
        grouped = re.findall(r"'(\w+)'", found.group(2))
        ids = np.arange(devices).reshape([int(n) for _, n in dims])
        inside = [i for i, (name, _) in enumerate(dims) if name in grouped]
        outside = [i for i in range(len(dims)) if i not in inside]
        size = int(np.prod([ids.shape[i] for i in inside]))
        return ids.transpose(outside + inside).reshape(-1, size).tolist()
    found = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](T\(([\d,]+)\))?",
                      hlo_line)
    assert found, hlo_line
    rows, cols = int(found.group(1)), int(found.group(2))
    ids = np.arange(int(np.prod([int(x) for x in found.group(3).split(",")])))
    ids = ids.reshape([int(x) for x in found.group(3).split(",")])
    if found.group(5):
        ids = ids.transpose([int(x) for x in found.group(5).split(",")])
    return ids.reshape(rows, cols).tolist()


def _carries_arrays(line: str) -> bool:
    """Whether a collective moves more than scalars (its result shapes)."""
    result = line.split("=", 1)[1].split(" all-")[0].split(" reduce-")[0]
    return any(dims for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", result))


def _cross_replica_collectives(hlo: str, devices: int, replicas: int) -> list[str]:
    """Collectives whose groups mix devices of different replicas (replica r
    holds the mesh's devices r * n / K ... (r + 1) * n / K - 1) and that move
    arrays, not scalars (the step's summed loss and counts are scalars)."""
    per = devices // replicas
    mixed = []
    for line in hlo.splitlines():
        if not re.search(r"\s(all-reduce|all-gather|reduce-scatter|all-to-all|"
                         r"collective-permute)(-start)?\(", line):
            continue
        if "collective-permute" in line:
            pairs = re.findall(r"\{(\d+),(\d+)\}", line.split("source_target_pairs=")[1])
            if any(int(a) // per != int(b) // per for a, b in pairs):
                mixed.append(line.strip()[:200])
            continue
        if any(len({d // per for d in g}) > 1 for g in _groups(line, devices)) and (
                _carries_arrays(line)):
            mixed.append(line.strip()[:200])
    return mixed


# --- run inside a subprocess with 8 devices ---------------------------------

def _worker(workdir: str) -> dict:
    import functools  # pylint: disable=g-import-not-at-top
    from research import mesh as mesh_lib
    from research.parallel import diloco
    from research import assembly, train  # noqa: E401
    from research.core import steps  # noqa: E401
    assert jax.device_count() == 8
    out = {}
    one = mesh_lib.create_mesh(1)

    def params(config, run_dir):
        return assembly.restore_variables(config, run_dir, mesh=one).variables

    # H = 1 equals synchronous training: LeNet and the character LSTM.
    for name, make, run in (
            ("lenet", lambda **o: helpers.tiny_config(
                num_devices=8, batch_size=16, learning_rate=0.01, **o),
             helpers.mocked),
            # Plain SGD inside (Adam's and clipping's updates are not linear
            # in the gradient: K replicas' mean update differs from sync's).
            ("char_rnn", lambda **o: helpers.rnn_tiny_config(
                num_devices=4, batch_size=8, eval_batch_size=4, optimizer="sgd",
                learning_rate=0.5, grad_clip_norm=0.0, lr_schedule="constant",
                warmup_steps=0, **{"model_kwargs.dropout_rate": 0.0}, **o),
             helpers.rnn_mocked)):
        variables = {}
        for scheme, overrides in (("sync", {"momentum": 0.0}), ("diloco", AS_SYNC)):
            config = make(**overrides)
            run_dir = os.path.join(workdir, f"{name}_{scheme}")
            run(train.train_and_evaluate, config, run_dir)
            variables[scheme] = params(config, run_dir)
        out[name] = helpers.max_diff(variables["sync"], variables["diloco"])

    # The compiled inner step: no collective between replicas (K = 4 of 2
    # devices, K = 8 of 1); the outer step: collectives across them. LeNet,
    # the BatchNorm ConvNet (its statistics stay per replica too) and the
    # character LSTM.
    images = {"image": jax.numpy.zeros((16, 32, 32, 3)),
              "label": jax.numpy.zeros((16,), jax.numpy.int32)}
    cases = [("lenet", k, helpers.tiny_config, images) for k in (4, 8)] + [
        ("convnet", 4, functools.partial(
            helpers.tiny_config, model="convnet", model_kwargs={
                "features": (8, 16), "num_classes": 10, "dropout_rate": 0.0}),
         images),
        ("char_rnn", 4, functools.partial(helpers.rnn_tiny_config,
                                          eval_batch_size=8),
         {"tokens": jax.numpy.zeros((16, 9), jax.numpy.int32)})]
    for name, k, make, batch in cases:
        config = make(num_devices=8, batch_size=16, **{
            **DILOCO, "data_parallel.replicas": k})
        exp = assembly.build(config, info={"vocab": " abcdefghij"}
                             if name == "char_rnn" else None)
        state = exp.create_state(jax.random.key(0), total_steps=100)
        batch = jax.device_put(batch, mesh_lib.batch_sharded(exp.mesh))
        inner = functools.partial(steps.train_step, objective=exp.objective)
        with jax.set_mesh(exp.mesh):
            hlo_inner = jax.jit(functools.partial(
                diloco.inner_steps, inner_step=inner, mesh=exp.mesh)).lower(
                    state, batch, jax.random.key(0), {}).compile().as_text()
            hlo_sync = jax.jit(diloco._sync).lower(state).compile().as_text()  # pylint: disable=protected-access
        tag = f"{name}_{k}"
        out[f"inner_mixed_{tag}"] = _cross_replica_collectives(hlo_inner, 8, k)
        out[f"inner_collectives_{tag}"] = sum(
            1 for line in hlo_inner.splitlines()
            if re.search(r"\sall-reduce(-start)?\(", line) and _carries_arrays(line))
        out[f"sync_mixed_{tag}"] = len(_cross_replica_collectives(hlo_sync, 8, k))
    return out


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("diloco8"))
    proc = subprocess.run(
        [sys.executable, __file__, "worker", workdir], env=helpers.device_env(8),
        cwd=helpers.REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("model", ["lenet", "char_rnn"])
def test_one_step_periods_with_plain_outer_sgd_equal_synchronous_training(
        eight_devices, model):
    assert eight_devices[model] < helpers.TOLERANCE, eight_devices[model]


@pytest.mark.parametrize("tag", ["lenet_4", "lenet_8", "convnet_4", "char_rnn_4"])
def test_inner_steps_never_talk_across_replicas(eight_devices, tag):
    assert eight_devices[f"inner_mixed_{tag}"] == [], eight_devices[f"inner_mixed_{tag}"]
    if tag.endswith("_4"):  # K = 4 of 2 devices: reduced within each replica ...
        assert eight_devices[f"inner_collectives_{tag}"] > 0
    else:  # ... and K = 8 of 1 device: no array is reduced at all (the loss
        # and counts for the log are scalars).
        assert eight_devices[f"inner_collectives_{tag}"] == 0
    # The outer step does cross replicas (the checker sees such collectives).
    assert eight_devices[f"sync_mixed_{tag}"] > 0


def test_communication_is_counted_from_the_schedule():
    from research.parallel import diloco  # pylint: disable=g-import-not-at-top
    params = {"w": np.zeros((10, 10), np.float32), "b": np.zeros(10, np.float32)}
    opts = diloco.Options(replicas=4, sync_every=16, outer_learning_rate=0.7,
                          outer_momentum=0.9, delayed=False)
    state = diloco.DilocoState(inner=None, outer_params=params, outer_model_state={},
                               outer_opt_state=None, pending=None, anchor={},
                               final_step=70, options=opts)
    scheme = diloco.Diloco(opts)
    assert scheme.communication(state, 64, 8, final_step=70) == {
        "comm/syncs": 4.0, "comm/bytes_per_step": 440 * 4 / 64}
    # The last sync, after the final step (70 = 4 * 16 + 6), counts too.
    assert scheme.communication(state, 70, 8, final_step=70)["comm/syncs"] == 5.0


@pytest.mark.parametrize("delayed", [False, True])
def test_one_replica_with_plain_outer_sgd_is_plain_training(tmp_path, delayed):
    """K = 1, outer lr 1, no momentum: the outer step hands the replica its
    own parameters back. Delayed, the replica must still never lose its own
    progress (it goes on from the stale outer model plus its share, here all,
    of its latest change), and the last sync (step 12, mid-period for H = 5)
    leaves the outer model equal to the trained one."""
    from research import train  # pylint: disable=g-import-not-at-top
    overrides = {**AS_SYNC, "data_parallel.replicas": 1,
                 "data_parallel.sync_every": 5, "data_parallel.delayed": delayed,
                 "momentum": 0.9}
    runs = {}
    for name, config in (("sync", helpers.tiny_config()),
                         ("diloco", helpers.tiny_config(**overrides))):
        helpers.mocked(train.train_and_evaluate, config, str(tmp_path / name))
        runs[name] = helpers.final_params(config, str(tmp_path / name))
    assert helpers.max_diff(runs["sync"], runs["diloco"]) < helpers.TOLERANCE


def test_wall_clock_model_charges_syncs_and_hides_delayed_ones():
    from research.parallel import wallclock  # pylint: disable=g-import-not-at-top
    # 4 participants, 8 MB over 8 Gbit/s (1 GB/s), no latency: 2 * 3 * 2 ms.
    assert wallclock.allreduce_seconds(8e6, 4, 8.0, 0.0) == pytest.approx(0.012)
    sync = wallclock.modeled_step_seconds(0.1, 8e6, 4, 8.0, 0.0)
    every_16 = wallclock.modeled_step_seconds(0.1, 8e6, 4, 8.0, 0.0, sync_every=16)
    delayed = wallclock.modeled_step_seconds(0.1, 8e6, 4, 8.0, 0.0, sync_every=16,
                                          delayed=True)
    assert sync == pytest.approx(0.112) and every_16 == pytest.approx(0.10075)
    assert delayed == 0.1  # 12 ms of all-reduce hide behind 1.6 s of compute
    assert "| 1024 | 100 Gbit/s |" in wallclock.wall_clock_table(0.1, 8e6, latency_s=1e-4)


def test_sweep_chooses_on_validation_then_scores_test_once(tmp_path, monkeypatch):
    """Every variant with the first seed; the baseline and the candidates
    with each seed; the candidate with the best mean validation score is
    chosen (not the best single run); only the baseline and it see the test
    split; the table shows each run beside its seed's baseline run."""
    from research import errors, evaluate, runner, sweep, train  # pylint: disable=g-import-not-at-top
    from research.core import config_lib  # pylint: disable=g-import-not-at-top
    # Validation accuracy per (variant, seed): "b" has the best single run,
    # "a" the best mean over the seeds.
    valid = {("sync", 0): 0.50, ("sync", 1): 0.52, ("other", 0): 0.40,
             ("a", 0): 0.55, ("a", 1): 0.55, ("b", 0): 0.70, ("b", 1): 0.30}
    trained, tested = [], []

    def fake_train(config, workdir, allow_config_change=False):
        variant = os.path.basename(workdir).rsplit("_seed", 1)[0]
        trained.append((variant, config.seed, config.eval_split))
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": 8, "comm/syncs": 2.0,
                                "comm/bytes_per_step": 1e6}) + "\n")
        return {"step": 8, "eval/accuracy": valid[variant, config.seed]}

    def fake_evaluate(config, workdir, step=None):
        tested.append((os.path.basename(workdir), config.eval_split))
        return {"eval/accuracy": 0.1 * (1 + config.seed), "step": 8}

    monkeypatch.setattr(train, "train_and_evaluate", fake_train)
    monkeypatch.setattr(evaluate, "evaluate", fake_evaluate)
    config = config_lib.load_config(
        os.path.join(helpers.CONFIGS, "pipelines/diloco_cifar.py:smoke"))
    with config.unlocked():
        for name in ("other", "a", "b"):
            config.variants[name] = {"data_parallel": {"sync_every": 4}}
        config.order = ("sync", "other")
        config.choose.among = ("a", "b")
    rows = sweep.run(config, str(tmp_path))
    assert [(v, s) for v, s, _ in trained] == [
        ("sync", 0), ("other", 0), ("a", 0), ("b", 0), ("sync", 1), ("a", 1), ("b", 1)]
    assert {split for _, _, split in trained} == {"train[512:768]"}
    assert sorted(tested) == [(f"{v}_seed{s}", "test[:256]")
                              for v in ("a", "sync") for s in (0, 1)]
    path = str(tmp_path / "sweep_results.json")
    written = json.loads((tmp_path / "sweep_results.json").read_text())
    assert written["rows"] == rows == runner.read_rows(path)
    assert written["summary"]["chosen"] == "a" and written["about"]["seeds"] == [0, 1]
    assert written["summary"]["chosen_by"]["means_over_seeds"] == pytest.approx(
        {"a": 0.55, "b": 0.50})
    assert set(written["about"]) == {"command", "commit", "machine", "date", "seeds"}
    lines = (tmp_path / "sweep_results.md").read_text().splitlines()
    assert lines[0].startswith("<!-- written by: ") and "commit " in lines[1]
    assert "| b | 1 | 8 | 0.3000 (-0.2200) | 2 | 1.000 |" in "\n".join(lines)
    assert any("**a**" in line for line in lines)
    # sync: test 0.1 and 0.2 (seeds 0, 1); a the same, so +0.0000.
    assert "| a | 0, 1 | 0.5500 ± 0.0000 | 0.1500 ± 0.0707 (+0.0000) | " \
        "0.5500, 0.5500 | 0.1000, 0.2000 |" in lines, lines
    # A candidate not chosen: no test score.
    assert "| b | 0, 1 | 0.5000 ± 0.2828 | - | 0.7000, 0.3000 | - |" in lines, lines
    # Rerun: the runs only evaluate (no new metric records); their rows keep
    # the times they took when they trained.
    again = sweep.run(config, str(tmp_path))
    assert [r["seconds"] for r in again] == [r["seconds"] for r in rows]
    # A candidate no variant has is refused before any run.
    with config.unlocked():
        config.choose.among = ("a", "nope")
    with pytest.raises(errors.UserError, match=r"\['nope'\]"):
        sweep.run(config, str(tmp_path / "x"))


def test_bad_options_are_named():
    from research import errors  # pylint: disable=g-import-not-at-top
    with pytest.raises(errors.UserError, match="scheme='diloco' does not combine"):
        helpers.mocked(lambda: __import__("research.assembly").assembly.build(
            helpers.tiny_config(**DILOCO, ema_decay=0.9)))
    with pytest.raises(errors.UserError, match="choose from"):
        helpers.mocked(lambda: __import__("research.assembly").assembly.build(
            helpers.tiny_config(**{"data_parallel.scheme": "gossip"})))


# --- through main, in processes ---------------------------------------------

def _args(workdir, data_dir, *extra):
    from tests import tiny_tfds  # pylint: disable=g-import-not-at-top
    return [f"--config={helpers.SMOKE}", f"--workdir={workdir}",
            "--config.train_split=train", "--config.eval_split=test",
            f"--config.dataset={tiny_tfds.NAME}", f"--config.data_dir={data_dir}",
            "--config.data_parallel.scheme=diloco", "--config.data_parallel.replicas=2",
            "--config.data_parallel.sync_every=4", "--config.batch_size=8",
            "--config.steps_per_call=1", *extra]


def _tiny_data(tmp_path):
    from tests import tiny_tfds  # pylint: disable=g-import-not-at-top
    data_dir = str(tmp_path / "tfds")
    tiny_tfds.prepare(data_dir)
    tiny_tfds.register()
    return data_dir


@pytest.mark.slow
@pytest.mark.parametrize("delayed", [False, True])
def test_resume_between_syncs_after_sigkill_is_bitwise(tmp_path, delayed):
    """Killed after a checkpoint in the middle of a period (checkpoints every
    3 steps, syncs every 4), the rerun ends where an uninterrupted run does
    (delayed: the pending change and the replicas' anchors restored too)."""
    from research.core import config_lib  # pylint: disable=g-import-not-at-top
    from research import assembly  # pylint: disable=g-import-not-at-top
    data_dir = _tiny_data(tmp_path)
    long_run = ("--config.num_epochs=40", "--config.checkpoint_every_steps=3",
                "--config.log_every_steps=1000",
                f"--config.data_parallel.delayed={delayed}")
    workdir = str(tmp_path / "killed")
    log = str(tmp_path / "killed.log")
    proc = helpers.spawn_main(_args(workdir, data_dir, *long_run), 8, log)
    deadline = time.time() + 240
    while not (os.path.isdir(os.path.join(workdir, "checkpoints"))
               and [s for s in helpers.saved_steps(workdir) if s % 4]):
        assert proc.poll() is None and time.time() < deadline, open(log).read()[-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert helpers.saved_steps(workdir)[-1] < 240  # killed before the end
    assert helpers.spawn_main(_args(workdir, data_dir, *long_run), 8, log).wait(
        timeout=300) == 0, open(log).read()[-3000:]
    straight = str(tmp_path / "straight")
    assert helpers.spawn_main(_args(straight, data_dir, *long_run), 8, log).wait(
        timeout=300) == 0, open(log).read()[-3000:]
    config = config_lib.load_workdir_config(straight)
    helpers.assert_trees_equal(
        assembly.restore_variables(config, workdir).variables,
        assembly.restore_variables(config, straight).variables)
    # (Equal outer parameters long after the kill: the replicas' states and
    # the outer optimizer's, which feed every later sync, were restored too.)


def test_two_processes_save_and_eight_devices_resume(tmp_path):
    """2 processes x 2 devices (gloo; each replica one process's devices)
    train 6 steps; one process with 8 devices extends the run to step 12 and
    matches the same extension on 2 processes, up to reduction order. (Both
    end step 6 with the last sync, so a run straight to 12 differs.)"""
    from research.core import config_lib  # pylint: disable=g-import-not-at-top
    from research import assembly  # pylint: disable=g-import-not-at-top
    data_dir = _tiny_data(tmp_path)

    def two(workdir, epochs, name):
        port = helpers.free_port()
        procs = [helpers.spawn_main(_args(
            workdir, data_dir, f"--config.num_epochs={epochs}",
            f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
            "--distributed_timeout_s=60", f"--process_id={i}"), 2,
            str(tmp_path / f"{name}{i}.log")) for i in range(2)]
        codes = [p.wait(timeout=300) for p in procs]
        assert codes == [0, 0], (tmp_path / f"{name}0.log").read_text()[-3000:]

    split = str(tmp_path / "split")
    two(split, 1, "first")     # 48 examples at batch 8: 6 steps an epoch
    assert helpers.saved_steps(split)[-1] == 6
    log = str(tmp_path / "eight.log")
    assert helpers.spawn_main(_args(split, data_dir, "--config.num_epochs=2"),
                              8, log).wait(timeout=300) == 0, open(log).read()[-3000:]
    straight = str(tmp_path / "straight")
    two(straight, 1, "straight")
    two(straight, 2, "straight")
    config = config_lib.load_workdir_config(straight)
    resumed = assembly.restore_variables(config, split)
    assert resumed.step == 12
    assert helpers.max_diff(
        resumed.variables, assembly.restore_variables(config, straight).variables
    ) < helpers.TOLERANCE


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    sys.path.insert(0, helpers.REPO)
    print(json.dumps(_worker(sys.argv[2])))


def _reference_diloco(outer, targets, *, steps, h, lr, mu, inner_lr, delayed):
    """DiLoCo in NumPy, written from the paper (and, delayed, from the eager
    updates of arXiv:2502.12996): K replicas take inner steps
    theta <- theta - inner_lr (theta - target_r,t); every h steps and after the
    last the outer Nesterov SGD step takes the mean change (outer - theta_r).
    Delayed: the step at the end of period p applies period p - 1's mean
    change, each replica goes on from the result plus 1/K of its own change,
    and the last sync applies both."""
    k = len(targets)
    m = np.zeros_like(outer)

    def nesterov(x, g):
        nonlocal m
        m = mu * m + g
        return x - lr * (g + mu * m)

    theta = np.repeat(outer[None], k, axis=0)
    anchor, pending = theta.copy(), np.zeros_like(outer)
    history = []
    for t in range(1, steps + 1):
        theta = theta - inner_lr * (theta - targets[:, t - 1])
        if t % h and t != steps:
            continue
        if not delayed:
            outer = nesterov(outer, (outer[None] - theta).mean(0))
            theta = np.repeat(outer[None], k, axis=0)
        else:
            change = anchor - theta
            outer = nesterov(outer, pending)
            if t == steps:
                outer = nesterov(outer, change.mean(0))
                pending, theta = np.zeros_like(outer), np.repeat(outer[None], k, 0)
            else:
                pending, theta = change.mean(0), outer[None] - change / k
            anchor = theta.copy()
        history.append((t, outer.copy(), theta.copy()))
    return history


@pytest.mark.parametrize("delayed", [False, True])
def test_outer_nesterov_and_the_delayed_variant_follow_a_numpy_reference(delayed):
    """K = 4 replicas, H = 3, outer momentum 0.9, 11 steps (three full
    periods and a last partial one): the outer parameters and every
    replica's after each sync equal the NumPy reference of the algorithm."""
    import optax  # pylint: disable=g-import-not-at-top
    from research.core import state as state_lib  # pylint: disable=g-import-not-at-top
    from research.parallel import diloco  # pylint: disable=g-import-not-at-top
    k, h, steps, lr, mu, inner_lr = 4, 3, 11, 0.7, 0.9, 0.3
    rng = np.random.default_rng(0)
    start = rng.normal(size=5).astype(np.float32)
    targets = rng.normal(size=(k, steps, 5)).astype(np.float32)
    expected = _reference_diloco(start.astype(np.float64), targets, steps=steps,
                                 h=h, lr=lr, mu=mu, inner_lr=inner_lr,
                                 delayed=delayed)
    opts = diloco.Options(replicas=k, sync_every=h, outer_learning_rate=lr,
                          outer_momentum=mu, delayed=delayed)
    state = diloco.create(state_lib.TrainState.create(
        apply_fn=None, variables={"params": {"w": jnp.asarray(start)}},
        tx=optax.identity()), opts, final_step=steps)
    sync = jax.jit(diloco._sync)  # pylint: disable=protected-access
    got = []
    for t in range(1, steps + 1):
        theta = state.inner.params["w"]
        theta = theta - inner_lr * (theta - targets[:, t - 1])
        state = state.replace(inner=state.inner.replace(
            params={"w": theta}, step=jnp.full((k,), t, jnp.int32)))
        if t % h == 0 or t == steps:
            state = sync(state, jnp.asarray(t == steps))
            got.append((t, np.asarray(state.outer_params["w"]),
                        np.asarray(state.inner.params["w"])))
    assert [t for t, _, _ in got] == [t for t, _, _ in expected] == [3, 6, 9, 11]
    for (t, outer, theta), (_, want_outer, want_theta) in zip(got, expected):
        np.testing.assert_allclose(outer, want_outer, rtol=1e-5, atol=1e-6,
                                   err_msg=f"outer params after step {t}")
        np.testing.assert_allclose(theta, want_theta, rtol=1e-5, atol=1e-6,
                                   err_msg=f"replica params after step {t}")
    # The momentum did something: without it the outer model differs.
    plain = _reference_diloco(start.astype(np.float64), targets, steps=steps, h=h,
                              lr=lr, mu=0.0, inner_lr=inner_lr, delayed=delayed)
    assert np.abs(plain[-1][1] - expected[-1][1]).max() > 1e-2
