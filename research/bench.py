"""Benchmark: train/eval throughput, step time, compile time and MFU, next to
the same model and step in PyTorch, measured in the same run.

python -m research.bench --config=configs/cifar_cnn.py --batch_sizes=4,128,512
python -m research.bench --config=configs/shakespeare_rnn.py --batch_sizes=64 \
    --rnn_sizes=1x256,2x256,2x512
XLA_FLAGS=--xla_force_host_platform_device_count=2 \
    python -m research.bench --config=configs/cifar_cnn.py --num_devices=1,2 --notorch
python -m research.bench --config=configs/cifar_cnn.py --batch_sizes=128 \
    --inputs=memory,stream --notorch
python -m research.bench --config=configs/cifar_fast.py:cpu \
    --batch_sizes=128,512,1024 --runs=3      # medians of 3 rounds, side by side

The JAX step is the trainer's own (`steps.train_chunk` with data on the device,
the state donated); PyTorch runs eagerly in another interpreter
(`research/bench_torch.py`; `--torch_python`, default $TORCH_PYTHON or
.venv-torch/bin/python). Warm-up is excluded on both sides; each number is the
median of `--repeats` timings of `--steps` steps. Model FLOPs come from XLA's
cost analysis of the compiled step (the C++ kernels counted as their XLA
twin), or, for RNNs, from the multiply-adds counted in the traced model (XLA
counts a loop body once; `costs.py`); the peak is a float32 matmul timed here,
doubled for models that compute in bfloat16 (AVX-512 BF16's dot product does
twice the multiply-adds of a float32 FMA per instruction).

`--inputs=stream` adds the streaming input path (`bench_stream.py`).
"""
import functools
import json
import os
import re
import statistics
import subprocess
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from research import bench_stream
from research import bench_tables
from research import costs
from research import assembly
from research.core import experiment as experiment_lib
from research.data import input_pipeline
from research import cli
from research import malloc
from research import provenance
from research import timing
from research import mesh as mesh_lib
from research.core import steps

# --config: research.main's flag (one parser, one-line errors, exit status 2).
flags.DEFINE_list("batch_sizes", ["4", "128", "512"], "Global batch sizes.")
flags.DEFINE_list("num_devices", ["0"], "Device counts to compare (0: all).")
flags.DEFINE_list("rnn_sizes", [], "For text models: LAYERSxHIDDEN sizes, e.g. "
                  "1x256,2x512 (default: the config's).")
flags.DEFINE_integer("steps", 20, "Steps per timing.", lower_bound=1)
flags.DEFINE_integer("repeats", 3, "Timings per number (the median is kept).",
                     lower_bound=1)
flags.DEFINE_integer("runs", 1, "Rounds of the whole benchmark, one after the "
                     "other; with several, a table of medians over the rounds "
                     "and each round's JAX : PyTorch ratios.", lower_bound=1)
flags.DEFINE_string("output", "bench.json", "Where the JSON records go.")
flags.DEFINE_bool("torch", True, "Also time the PyTorch model.")
flags.DEFINE_list("inputs", ["memory"], "Input paths to time: memory, stream.")
flags.DEFINE_string("torch_python", None, "Interpreter with torch installed.")
FLAGS = flags.FLAGS
INPUTS = ("memory", "stream")


def _ints(values: list[str], low: int) -> bool:
    return bool(values) and all(
        v.strip().isdigit() and int(v) >= low for v in values)


flags.register_validator("batch_sizes", lambda v: _ints(v, 1),
                         "must be positive integers, e.g. 4,128,512")
flags.register_validator("num_devices", lambda v: _ints(v, 0),
                         "must be device counts (0: all), e.g. 1,8")
flags.register_validator("inputs", lambda v: bool(v) and set(v) <= set(INPUTS),
                         f"must be some of {','.join(INPUTS)}")
flags.register_validator(
    "rnn_sizes", lambda v: all(re.fullmatch(r"[1-9]\d*x[1-9]\d*", s.lower())
                               for s in v),
    "must be LAYERSxHIDDEN sizes, e.g. 1x256,2x512")


def matmul_peak_flops(n: int = 2048) -> float:
    """Float32 FLOP/s of an n^3 matmul on the default device (best of 5)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    dot = jax.jit(lambda x: x @ x)
    dot(a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dot(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def cpu_flags() -> str:
    """The CPU's vector ISA flags (AVX-512, AMX, ...) from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags_line = next(line for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return ""
    wanted = ("avx", "fma", "amx", "sse4")
    return " ".join(sorted(f for f in flags_line.split(":", 1)[1].split()
                           if f.startswith(wanted)))


def _model_flops(exp: experiment_lib.Experiment, batch_size: int, args
                 ) -> tuple[float, str]:
    """Model FLOPs of one train step, and where the number comes from."""
    if isinstance(exp.dataset, input_pipeline.CharacterText):
        # XLA's cost analysis counts a loop's body once, not per time step:
        # 3 x the forward's multiply-adds x 2 FLOPs (forward, two backward).
        macs = sum(costs.forward_macs(exp, batch_size).values())
        return 6.0 * macs, "counted (3 x forward)"
    return costs.train_step_flops(exp, batch_size, args), "xla"


def bench_jax(config, batch_size: int, num_devices: int) -> dict:
    """Times the trainer's compiled step and an eval step on synthetic data."""
    exp = assembly.build(config, mesh=mesh_lib.create_mesh(num_devices),
                           info={})
    mesh = exp.mesh
    mesh_lib.check_divisible("batch_size", batch_size, mesh, config.grad_accum_steps)
    args = costs.train_step_args(exp, batch_size)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = exp.train_chunk(args.source, 1, args.carry.state).lower(
            args.carry, args.inputs, args.keys, args.aux).compile()
    compile_s = time.perf_counter() - start
    flops, flops_source = _model_flops(exp, batch_size, args)
    holder = {"carry": args.carry}

    def train_call():  # as in the trainer: metrics stay on device between calls
        holder["carry"] = compiled(holder["carry"], args.inputs, args.keys, args.aux)
        return holder["carry"].bad_step

    jax.block_until_ready(train_call())
    step_s = timing.median_time(train_call, FLAGS.steps, FLAGS.repeats)

    synthetic = costs.synthetic_rows(exp, batch_size)
    # Which examples (images) or predicted characters (text) count.
    mask_shape = (batch_size,) if "label" in synthetic else (
        batch_size, synthetic["tokens"].shape[1] - 1)
    batch = jax.device_put({"mask": np.ones(mask_shape, bool), **synthetic},
                           mesh_lib.batch_sharded(mesh))
    variables = holder["carry"].state.eval_variables
    with jax.set_mesh(mesh):
        eval_fn = jax.jit(functools.partial(
            steps.eval_step, exp.model.apply, pipeline=exp.pipeline(train=False)),
            out_shardings=mesh_lib.replicated(mesh)).lower(
                variables, batch, exp.aux()).compile()
    jax.block_until_ready(eval_fn(variables, batch, exp.aux()))
    eval_s = timing.median_time(lambda: eval_fn(variables, batch, exp.aux()),
                                FLAGS.steps, FLAGS.repeats)
    _, per_example = exp.dataset.throughput_unit(config)
    return {"framework": "jax", "jax_version": jax.__version__,
            "devices": mesh.size, "train_per_sec": batch_size * per_example / step_s,
            "eval_per_sec": batch_size * per_example / eval_s,
            "step_ms": 1e3 * step_s, "compile_s": compile_s,
            "model_flops_per_step": flops, "flops_source": flops_source}


def bench_torch(config, batch_size: int) -> list[dict] | None:
    python = (FLAGS.torch_python or os.environ.get("TORCH_PYTHON")
              or os.path.join(os.getcwd(), ".venv-torch", "bin", "python"))
    if not os.path.exists(python):
        logging.warning("No interpreter with torch at %s; skipping PyTorch (see "
                        "README, Benchmarks).", python)
        return None
    if not (config.model in ("lenet", "airbench", "gpt") or (
            config.model == "char_rnn" and config.model_kwargs.cell == "lstm")):
        logging.warning("No PyTorch twin of model %r; skipping it.", config.model)
        return None
    job = {"model": "lstm" if config.model == "char_rnn" else config.model,
           "batch_size": batch_size, "steps": FLAGS.steps, "repeats": FLAGS.repeats,
           "learning_rate": config.learning_rate, "momentum": config.momentum,
           "grad_clip_norm": config.grad_clip_norm}
    if job["model"] == "airbench":
        job.update(widths=list(config.model_kwargs.widths),
                   weight_decay=config.weight_decay,
                   label_smoothing=config.objective_kwargs.label_smoothing,
                   translate=config.augment.translate)
    if job["model"] == "lstm":
        job.update({k: config.model_kwargs[k] for k in (
            "vocab_size", "embed_dim", "hidden_size", "num_layers", "dropout_rate")})
        job["seq_len"] = config.seq_len
    if job["model"] == "gpt":
        kwargs = config.model_kwargs
        job.update({k: kwargs[k] for k in (
            "vocab_size", "num_layers", "width", "num_heads", "context", "mlp_ratio",
            "dropout_rate", "dtype")})
        multiple = kwargs.get("vocab_multiple", 64)
        job.update(seq_len=config.seq_len,
                   rows=-(-kwargs.vocab_size // multiple) * multiple)
    script = os.path.join(os.path.dirname(__file__), "bench_torch.py")
    out = subprocess.run([python, script, json.dumps(job)], capture_output=True,
                         text=True, check=True)
    records = [json.loads(out.stdout.strip().splitlines()[-1])]
    if job["model"] == "gpt":  # and compiled, where inductor runs here
        done = subprocess.run([python, script, json.dumps({**job, "compile": True})],
                              capture_output=True, text=True)
        if done.returncode == 0:
            records.append(json.loads(done.stdout.strip().splitlines()[-1]))
        else:
            logging.warning("torch.compile did not run here: %s",
                            done.stderr.strip().splitlines()[-1:])
    return records


def _variants(config):
    if not FLAGS.rnn_sizes:
        yield config.model, config
        return
    for size in FLAGS.rnn_sizes:
        layers, hidden = (int(v) for v in size.lower().split("x"))
        variant = config.copy_and_resolve_references()
        variant.model_kwargs.num_layers = layers
        variant.model_kwargs.hidden_size = hidden
        yield f"{config.model} {size}", variant


def main(argv):
    del argv
    malloc.keep_freed_memory()  # as the trainer runs (research.main)
    config = FLAGS.config
    bf16 = config.model_kwargs.get("dtype") == "bfloat16"
    records, streamed, peaks = [], [], []
    for run in range(FLAGS.runs):
        peak = matmul_peak_flops()
        logging.info("float32 matmul peak measured: %.1f GFLOP/s", peak / 1e9)
        peaks.append(peak * (2.0 if bf16 else 1.0))
        one_run(config, peaks[-1], records, streamed,
                {"run": run} if FLAGS.runs > 1 else {})
    about = {**provenance.about(), "cpu_flags": cpu_flags(),
             "matmul_peak_flops": statistics.median(peaks),  # the machine it measured
             **({"matmul_peaks": peaks} if FLAGS.runs > 1 else {})}
    unit = input_pipeline.get_dataset(config.dataset).throughput_unit(config)[0] + "/s"
    lines = bench_tables.render(records, streamed, unit, about, bf16=bf16)
    if FLAGS.runs > 1:
        lines += [""] + bench_tables.medians(records, unit)
    print("\n".join(lines))
    provenance.write(FLAGS.output, about, {"records": records + streamed}, lines)


def one_run(config, peak: float, records: list[dict], streamed: list[dict],
            tag: dict) -> None:
    """Every config variant, batch and device count once (JAX, the streamed
    input, PyTorch), appended to `records` and `streamed` with `tag`."""
    for name, variant in _variants(config):
        for batch_size in (int(b) for b in FLAGS.batch_sizes):
            for num_devices in (int(d) for d in FLAGS.num_devices):
                rec = bench_jax(variant, batch_size, num_devices)
                rec["mfu"] = (rec["model_flops_per_step"] / (rec["step_ms"] / 1e3)
                              / (peak * rec["devices"]))
                records.append({"config": name, "batch_size": batch_size, **tag, **rec})
                if "stream" in FLAGS.inputs:
                    streamed.append({"config": name, "batch_size": batch_size, **tag,
                                     **bench_stream.bench_stream(
                                         variant, batch_size, num_devices,
                                         steps=FLAGS.steps, repeats=FLAGS.repeats,
                                         synthetic_fn=costs.synthetic_rows)})
            if FLAGS.torch:
                jax_rec = records[-1]
                for rec in bench_torch(variant, batch_size) or []:
                    rec["mfu"] = (jax_rec["model_flops_per_step"]
                                  / (rec["step_ms"] / 1e3) / peak)
                    records.append({"config": name, "batch_size": batch_size, **tag,
                                    **rec})


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(lambda argv: cli.guarded(main, argv),
            flags_parser=cli.parse_flags)
