"""`--mode=summary`: what a config's model costs, without training.

Parameters per layer and in total, multiply-adds and FLOPs per example,
parameter, optimizer and activation memory, and the time an epoch would take
here, from a few measured steps of the compiled train step on synthetic
data. Enough to pick a model's size for a time or memory budget.
"""
import collections
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from research import costs
from research import assembly
from research.core import memory as memory_lib
from research.core import state as state_lib


def _bytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def _device_bytes(tree: Any) -> int:
    """Bytes one device holds of `tree` (its shard of each array; the
    largest device's, should they differ)."""
    per_device = collections.Counter()
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
    return max(per_device.values(), default=0)


def _params_by_layer(params: Any) -> dict[str, int]:
    """Parameter counts by the model's direct submodules."""
    counts = collections.Counter()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        counts[str(getattr(path[0], "key", path[0]))] += int(np.prod(leaf.shape))
    return dict(counts)


def _macs_by_layer(macs: dict[str, int]) -> dict[str, int]:
    """Multiply-adds by the model's direct submodules (name stacks begin with
    the model's own name)."""
    counts = collections.Counter()
    for name, m in macs.items():
        parts = name.split("/")
        counts[parts[1] if len(parts) > 1 else "(model)"] += m
    return dict(counts)


def summarize(config: ml_collections.ConfigDict, *, timed_steps: int = 3
              ) -> dict[str, Any]:
    """The cost of `config`'s model; see the module docstring.

    Args:
      config: the experiment config.
      timed_steps: train steps timed (after one to warm up) for the epoch
        estimate; 0 skips the measurement.
    """
    exp = assembly.build(config)
    batch = config.batch_size
    args = costs.train_step_args(exp, batch)
    state = args.carry.state
    macs_by_layer = _macs_by_layer(costs.forward_macs(exp))
    summary = {
        "model": config.model, "batch_size": batch,
        "params_by_layer": _params_by_layer(state.params),
        "params": state_lib.count_params(state.params),
        "macs_by_layer": macs_by_layer,
        "macs_per_example": sum(macs_by_layer.values()),
        "param_bytes": _bytes(state.params),
        "state_bytes": _bytes(state.model_state) + _bytes(state.extras),
        "optimizer_bytes": _bytes(state.opt_state),
        "mesh": {k: int(v) for k, v in exp.mesh.shape.items()},
        # What one device holds under the config's scheme (sharded or not).
        "param_bytes_per_device": _device_bytes(state.params),
        "optimizer_bytes_per_device": _device_bytes(state.opt_state),
    }
    per_call = config.steps_per_call  # as the trainer runs them
    with jax.set_mesh(exp.mesh):
        compiled = exp.train_chunk(args.source, per_call, args.carry.state).lower(
            *args[1:]).compile()
    memory = compiled.memory_analysis()  # XLA's, per device
    summary["step_temp_bytes"] = getattr(memory, "temp_size_in_bytes", None)
    summary["step_argument_bytes"] = getattr(memory, "argument_size_in_bytes", None)
    summary["step_needed_bytes"] = memory_lib.needed_bytes(memory)
    # XLA counts one device's program: the devices share the step's work.
    summary["train_flops_per_example"] = costs.train_step_flops(
        exp, batch, args) * exp.mesh.size / batch
    rows = exp.dataset.train_rows(config, exp.info)
    summary["steps_per_epoch"] = sum(rows.counts) // batch
    if timed_steps:
        carry = compiled(*args[1:])
        jax.block_until_ready(carry)
        start = time.perf_counter()
        for _ in range(timed_steps):
            carry = compiled(carry, *args[2:])
        jax.block_until_ready(carry)
        summary["step_s"] = (time.perf_counter() - start) / (timed_steps * per_call)
        summary["epoch_s"] = summary["step_s"] * summary["steps_per_epoch"]
    return summary


def _size(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


def _mib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2 ** 20:.2f} MiB"


def describe(summary: dict[str, Any]) -> str:
    """The summary as a table for the terminal."""
    macs = summary["macs_by_layer"]
    layers = list(summary["params_by_layer"]) + [
        k for k in macs if k not in summary["params_by_layer"]]
    lines = [f"{'layer':<28}{'parameters':>14}{'multiply-adds':>16}"]
    for layer in layers:
        lines.append(f"{layer:<28}{summary['params_by_layer'].get(layer, 0):>14,}"
                     f"{macs.get(layer, 0):>16,}")
    lines.append(f"{'total':<28}{summary['params']:>14,}"
                 f"{summary['macs_per_example']:>16,}")
    lines += [
        "",
        f"forward per example: {summary['macs_per_example']:,} multiply-adds = "
        f"{2 * summary['macs_per_example']:,} FLOPs",
        f"train step per example (XLA's count, all ops): "
        f"{_size(summary['train_flops_per_example'])}FLOP",
        f"memory: parameters {_mib(summary['param_bytes'])}, optimizer state "
        f"{_mib(summary['optimizer_bytes'])}, other state "
        f"{_mib(summary['state_bytes'])}",
        f"per device on mesh {summary['mesh']}: parameters "
        f"{_mib(summary['param_bytes_per_device'])}, optimizer state "
        f"{_mib(summary['optimizer_bytes_per_device'])}; the compiled train step "
        f"(XLA's memory analysis, batch {summary['batch_size']}): arguments "
        f"{_mib(summary['step_argument_bytes'])}, temporaries (activations) "
        f"{_mib(summary['step_temp_bytes'])}, in all {_mib(summary['step_needed_bytes'])}"
        " (what config.device_memory_mib is checked against)",
    ]
    if "step_s" in summary:
        lines.append(
            f"time here ({jax.devices()[0].platform}, {jax.device_count()} "
            f"device(s)): {1e3 * summary['step_s']:.1f} ms a step at batch "
            f"{summary['batch_size']}, about {summary['epoch_s']:.0f} s an epoch of "
            f"{summary['steps_per_epoch']:,} steps (measured on synthetic data)")
    return "\n".join(lines)
