"""Benchmark of the streaming input path (research.bench --inputs=stream).

Synthetic rows are written as converted ArrayRecord files in a temporary
folder and read by the trainer's own `streaming.TrainStream` (Grain threads,
device prefetch) into the trainer's streamed chunk. Reported: the step with
its streamed batch and the time it waited for it, the same compiled chunk
fed one placed batch again and again ("without input"), and the in-memory
chunk on the same rows, all alternated in one loop so that they share the
machine's load; and the reader alone (read, decode, stack, place; nothing
trained), past what it read ahead.
"""
import statistics
import tempfile
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from research import assembly
from research.core import experiment as experiment_lib
from research.data import input_pipeline
from research import mesh as mesh_lib
from research.data import records as records_lib
from research.data import inputs as data_inputs
from research.data import streaming
from research import timing

Split = dict[str, np.ndarray]


def bench_stream(config: ml_collections.ConfigDict, batch_size: int,
                 num_devices: int, *, steps: int, repeats: int,
                 synthetic_fn: Callable[[experiment_lib.Experiment, int], Split]
                 ) -> dict[str, Any]:
    """Times the streamed train step with and without its input, beside the
    in-memory step, and the reader alone.

    Args:
      config: the experiment config (its `stream` settings are used).
      batch_size: global batch size.
      num_devices: devices of the mesh (0: all).
      steps: steps per timing.
      repeats: timings per number (the median is kept).
      synthetic_fn: `(experiment, examples) -> rows` of random data.
    """
    exp = assembly.build(config, mesh=mesh_lib.create_mesh(num_devices),
                           info={})
    mesh = exp.mesh
    if not streaming.can_stream(exp.dataset):
        raise ValueError(f"dataset {config.dataset!r} cannot stream")
    features = exp.dataset.stream_features(config)
    steps_per_epoch = 64
    examples = batch_size * steps_per_epoch
    calls = 2 + steps * repeats
    with tempfile.TemporaryDirectory() as folder:
        rows = synthetic_fn(exp, examples)
        records_lib.write_split(folder, "bench", "1.0.0", "train", features,
                                [rows], examples, examples)
        source = records_lib.Source(records_lib.open_split(
            folder, "bench", "1.0.0", "train", features), 0, examples, "bench")

        def stream(stop):
            return streaming.TrainStream(
                source, lambda e: np.random.default_rng(e).permutation(
                    examples).astype(np.int32), batch_size=batch_size,
                steps_per_epoch=steps_per_epoch, mesh=mesh, start=0, stop=stop,
                chunk_size=lambda step: 1, options=config.stream)

        keys = jax.device_put({"dropout": jax.random.key(1),
                               "augment": jax.random.key(2)},
                              mesh_lib.replicated(mesh))
        streamed = data_inputs.StreamTrain(source, batch_size, mesh, config.stream)
        holder = {"carry": exp.carry(exp.create_state(jax.random.key(0),
                                                      total_steps=10_000))}
        # The in-memory path's chunk on the same rows, timed in the same loop.
        in_memory = data_inputs.MemoryTrain(input_pipeline.Shard(rows, (examples,)),
                                            batch_size, mesh)
        memory_inputs = {**in_memory.data, "order": mesh_lib.put_replicated(
            np.random.default_rng(1).permutation(examples).astype(np.int32), mesh)}
        memory_holder = {"carry": exp.carry(exp.create_state(
            jax.random.key(0), total_steps=10_000))}
        with jax.set_mesh(mesh):
            compiled = exp.train_chunk(streamed, 1, holder["carry"].state).lower(
                holder["carry"], streamed.spec(1), keys, exp.aux()).compile()
            memory_chunk = exp.train_chunk(
                in_memory, 1, memory_holder["carry"].state).lower(
                memory_holder["carry"], memory_inputs, keys, exp.aux()).compile()

        def memory_call():
            memory_holder["carry"] = memory_chunk(memory_holder["carry"],
                                                  memory_inputs, keys, exp.aux())
            return memory_holder["carry"].bad_step

        # The reader alone (batches read, stacked and placed, nothing
        # trained), past what it read ahead: a capacity, not a ratio.
        drain = 64
        streams = {"read": stream(drain + 2 * calls)}
        position = {"read": 0}

        waited = {"s": 0.0}

        def take(name):
            start = time.perf_counter()
            batch = streams[name].next(position[name], 1)
            waited["s"] += time.perf_counter() - start
            position[name] += 1
            return batch

        def train_call(batch):
            holder["carry"] = compiled(holder["carry"], batch, keys, exp.aux())
            return holder["carry"].bad_step

        placed = take("read")
        for _ in range(drain):
            take("read")
        read_s = timing.median_time(lambda: take("read"), 2 * steps, repeats)
        streams["read"].close()
        # The streamed step with and without its input and the in-memory
        # step, alternated in one loop: the same machine load for each.
        streams["fed"], position["fed"] = stream(calls), 0
        jax.block_until_ready(train_call(take("fed")))
        jax.block_until_ready(memory_call())
        timings = {"with": [], "without": [], "wait": [], "memory": []}
        for _ in range(repeats):
            waited["s"] = 0.0
            timings["with"].append(
                timing.median_time(lambda: train_call(take("fed")), steps, 1))
            timings["wait"].append(waited["s"] / steps)
            timings["without"].append(
                timing.median_time(lambda: train_call(placed), steps, 1))
            timings["memory"].append(timing.median_time(memory_call, steps, 1))
        streams["fed"].close()
        with_input_s, without_input_s, wait_s, memory_s = (
            statistics.median(timings[k])
            for k in ("with", "without", "wait", "memory"))
    _, per_example = exp.dataset.throughput_unit(config)
    return {"framework": "jax", "input": "stream", "devices": mesh.size,
            "train_per_sec": batch_size * per_example / with_input_s,
            "step_ms": 1e3 * with_input_s,
            "step_ms_without_input": 1e3 * without_input_s,
            # Time the step spent waiting for its batch: ~0 when the reader
            # keeps up (it then costs only the CPU time it shares).
            "wait_ms": 1e3 * wait_s,
            "step_ms_in_memory": 1e3 * memory_s,  # timed in the same loop
            "reader_per_sec": batch_size * per_example / read_s,
            "reader_threads": config.stream.threads}
