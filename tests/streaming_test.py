"""The streaming input path: conversion, same batches as in memory, resume
after SIGKILL, each of 2 processes reading only its share, bounded memory,
and bad converted data refused with the fix."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from research.core import config_lib
from research import convert
from research import errors
from research import evaluate
from research import assembly
from research.data import input_pipeline
from research.data import streaming
from research import train
from research.core import writers
from tests import helpers
from tests import tiny_tfds

SMOKE = helpers.SMOKE
N = tiny_tfds.NUM_EXAMPLES  # 48 per split


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny on-disk TFDS dataset and its conversion in 3 ArrayRecord files
    per split: (data_dir, stream_dir)."""
    root = tmp_path_factory.mktemp("tiny")
    data_dir, stream_dir = str(root / "tfds"), str(root / "stream")
    tiny_tfds.prepare(data_dir)
    tiny_tfds.register()
    # 0.05 MB shards: 17 rows of 3,076 bytes each, so 3 files per split.
    convert.convert(tiny_tfds.NAME, ["train", "test"], stream_dir, data_dir,
                    batch_size=20, shard_mb=0.05)
    return data_dir, stream_dir


def tiny_config(tiny, **overrides):
    data_dir, stream_dir = tiny
    values = {"dataset": tiny_tfds.NAME, "data_dir": data_dir,
              "stream.dir": stream_dir, "input": "stream"}
    return helpers.tiny_config(**{**values, **overrides})


def params(config, workdir):
    return jax.tree.map(np.asarray,
                        assembly.restore_variables(config, workdir).variables)


def test_converted_rows_equal_the_in_memory_rows(tiny):
    data_dir, stream_dir = tiny
    with open(os.path.join(stream_dir, tiny_tfds.NAME, "1.0.0", "train.json")) as f:
        meta = json.load(f)
    assert [s["num_records"] for s in meta["shards"]] == [17, 17, 14]
    config = tiny_config(tiny)
    spec = input_pipeline.get_dataset(tiny_tfds.NAME)
    for split in ("train", "test", "train[10:20]", "test[-5:]"):
        memory = spec.load(config, split)
        source = streaming.open_source(config, spec, split)
        assert source.num_examples == len(memory["label"])
        # Read out of order, across the files.
        order = np.random.default_rng(0).permutation(source.num_examples)
        streamed = source.read(order)
        for key in memory:
            assert streamed[key].dtype == memory[key].dtype
            np.testing.assert_array_equal(streamed[key], memory[key][order])


def test_convert_writes_what_each_split_took(tiny, tmp_path):
    data_dir, _ = tiny
    timings = {}
    convert.convert(tiny_tfds.NAME, ["test"], str(tmp_path / "stream"), data_dir,
                    batch_size=20, shard_mb=0.05, timings=timings)
    convert.write_timings(str(tmp_path / "convert.json"), timings)
    with open(tmp_path / "convert.json") as f:
        written = json.load(f)
    test = written["splits"]["test"]
    assert test["examples"] == N and test["seconds"] > 0
    # Three ArrayRecord files of 48 rows of 3,076 bytes, plus their framing
    # (riegeli rounds a small file up to its 64 KiB blocks).
    assert N * 3_076 <= test["bytes_on_disk"] <= 3 * 2 ** 17
    with open(tmp_path / "convert.md") as f:
        text = f.read()
    assert text.startswith("<!-- written by: ") and f"| test | {N} |" in text


AUGMENT = {"augment.flip": "random", "augment.translate": 2,
           "augment.eval_views": "flip"}


@pytest.fixture(scope="module")
def in_memory(tiny, tmp_path_factory):
    """An augmented in-memory run of 2 epochs x 6 steps: (config, workdir,
    result), the reference of the streamed runs."""
    config = tiny_config(tiny, input="memory", **AUGMENT)
    workdir = str(tmp_path_factory.mktemp("in_memory"))
    return config, workdir, train.train_and_evaluate(config, workdir)


def test_stream_trains_bitwise_like_memory_with_augmentation(tiny, in_memory,
                                                             tmp_path):
    """Same batches, example numbers (augmentation keys) and evaluation."""
    config, memory_dir, memory = in_memory
    streamed = tiny_config(tiny, **AUGMENT)
    result = train.train_and_evaluate(streamed, str(tmp_path))
    assert result["step"] == 12
    helpers.assert_trees_equal(params(streamed, str(tmp_path)),
                               params(config, memory_dir))
    assert result["eval/accuracy"] == memory["eval/accuracy"]
    np.testing.assert_allclose(result["eval/loss"], memory["eval/loss"], rtol=1e-6)
    # --mode=eval streams the evaluation split too.
    evaluated = evaluate.evaluate(streamed, memory_dir)
    assert evaluated["eval/accuracy"] == memory["eval/accuracy"]


def test_stream_resumes_bitwise_and_auto_picks_by_size(tiny, in_memory, tmp_path):
    """A stop mid-epoch resumes exactly (the position is the step's), and
    `input="auto"` streams only a converted split over the memory limit."""
    reference, memory_dir, _ = in_memory
    config = tiny_config(tiny, input="auto", **AUGMENT,
                         **{"stream.memory_limit_mb": 0.1})
    spec = input_pipeline.get_dataset(tiny_tfds.NAME)
    assert streaming.choose(config, spec, "train") == "stream"  # 148 KB
    assert streaming.choose(reference, spec, "train") == "memory"
    big = tiny_config(tiny, input="auto")
    assert streaming.choose(big, spec, "train") == "memory"  # under 4 GB
    sliced = tiny_config(tiny, train_split="train[10:30]")
    assert streaming.open_source(sliced, spec, "train[10:30]").num_examples == 20

    workdir = str(tmp_path)
    assert train.train_and_evaluate(config, workdir, stop_after_step=3)["step"] == 3
    # Resumed with another input setting and reader settings: a free change.
    again = tiny_config(tiny, input="stream", **AUGMENT,
                        **{"stream.threads": 1, "stream.prefetch_steps": 1})
    assert train.train_and_evaluate(again, workdir)["step"] == 12
    helpers.assert_trees_equal(params(config, workdir),
                               params(reference, memory_dir))


@pytest.mark.parametrize("case, message", [
    ("no_dir", r"needs converted data: set --config.stream.dir"),
    ("not_converted", r"No converted research_tiny_images in stream dir .*"
                      r"python -m research.convert --dataset=research_tiny_images"),
    ("wrong_version", r"is version 0.9.0, but TFDS's research_tiny_images is "
                      r"1.0.0; convert it again"),
    ("split_missing", r"Split 'test' of research_tiny_images 1.0.0 is not converted"
                      r" .*\(converted: train\); run `python -m research.convert"),
    ("old_format", r"format research-rows v0, this code reads research-rows v1"),
    ("file_missing", r"array_record-00001-of-00003 is missing .*convert again"),
    ("file_truncated", r"array_record-00001-of-00003 is damaged .*convert again"),
    ("other_split", r"train.json describes research_tiny_images\[test\], not "
                    r"research_tiny_images\[train\].*convert again"),
    ("other_features", r"holds features .* but the dataset's rows are"),
    ("added_splits", r"adds splits, which TFDS reads interleaved"),
    ("text", r"dataset 'tiny_shakespeare' has no streaming rows"),
    ("too_large", r"takes 0.1 MB per process, over config.stream.memory_limit_mb"
                  r"=0.01: stream it. Convert it once"),
])
def test_bad_streaming_input_fails_fast_with_the_fix(tiny, tmp_path, case, message):
    data_dir, stream_dir = tiny
    broken = str(tmp_path / "stream")
    shutil.copytree(stream_dir, broken)
    folder = os.path.join(broken, tiny_tfds.NAME, "1.0.0")
    overrides = {"stream.dir": broken}
    if case == "no_dir":
        overrides["stream.dir"] = ""
    elif case == "not_converted":
        overrides["stream.dir"] = str(tmp_path)
    elif case == "wrong_version":
        os.rename(folder, os.path.join(os.path.dirname(folder), "0.9.0"))
    elif case == "split_missing":
        os.remove(os.path.join(folder, "test.json"))
    elif case == "file_truncated":
        path = os.path.join(folder, "train.array_record-00001-of-00003")
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif case == "other_split":
        shutil.copy(os.path.join(folder, "test.json"),
                    os.path.join(folder, "train.json"))
    elif case in ("old_format", "other_features"):
        path = os.path.join(folder, "train.json")
        with open(path) as f:
            meta = json.load(f)
        if case == "old_format":
            meta["format_version"] = 0
        else:
            meta["features"]["image"]["shape"] = [28, 28, 1]
        with open(path, "w") as f:
            json.dump(meta, f)
    elif case == "file_missing":
        os.remove(os.path.join(folder, "train.array_record-00001-of-00003"))
    elif case == "added_splits":
        overrides["train_split"] = "train[:8]+test[:8]"
    elif case == "text":
        overrides.update(dataset="tiny_shakespeare", model="char_rnn",
                         model_kwargs={"vocab_size": 8})
    elif case == "too_large":
        overrides.update({"input": "auto", "stream.dir": "",
                          "stream.memory_limit_mb": 0.01})
    start = time.perf_counter()
    with pytest.raises(errors.UserError, match=message) as raised:
        config = (config_lib.load_config(
            os.path.join(helpers.CONFIGS, "shakespeare_rnn.py:smoke"),
            {"input": "stream", "data_dir": "/nonexistent"}) if case == "text"
            else tiny_config(tiny, **overrides))
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert "\n" not in str(raised.value)
    assert time.perf_counter() - start < 30
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


# --- processes ---------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import sys
    from absl import app
    from research import main
    from tests import tiny_tfds
    tiny_tfds.register()
    app.run(main.main, argv=sys.argv, flags_parser=main.parse_flags)
""")


def _spawn(args, log_path, devices=1, extra_env=None):
    env = {**os.environ, "PYTHONPATH": helpers.REPO, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           **(extra_env or {})}
    with open(log_path, "ab") as log:  # a file: a full pipe would block the child
        return subprocess.Popen([sys.executable, "-c", _CHILD, *args], env=env,
                                cwd=helpers.REPO, stdout=subprocess.DEVNULL,
                                stderr=log)


def _tail(path, chars=3000):
    with open(path, errors="replace") as f:
        return f.read()[-chars:]


def _args(tiny, workdir, *more):
    data_dir, stream_dir = tiny
    return [f"--config={SMOKE}", f"--workdir={workdir}", "--config.input=stream",
            "--config.train_split=train", "--config.eval_split=test",
            f"--config.dataset={tiny_tfds.NAME}", f"--config.data_dir={data_dir}",
            f"--config.stream.dir={stream_dir}", *more]


@pytest.mark.slow
def test_sigkill_resumes_bitwise_through_the_stream(tiny, tmp_path):
    """kill -9 mid-run (reader threads and prefetch in flight); the rerun ends
    bitwise equal to an uninterrupted in-memory run."""
    more = ["--config.batch_size=1", "--config.num_epochs=20",
            "--config.checkpoint_every_steps=100", "--config.log_every_steps=100"]
    workdir, log = str(tmp_path / "killed"), str(tmp_path / "killed.log")
    proc = _spawn(_args(tiny, workdir, *more), log)
    deadline = time.time() + 120
    while not (os.path.isdir(os.path.join(workdir, "checkpoints"))
               and helpers.saved_steps(workdir)):
        assert proc.poll() is None and time.time() < deadline, _tail(log)
        time.sleep(0.02)
    proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL
    killed_at = helpers.saved_steps(workdir)[-1]
    assert 0 < killed_at < 960, killed_at
    proc = _spawn(_args(tiny, workdir, *more), log)
    assert proc.wait(timeout=300) == 0, _tail(log)
    assert helpers.saved_steps(workdir)[-1] == 960  # 48 steps x 20 epochs
    assert f"Resuming at step {killed_at}" in _tail(
        os.path.join(workdir, "train.log"), 10 ** 9)

    config = tiny_config(tiny, batch_size=1, num_epochs=20, input="memory",
                         checkpoint_every_steps=100, log_every_steps=100)
    straight = str(tmp_path / "straight")
    train.train_and_evaluate(config, straight)
    helpers.assert_trees_equal(params(config, workdir), params(config, straight))


def test_two_processes_each_read_only_their_share(tiny, in_memory, tmp_path):
    """2 processes x 2 CPU devices over gloo: per epoch each reads 24 of the
    48 training records and 24 of the 48 test records, their example numbers
    together cover the split, and the run matches one in-memory process."""
    workdir = str(tmp_path / "two")
    port = helpers.free_port()
    procs = [_spawn(_args(tiny, workdir, "--config.augment.flip=random",
                          "--config.augment.translate=2",
                          "--config.augment.eval_views=flip",
                          "--config.eval_batch_size=16",
                          "--config.checkpoint_every_steps=4",
                          "--config.log_every_steps=4",
                          f"--coordinator_address=127.0.0.1:{port}",
                          "--num_processes=2", "--distributed_timeout_s=60",
                          f"--process_id={i}", "--verbosity=0"),
                    str(tmp_path / f"p{i}.log"), devices=2) for i in range(2)]
    codes = [p.wait(timeout=300) for p in procs]
    logs = [(tmp_path / f"p{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    name = f"{tiny_tfds.NAME}\\[(train|test)\\]"
    pattern = (r"process (\d) of 2 read (\d+) records of " + name
               + r" for (epoch \d|evaluation) \(example numbers sum to (\d+)\)")
    reads = [re.findall(pattern, log) for log in logs]
    total = N * (N - 1) // 2
    for what in ("epoch 1", "epoch 2", "evaluation"):
        split = "test" if what == "evaluation" else "train"
        rows = [[r for r in found if r[3] == what] for found in reads]
        assert [len(r) for r in rows] == [2 if split == "test" else 1] * 2, reads
        for i in range(2):
            assert rows[i][0][0] == str(i) and rows[i][0][1] == "24", rows
        assert int(rows[0][0][4]) + int(rows[1][0][4]) == total, rows
    assert "process 0 reads rows [0, 4) of every batch" in logs[0]
    assert "process 1 reads rows [4, 8) of every batch" in logs[1]

    config, single, one = in_memory  # one process, in memory
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(
        jax.tree.leaves(params(config, workdir)), jax.tree.leaves(params(config,
                                                                         single))))
    assert diff < helpers.TOLERANCE
    last = [r for r in writers.read_metrics(workdir) if "eval/loss" in r][-1]
    assert last["eval/accuracy"] == one["eval/accuracy"]


# --- memory ------------------------------------------------------------------

_MEMORY_CHILD = textwrap.dedent("""
    import json, resource, sys, threading, time
    import jax, ml_collections, numpy as np
    from research import mesh as mesh_lib
    from research.data import records, streaming
    stream_dir, num, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    features = {"image": ((32, 32, 3), np.dtype(np.uint8)),
                "label": ((), np.dtype(np.int32))}

    def batches():
        rng = np.random.default_rng(0)
        for start in range(0, num, 1000):
            n = min(1000, num - start)
            yield {"image": rng.integers(0, 256, (n, 32, 32, 3), np.uint8),
                   "label": np.arange(start, start + n, dtype=np.int32)}
    records.write_split(stream_dir, "synthetic", "1.0.0", "train", features,
                        batches(), num, 8192)
    reader = records.open_split(stream_dir, "synthetic", "1.0.0", "train", features)
    source = records.Source(reader, 0, num, "synthetic[train]")
    options = ml_collections.ConfigDict({"threads": 2, "prefetch_steps": 4,
                                         "device_prefetch": 2})
    mesh = mesh_lib.create_mesh(1)
    steps = num // batch
    order = lambda epoch: np.random.default_rng(epoch).permutation(num).astype(
        np.int32)

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)
    # Warm up JAX's transfers with a chunk-shaped array that is not the
    # split's, then take the baseline before the stream reads any row.
    jax.block_until_ready(jax.device_put(np.zeros((4 * batch, 32, 32, 3), np.uint8)))
    base = rss()
    thread = threading.Thread(target=sample)
    thread.start()
    stream = streaming.TrainStream(
        source, order, batch_size=batch, steps_per_epoch=steps, mesh=mesh,
        start=0, stop=steps, chunk_size=lambda step: 4 if steps - step >= 4 else 1,
        options=options)
    step, seen = 0, 0
    while step < steps:
        n = 4 if steps - step >= 4 else 1
        chunk = stream.next(step, n)
        seen += int(np.asarray(chunk["label"]).size)
        step += n
    done.set()
    thread.join()
    stream.close()
    print(json.dumps({"base": base, "peak": peak[0], "steps": step,
                      "labels_seen": seen, "reads": source.counter.reads}))
""")


def test_memory_stays_bounded_by_the_prefetch_depth(tmp_path):
    """A 117 MB split streams through an epoch at batch 64 (4 steps a read)
    while the buffers hold about 28 batches, 5.3 MB: Grain's 2 buffered and
    2 in-flight reads of 4 steps, the chunk being assembled (4 steps) and 2
    placed chunks (8). Peak RSS growth is measured from before the stream is
    built (so reading the split up front would show), for this split and
    for one a tenth its size: the growth is the reader's and JAX's fixed
    cost, the same for both, not the data's."""
    batch, growth = 64, {}
    for num in (40_000, 4_000):
        proc = subprocess.run(
            [sys.executable, "-c", _MEMORY_CHILD, str(tmp_path / str(num)), str(num),
             str(batch)],
            env={**os.environ, "PYTHONPATH": helpers.REPO, "JAX_PLATFORMS": "cpu"},
            cwd=helpers.REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out["steps"] == num // batch and out["reads"] == num // batch * batch
        growth[num] = out["peak"] - out["base"]
    data_bytes = 40_000 * 3076
    buffers = (16 + 4 + 8) * batch * 3076
    assert data_bytes > 10 * buffers
    print(f"RSS growth: {growth[40_000] / 2**20:.1f} MB over an epoch of "
          f"{data_bytes / 2**20:.0f} MB, {growth[4_000] / 2**20:.1f} MB over "
          f"{data_bytes / 10 / 2**20:.0f} MB (buffers {buffers / 2**20:.1f} MB)")
    # Reading the split up front would add 0.9 x 117 MB between the two.
    assert growth[40_000] - growth[4_000] < data_bytes / 8, growth


# --- real data ---------------------------------------------------------------

DATA_DIR = os.environ.get("TFDS_DATA_DIR", "")


@pytest.mark.skipif(
    not os.path.isdir(os.path.join(DATA_DIR, "cifar10")),
    reason=f"real CIFAR-10 not prepared under $TFDS_DATA_DIR={DATA_DIR!r} "
           "(CI sets it to ../shared/tensorflow_datasets)")
def test_real_cifar10_streams_bitwise_like_memory(tmp_path):
    """CIFAR-10 converted to ArrayRecord (both splits, whole: about 10 s here,
    the most of this test's time), then 500 steps of the seed's LeNet (batch
    4) on train[:2000] through each path: bitwise-equal parameters, and the
    same accuracy on test[:1000] scored in memory and streamed."""
    stream_dir = str(tmp_path / "stream")
    counts = convert.convert("cifar10", ["train", "test"], stream_dir, DATA_DIR)
    assert counts == {"train": 50_000, "test": 10_000}
    results, trained = {}, {}
    for mode in ("memory", "stream"):
        config = config_lib.load_config(
            os.path.join(helpers.CONFIGS, "cifar_cnn.py"),
            {"input": mode, "stream.dir": stream_dir, "train_split": "train[:2000]",
             "eval_split": "test[:1000]", "num_epochs": 1,
             "checkpoint_every_steps": 500, "log_every_steps": 250})
        workdir = str(tmp_path / mode)
        results[mode] = train.train_and_evaluate(config, workdir)
        trained[mode] = params(config, workdir)
    assert results["stream"]["step"] == 500
    helpers.assert_trees_equal(trained["stream"], trained["memory"])
    assert results["stream"]["eval/accuracy"] == results["memory"]["eval/accuracy"]


def test_benchmark_times_the_streamed_step():
    """`research.bench --inputs=stream` on a tiny setting: every number there.
    (research.bench itself defines flags that clash with research.main's.)"""
    from research import bench_stream  # pylint: disable=g-import-not-at-top

    def synthetic(exp, examples):
        rng = np.random.default_rng(0)
        return {"image": rng.integers(0, 256, (examples, 32, 32, 3), np.uint8),
                "label": rng.integers(0, 10, examples, np.int32)}
    config = config_lib.load_config(SMOKE, {"stream.prefetch_steps": 2})
    rec = bench_stream.bench_stream(config, 8, 1, steps=2, repeats=1,
                                    synthetic_fn=synthetic)
    for key in ("train_per_sec", "step_ms", "step_ms_without_input", "wait_ms",
                "step_ms_in_memory", "reader_per_sec"):
        assert np.isfinite(rec[key]) and rec[key] >= 0, rec
    assert rec["input"] == "stream" and rec["devices"] == 1
