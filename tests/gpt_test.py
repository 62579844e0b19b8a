"""The GPT language model and the sharded scheme (data, FSDP, tensor).

The mesh checks run in one subprocess with 8 simulated CPU devices: the same
run on 1 device and on meshes (data 8), (fsdp 8), (data 2, fsdp 2,
tensor 2) gives the same loss at every step and the same parameters, and a
checkpoint written on one mesh shape resumes on another."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers

STEPS = 54  # 9 epochs of the mocked text's 6 steps (batch 8)
RELATIVE = 1e-4  # the bar, per step and for the parameters
MESHES = {"data8": (8, 1, 1), "fsdp8": (1, 8, 1), "2x2x2": (2, 2, 2)}
WIDE, LIMIT_MIB = 256, 16  # a model that fits one device only when sharded


def gpt_config(**overrides):
    from research.core import config_lib  # pylint: disable=g-import-not-at-top
    values = {"data_dir": "/nonexistent/tfds", "seq_len": 8, "batch_size": 8,
              "eval_batch_size": 8, "model_kwargs.vocab_size": 11,
              "model_kwargs.context": 16, "num_epochs": 9, "log_every_steps": 1,
              "checkpoint_every_steps": 1000, "sample.prompt": "abc",
              "sample.length": 8}
    values.update(overrides)
    return config_lib.load_config(
        os.path.join(helpers.CONFIGS, "shakespeare_gpt.py:smoke"), values)


def sharded(data, fsdp, tensor, **overrides):
    return {"data_parallel.scheme": "sharded", "sharding.data": data,
            "sharding.fsdp": fsdp, "sharding.tensor": tensor, **overrides}


def test_greedy_decoding_with_the_cache_equals_decoding_without():
    from research.models import gpt  # pylint: disable=g-import-not-at-top
    from flax import linen as nn  # pylint: disable=g-import-not-at-top
    model = gpt.GPT(vocab_size=11, num_layers=2, width=32, num_heads=4, context=16)
    prompt = jax.random.randint(jax.random.key(1), (2, 3), 0, 11)
    variables = nn.meta.unbox(model.init(jax.random.key(0), prompt))
    cache = model.init_cache(2)
    tokens, last = prompt, None
    for i in range(8):
        fed = prompt if i == 0 else tokens[:, -1:]
        logits, mutated = model.apply({**variables, "cache": cache}, fed,
                                      decode=True, mutable=["cache"])
        cache, last = mutated["cache"], logits[:, -1]
        tokens = jnp.concatenate([tokens, jnp.argmax(last, -1)[:, None]], 1)
    cached = tokens
    tokens = prompt
    for _ in range(8):
        logits = model.apply(variables, tokens)
        tokens = jnp.concatenate([tokens, jnp.argmax(logits[:, -1], -1)[:, None]], 1)
    np.testing.assert_array_equal(cached, tokens)
    # And the cached logits are the full forward pass's at that position.
    np.testing.assert_allclose(last, model.apply(variables, tokens[:, :-1])[:, -1],
                               rtol=1e-5, atol=1e-5)


def test_parameters_and_activations_carry_logical_names():
    from research.models import gpt  # pylint: disable=g-import-not-at-top
    from flax import linen as nn  # pylint: disable=g-import-not-at-top
    model = gpt.GPT(vocab_size=11, num_layers=1, width=32, num_heads=4, context=16)
    specs = nn.get_partition_spec(jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))))
    leaves = jax.tree.leaves(specs["params"], is_leaf=lambda x: x is not None
                             and not isinstance(x, dict))
    assert leaves and all(len(tuple(s)) > 0 for s in leaves), specs
    block = specs["params"]["block0"]
    assert tuple(block["fc1"]["kernel"]) == ("embed", "mlp")
    # [width, heads * head_dim]: the merged axis split as the heads are.
    assert tuple(block["attention"]["query"]["kernel"]) == ("embed", "heads")
    assert tuple(block["attention"]["out"]["kernel"]) == ("heads", "embed")


def test_gpt_trains_evaluates_and_samples(tmp_path):
    from research import sample, train  # pylint: disable=g-import-not-at-top
    config = gpt_config(num_epochs=2, log_every_steps=4,
                        **{"model_kwargs.remat": "dots_saveable"})
    result = helpers.rnn_mocked(train.train_and_evaluate, config, str(tmp_path))
    assert result["step"] == 12 and np.isfinite(result["eval/loss"])
    assert result["eval/loss"] < np.log(11)  # learned something of the text
    text = helpers.rnn_mocked(sample.sample, config, str(tmp_path))
    assert text.startswith("abc") and len(text) == 3 + 8
    assert set(text) <= set(" abcdefghij")
    # A layout this process cannot hold (8 devices as 2x2x2, here 1):
    # sampled whole on one device, the same text.
    elsewhere = gpt_config(num_epochs=2, log_every_steps=4, **sharded(2, 2, 2),
                           **{"model_kwargs.remat": "dots_saveable"})
    assert helpers.rnn_mocked(sample.sample, elsewhere, str(tmp_path)) == text


def test_window_jitter_trains_and_resumes_bitwise(tmp_path):
    """Random window offsets (text rows wider by `window_jitter`): a run
    stopped after a checkpoint and resumed equals the straight run, and the
    cuts are not the fixed windows."""
    from research import train  # pylint: disable=g-import-not-at-top
    config = gpt_config(num_epochs=2, window_jitter=4, checkpoint_every_steps=4)
    straight = str(tmp_path / "straight")
    helpers.rnn_mocked(train.train_and_evaluate, config, straight)
    stopped = str(tmp_path / "stopped")
    helpers.rnn_mocked(train.train_and_evaluate, config, stopped, stop_after_step=4)
    result = helpers.rnn_mocked(train.train_and_evaluate, config, stopped)
    assert np.isfinite(result["eval/loss"])
    helpers.assert_trees_equal(helpers.final_params(config, straight),
                               helpers.final_params(config, stopped))
    fixed = str(tmp_path / "fixed")
    helpers.rnn_mocked(train.train_and_evaluate, gpt_config(num_epochs=2), fixed)
    assert helpers.max_diff(helpers.final_params(config, straight),
                            helpers.final_params(config, fixed)) > 1e-4


def test_bfloat16_compute_keeps_float32_master_weights(tmp_path):
    from research import train  # pylint: disable=g-import-not-at-top
    config = gpt_config(num_epochs=1, **{"model_kwargs.dtype": "bfloat16"})
    result = helpers.rnn_mocked(train.train_and_evaluate, config, str(tmp_path))
    assert np.isfinite(result["eval/loss"])
    params = helpers.final_params(config, str(tmp_path))
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}


def test_sampling_benchmark_times_cached_and_uncached_decoding():
    from research import sample  # pylint: disable=g-import-not-at-top
    from flax import linen as nn  # pylint: disable=g-import-not-at-top
    from research.models import gpt  # pylint: disable=g-import-not-at-top
    model = gpt.GPT(vocab_size=11, num_layers=2, width=32, num_heads=4, context=16)
    variables = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 1), int)))
    rows = sample.time_positions(model, variables, [1, 15], 2, steps=2, repeats=1)
    assert [r["position"] for r in rows] == [1, 15]
    assert all(r["cached_ms"] > 0 and r["uncached_ms"] > 0 for r in rows)


# --- 8 simulated devices, in a subprocess -----------------------------------

def _run(config, workdir, **kwargs):
    from research import train  # pylint: disable=g-import-not-at-top
    from research.core import writers  # pylint: disable=g-import-not-at-top
    helpers.rnn_mocked(train.train_and_evaluate, config, workdir, **kwargs)
    losses = [r["train/loss"] for r in writers.read_metrics(workdir)
              if "train/loss" in r]
    return losses, helpers.final_params(config, workdir)


def _layout(shape) -> dict:
    """Per-device shapes of one MLP kernel and its Adam moment, on a mesh."""
    from research import assembly  # pylint: disable=g-import-not-at-top
    exp = helpers.rnn_mocked(assembly.build, gpt_config(**sharded(*shape)))
    state = exp.create_state(jax.random.key(0), total_steps=10)
    kernel = state.params["block0"]["fc1"]["kernel"]
    moment = next(leaf for path, leaf in jax.tree_util.tree_flatten_with_path(
        state.opt_state)[0] if ".mu" in jax.tree_util.keystr(path)
        and "block0']['fc1" in jax.tree_util.keystr(path))
    return {"kernel": [list(kernel.shape),
                       list(kernel.addressable_shards[0].data.shape)],
            "moment": list(moment.addressable_shards[0].data.shape)}


def _worker(workdir: str) -> dict:
    assert jax.device_count() == 8
    from research import summary  # pylint: disable=g-import-not-at-top
    out = {f"layout_{name}": _layout(shape) for name, shape in MESHES.items()}
    found = helpers.rnn_mocked(summary.summarize, gpt_config(**sharded(1, 8, 1)),
                               timed_steps=0)
    out["summary_fsdp8"] = {k: found[k] for k in (
        "param_bytes", "param_bytes_per_device", "optimizer_bytes",
        "optimizer_bytes_per_device", "step_temp_bytes", "mesh")}
    one_losses, one_params = _run(gpt_config(num_devices=1),
                                  os.path.join(workdir, "one"))
    out["steps"] = len(one_losses)
    straight = {}
    for name, shape in MESHES.items():
        losses, params = _run(gpt_config(**sharded(*shape)),
                              os.path.join(workdir, name))
        straight[name] = params
        out[name] = {
            "loss_rel": max(abs(a - b) / abs(b) for a, b in zip(losses, one_losses)),
            "params_abs": helpers.max_diff(params, one_params),
            "steps": len(losses)}
    # Checkpoints move between mesh shapes: 2x2x2 on 8 devices -> 1 device,
    # and 1 device -> 1x8x1 on 8; and resume exactly on the same shape.
    for name, first, then, against in (
            ("8_to_1", sharded(2, 2, 2), sharded(1, 1, 1, num_devices=1), "one"),
            ("1_to_8", sharded(1, 1, 1, num_devices=1), sharded(1, 8, 1), "one"),
            ("same", sharded(2, 2, 2), sharded(2, 2, 2), "2x2x2")):
        run_dir = os.path.join(workdir, f"resume_{name}")
        _run(gpt_config(**first), run_dir, stop_after_step=20)
        _, params = _run(gpt_config(**then), run_dir)
        reference = one_params if against == "one" else straight[against]
        out[f"resume_{name}"] = helpers.max_diff(params, reference)
    out["memory_limit"] = _memory_limit(workdir)
    out["sampling"] = _sampling(os.path.join(workdir, "2x2x2"))
    return out


def _sampling(workdir: str) -> dict:
    """Greedy and nucleus sampling of the (2, 2, 2) run: sharded as it
    trained (the weights stay split), and on one device."""
    from research import assembly, sample  # pylint: disable=g-import-not-at-top
    out = {}
    for name, overrides in (("2x2x2", sharded(2, 2, 2)),
                            ("one", {"num_devices": 1})):
        for temperature in (0.0, 1.0):
            config = gpt_config(**overrides, **{"sample.temperature": temperature,
                                                "sample.top_p": 0.9})
            out[f"{name}_t{temperature:g}"] = helpers.rnn_mocked(
                sample.sample, config, workdir)
        restored = assembly.restore_variables(config, workdir, layout=True)
        kernel = restored.variables["params"]["block0"]["fc1"]["kernel"]
        out[f"{name}_fc1_shard"] = list(kernel.addressable_shards[0].data.shape)
        out[f"{name}_devices"] = len(kernel.sharding.device_set)
    return out


def _memory_limit(workdir: str) -> dict:
    """A GPT of width 256 needs ~30 MiB a device replicated, ~10 with FSDP 8:
    under a 16 MiB limit it is refused on 1 device and on (data 8), and
    trains on (fsdp 8)."""
    from research import errors  # pylint: disable=g-import-not-at-top
    from research import summary  # pylint: disable=g-import-not-at-top
    big = {"model_kwargs.width": WIDE, "device_memory_mib": LIMIT_MIB}
    out = {}
    for name, shape, n in (("one", (1, 1, 1), 1), ("data8", (8, 1, 1), 8),
                           ("fsdp8", (1, 8, 1), 8)):
        found = helpers.rnn_mocked(summary.summarize, gpt_config(
            **sharded(*shape, num_devices=n), **{"model_kwargs.width": WIDE}),
            timed_steps=0)
        out[f"{name}_needed_mib"] = found["step_needed_bytes"] / 2 ** 20
        try:
            losses, _ = _run(gpt_config(**sharded(*shape, num_devices=n), **big),
                             os.path.join(workdir, f"memory_{name}"))
            out[name] = {"losses": [losses[0], losses[-1]], "steps": len(losses)}
        except errors.UserError as e:
            out[name] = {"error": str(e)}
    return out


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("gpt8"))
    proc = subprocess.run(
        [sys.executable, __file__, "worker", workdir], env=helpers.device_env(8),
        cwd=helpers.REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print("gpt meshes:", json.dumps(result))  # the measured numbers (-s)
    return result


@pytest.mark.slow
@pytest.mark.parametrize("mesh", list(MESHES))
def test_meshes_follow_the_one_device_run(eight_devices, mesh):
    assert eight_devices["steps"] == STEPS
    found = eight_devices[mesh]
    assert found["steps"] == STEPS
    assert found["loss_rel"] < RELATIVE and found["params_abs"] < RELATIVE, found


@pytest.mark.slow
def test_fsdp_and_tensor_axes_split_the_weights_and_optimizer_state(eight_devices):
    # fc1's kernel is [width 32, mlp 128]: "embed" over fsdp, "mlp" over tensor.
    assert eight_devices["layout_data8"]["kernel"] == [[32, 128], [32, 128]]
    assert eight_devices["layout_fsdp8"]["kernel"] == [[32, 128], [4, 128]]
    assert eight_devices["layout_2x2x2"]["kernel"] == [[32, 128], [16, 64]]
    for mesh in MESHES:  # Adam's moments are split like the weights
        assert (eight_devices[f"layout_{mesh}"]["moment"]
                == eight_devices[f"layout_{mesh}"]["kernel"][1])


@pytest.mark.slow
def test_a_model_over_the_device_memory_limit_trains_with_fsdp(eight_devices):
    found = eight_devices["memory_limit"]
    for refused in ("one", "data8"):
        assert "device_memory_mib=16" in found[refused].get("error", ""), found
    assert "error" not in found["fsdp8"], found
    first, last = found["fsdp8"]["losses"]
    assert found["fsdp8"]["steps"] == STEPS and last < first, found


def test_a_train_step_over_the_memory_limit_is_refused_before_training(tmp_path):
    from research import errors  # pylint: disable=g-import-not-at-top
    with pytest.raises(errors.UserError, match="MiB per device") as caught:
        _run(gpt_config(device_memory_mib=LIMIT_MIB, num_devices=1,
                        **{"model_kwargs.width": WIDE}), str(tmp_path))
    assert "sharding.fsdp" in str(caught.value)
    assert not os.path.isdir(tmp_path / "checkpoints") or not os.listdir(
        tmp_path / "checkpoints")


@pytest.mark.slow
def test_summary_reports_what_one_device_holds(eight_devices):
    found = eight_devices["summary_fsdp8"]
    assert found["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    # Every GPT parameter has an "embed" axis: FSDP over 8 holds 1/8 of each.
    assert found["param_bytes_per_device"] * 8 == found["param_bytes"]
    assert found["optimizer_bytes_per_device"] * 8 < 1.01 * found["optimizer_bytes"]
    assert found["step_temp_bytes"] > 0  # XLA's memory analysis of the step


@pytest.mark.slow
def test_checkpoints_resume_on_other_mesh_shapes(eight_devices):
    assert eight_devices["resume_8_to_1"] < RELATIVE, eight_devices
    assert eight_devices["resume_1_to_8"] < RELATIVE, eight_devices
    assert eight_devices["resume_same"] == 0.0, eight_devices  # bitwise


@pytest.mark.slow
def test_sampling_runs_sharded_like_training(eight_devices):
    """A (2, 2, 2) run samples with its weights split as in training, and
    the text equals sampling on one device (greedy, and with a seed)."""
    found = eight_devices["sampling"]
    assert found["2x2x2_fc1_shard"] == [16, 64] and found["2x2x2_devices"] == 8
    assert found["one_fc1_shard"] == [32, 128] and found["one_devices"] == 1
    for t in ("0", "1"):
        assert found[f"2x2x2_t{t}"] == found[f"one_t{t}"], found
        assert found[f"one_t{t}"].startswith("abc") and len(found[f"one_t{t}"]) == 11


# research.main on mocked text (as `helpers.rnn_mocked`), for the kill test.
_CHILD = """
import sys
import tensorflow_datasets as tfds
from absl import app
from research import main
with tfds.testing.mock_data(num_examples=30):
    app.run(main.main, argv=sys.argv, flags_parser=main.parse_flags)
"""


def _spawn(workdir, overrides):
    argv = [sys.executable, "-c", _CHILD, "--config=" + os.path.join(
        helpers.CONFIGS, "shakespeare_gpt.py:smoke"), f"--workdir={workdir}"]
    argv += [f"--config.{k}={v}" for k, v in overrides.items()]
    with open(workdir + ".log", "ab") as log:  # a file: a full pipe would block
        return subprocess.Popen(argv, cwd=helpers.REPO, env=helpers.device_env(8),
                                stdout=subprocess.DEVNULL, stderr=log)


@pytest.mark.slow
def test_sigkill_on_a_sharded_mesh_resumes_bitwise(tmp_path):
    """(2, 2, 2) on 8 devices: killed after a checkpoint, rerun, it ends
    bitwise equal to an uninterrupted run on the same mesh."""
    import signal  # pylint: disable=g-import-not-at-top
    import time  # pylint: disable=g-import-not-at-top
    overrides = {"data_dir": "/nonexistent/tfds", "seq_len": 8, "batch_size": 8,
                 "eval_batch_size": 8, "model_kwargs.vocab_size": 11,
                 "model_kwargs.context": 16, "num_epochs": 40,  # 240 steps
                 "log_every_steps": 10, "checkpoint_every_steps": 10,
                 "data_parallel.scheme": "sharded", "sharding.data": 2,
                 "sharding.fsdp": 2, "sharding.tensor": 2}
    killed, straight = str(tmp_path / "killed"), str(tmp_path / "straight")
    proc = _spawn(killed, overrides)
    deadline = time.time() + 240
    while time.time() < deadline and not (
            os.path.isdir(os.path.join(killed, "checkpoints"))
            and len(helpers.saved_steps(killed)) >= 2):
        assert proc.poll() is None, open(killed + ".log").read()[-3000:]
        time.sleep(0.05)
    proc.kill()  # no handler runs; an async save may be half-written
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert helpers.saved_steps(killed)[-1] < 240
    for workdir in (killed, straight):
        proc = _spawn(workdir, overrides)
        assert proc.wait(timeout=600) == 0, open(workdir + ".log").read()[-3000:]
    config = gpt_config(**{k: v for k, v in overrides.items()})
    helpers.assert_trees_equal(helpers.final_params(config, killed),
                               helpers.final_params(config, straight))


_DATA_DIR = os.environ.get("TFDS_DATA_DIR", "")


@pytest.mark.slow
@pytest.mark.skipif(
    not os.path.isdir(os.path.join(_DATA_DIR, "tiny_shakespeare")),
    reason=f"real Tiny Shakespeare not prepared under $TFDS_DATA_DIR={_DATA_DIR!r} "
           "(CI sets it to ../shared/tensorflow_datasets)")
def test_two_processes_train_a_sharded_gpt_like_one_device(tmp_path):
    """2 processes x 2 CPU devices (gloo), mesh (data 1, fsdp 2, tensor 2):
    each process writes its shards; the checkpoint restores on 1 device and
    equals the 1-device run's. Real text: mocked data would give each
    process the same rows instead of its half."""
    from research import train  # pylint: disable=g-import-not-at-top
    config_spec = os.path.join(helpers.CONFIGS, "shakespeare_gpt.py:smoke")
    overrides = {"log_every_steps": 50, "checkpoint_every_steps": 100}
    workdir = str(tmp_path / "two")
    port = helpers.free_port()
    args = [f"--config={config_spec}", f"--workdir={workdir}",
            *[f"--config.{k}={v}" for k, v in {
                **overrides, **sharded(1, 2, 2)}.items()],
            f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
            "--distributed_timeout_s=60", "--verbosity=0"]
    procs = [helpers.spawn_main(args + [f"--process_id={i}"], 2,
                                str(tmp_path / f"p{i}.log")) for i in range(2)]
    codes = [p.wait(timeout=600) for p in procs]
    logs = [(tmp_path / f"p{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert "on 4 devices (2 processes)" in logs[0]

    from research.core import config_lib  # pylint: disable=g-import-not-at-top
    config = config_lib.load_config(config_spec, {**overrides, "num_devices": 1})
    single = str(tmp_path / "single")
    train.train_and_evaluate(config, single)
    two = helpers.final_params(config, workdir)
    one = helpers.final_params(config, single)
    assert helpers.max_diff(two, one) < RELATIVE


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    # tests/gpt_test.py worker DIR [OUT.json]: OUT is docs/results/gpt_meshes.json.
    helpers.worker_main(_worker)
