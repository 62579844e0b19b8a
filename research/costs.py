"""What a model costs: multiply-adds counted from its jaxpr, XLA's FLOP count,
and the compiled train step on synthetic data (for the benchmark and
`--mode=summary`).

Multiply-adds are counted from the traced forward pass, not from XLA's cost
analysis: XLA counts a loop's body once (the LSTM's time loop) and cannot see
into custom calls (the C++ kernels), while the jaxpr has `scan` lengths, and
the kernels are traced as their XLA reference (`kernels.xla_only`). Only
`dot_general` and `conv_general_dilated` count: they are the model's
multiply-adds; elementwise work is reported by XLA's count beside it.
"""
import collections
import contextlib
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

from research import assembly
from research.core import experiment as experiment_lib
from research.data import input_pipeline
from research import mesh as mesh_lib
from research.data import inputs as data_inputs
from research.models import impl

PyTree = Any


def _xla_only():
    kernels = impl.kernels()
    return contextlib.nullcontext() if kernels is None else kernels.xla_only()


def _eqn_macs(eqn) -> int:
    out = eqn.outvars[0].aval.shape
    if eqn.primitive.name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return int(np.prod(out)) * int(np.prod([lhs[d] for d in lhs_contract]))
    if eqn.primitive.name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
        per_output = rhs[spec[1]] * int(np.prod([rhs[d] for d in spec[2:]]))
        return int(np.prod(out)) * per_output
    return 0


def _sub_jaxprs(eqn):
    """(jaxpr, how many times it runs) for the computations inside `eqn`."""
    params = eqn.params
    if eqn.primitive.name == "scan":
        return [(params["jaxpr"], params["length"])]
    if eqn.primitive.name == "cond":  # the costliest branch
        return [(max(params["branches"], key=lambda j: sum(count_macs(j).values())),
                 1)]
    found = []
    for value in params.values():
        values = value if isinstance(value, (tuple, list)) else [value]
        found += [(v, 1) for v in values
                  if isinstance(v, (core.Jaxpr, core.ClosedJaxpr))]
    return found


def count_macs(jaxpr, scope: str = "") -> dict[str, int]:
    """Multiply-adds of a (closed) jaxpr by the name stack of the equation
    that does them (flax modules name theirs, e.g. "LeNet/Conv_0"); equations
    inside a call without a name of their own take the call's (`scope`)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    macs = collections.Counter()
    for eqn in jaxpr.eqns:
        name = str(eqn.source_info.name_stack) or scope
        macs[name] += _eqn_macs(eqn)
        for sub, times in _sub_jaxprs(eqn):
            for sub_name, m in count_macs(sub, name).items():
                macs[sub_name] += m * times
    return {k: v for k, v in macs.items() if v}


def forward_macs(exp: experiment_lib.Experiment, batch_size: int = 1
                 ) -> dict[str, int]:
    """Multiply-adds of a forward pass over `batch_size` examples, by layer."""
    shape = (batch_size,) + exp.dataset.input_shape(exp.config)
    with _xla_only():
        variables = jax.eval_shape(functools.partial(
            exp.model.init, train=False), jax.random.key(0),
            jnp.zeros(shape, exp.dataset.input_dtype))
        jaxpr = jax.make_jaxpr(functools.partial(exp.model.apply, train=False))(
            variables, jnp.zeros(shape, exp.dataset.input_dtype))
    return count_macs(jaxpr)


def xla_flops(compiled) -> float:
    """XLA's FLOP count of a compiled program (all ops; loop bodies once)."""
    analysis = compiled.cost_analysis() or {}
    if isinstance(analysis, list):  # older jax: one dict per device
        analysis = analysis[0]
    return float(analysis.get("flops", 0.0))


def synthetic_rows(exp: experiment_lib.Experiment, examples: int
                   ) -> dict[str, np.ndarray]:
    """Random rows shaped like the dataset's (labels or tokens in range)."""
    rng = np.random.default_rng(0)
    config = exp.config
    if isinstance(exp.dataset, input_pipeline.CharacterText):
        vocab = config.model_kwargs.vocab_size
        return {"tokens": rng.integers(0, vocab, (examples, config.seq_len + 1),
                                       dtype=np.int32)}
    return {"image": rng.integers(0, 256, (examples,) + exp.dataset.image_shape,
                                  dtype=np.uint8),
            "label": rng.integers(0, exp.dataset.num_classes, examples,
                                  dtype=np.int32)}


class StepArgs(NamedTuple):
    """A train chunk's input path and arguments, on synthetic data."""
    source: Any
    carry: Any
    inputs: Any
    keys: Any
    aux: Any


def train_step_args(exp: experiment_lib.Experiment, batch_size: int) -> StepArgs:
    """What `exp.train_chunk(args.source, n, state)` takes, on synthetic data (8
    batches of rows on the devices, the in-memory path), ready to lower or
    call as `chunk(args.carry, args.inputs, args.keys, args.aux)`."""
    mesh = exp.mesh
    examples = batch_size * 8
    source = data_inputs.MemoryTrain(input_pipeline.Shard(
        synthetic_rows(exp, examples), (examples,)), batch_size, mesh)
    order = mesh_lib.put_replicated(
        np.random.default_rng(1).permutation(examples).astype(np.int32), mesh)
    keys = jax.device_put({"dropout": jax.random.key(1),
                           "augment": jax.random.key(2)}, mesh_lib.replicated(mesh))
    state = exp.create_state(jax.random.key(0), total_steps=10_000)
    return StepArgs(source, exp.carry(state), {**source.data, "order": order},
                    keys, exp.aux())


def train_step_flops(exp: experiment_lib.Experiment, batch_size: int,
                     args: StepArgs) -> float:
    """XLA's FLOPs of one train step, the kernels counted as their XLA twin."""
    with _xla_only():
        reference = assembly.build(exp.config, mesh=exp.mesh, info=exp.info)
        carry = reference.carry(reference.create_state(jax.random.key(0), 10_000))
        with jax.set_mesh(exp.mesh):
            return xla_flops(reference.train_chunk(args.source, 1, carry.state).lower(
                carry, args.inputs, args.keys, args.aux).compile())
