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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

from research import experiment
from research import input_pipeline
from research import parallel
from research import sharded_data
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


def forward_macs(exp: experiment.Experiment, batch_size: int = 1
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


def synthetic_rows(exp: experiment.Experiment, examples: int
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


def train_step_args(exp: experiment.Experiment, batch_size: int
                    ) -> tuple[Any, ...]:
    """The arguments of `exp.train_chunk(n, batch_size)` on synthetic data
    (8 batches of rows on the devices), ready to lower or call."""
    mesh = exp.mesh
    examples = batch_size * 8
    rows, row_of = sharded_data.place_rows(
        input_pipeline.Shard(synthetic_rows(exp, examples), (examples,)), mesh)
    order = parallel.put_replicated(
        np.random.default_rng(1).permutation(examples).astype(np.int32), mesh)
    keys = jax.device_put({"dropout": jax.random.key(1),
                           "augment": jax.random.key(2)}, parallel.replicated(mesh))
    return (exp.create_state(jax.random.key(0), total_steps=10_000),
            parallel.put_replicated(exp.objective.metrics_cls.empty(), mesh),
            parallel.put_replicated(np.int32(-1), mesh),
            {"rows": rows, "row_of": row_of}, order, keys, exp.aux())


def train_step_flops(exp: experiment.Experiment, batch_size: int, args) -> float:
    """XLA's FLOPs of one train step, the kernels counted as their XLA twin."""
    with _xla_only():
        reference = experiment.build(exp.config, mesh=exp.mesh, info=exp.info)
        state = reference.create_state(jax.random.key(0), 10_000)
        with jax.set_mesh(exp.mesh):
            return xla_flops(reference.train_chunk(1, batch_size).lower(
                state, *args[1:]).compile())
