"""Int8 quantization on qwix: post-training, quantization-aware training, export.

Both modes quantize every convolution and dense op
(`jax.lax.conv_general_dilated`, `jax.lax.dot_general`) inside modules whose
path matches `module_path`: weights symmetrically per output channel, inputs
symmetrically per tensor (per example in QAT); int8 with qwix's scale
absmax / 127.5, rounding to nearest and saturating to [-128, 127], so
|w - q * scale| <= scale / 2.

qwix works by intercepting those lax calls while the model's `__call__`
runs. Ops it cannot see stay float, e.g. LeNet's C++ convolution kernel
(`conv_impl="kernel"`): quantize models built with `conv_impl="xla"` (the
parameters are the same). `post_training_quantize` raises if a kernel it
should have quantized stayed float.

Where qwix falls short, and what is done here instead:
- qwix has no file format for deployable int8 weights (its quantized params
  are in-memory `QArray` pytrees). `export_int8` / `load_int8` write and read
  a compact file by hand; the numbers themselves come from `qwix.quantize`.
- qwix's post-training convolution needs act_qtype == weight_qtype, so conv
  layers are always W8A8 (no weight-only int8 convolution).
- qwix collects static-range statistics (QtProvider, act_static_scale)
  inside the custom_vjp of its quantized ops, which leaks a tracer under
  `jax.jit`; calibration therefore runs op by op (un-jitted).
- qwix's static activation range is the mean over examples of each
  example's absmax, so larger-than-average activations saturate. The
  default here is the maximum instead, read from qwix's per-example
  statistics (`act_batch_axes=()`); `act_range="mean"` keeps qwix's.
"""
import functools
import json
import os
import re
import struct
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import linen as nn
from flax import traverse_util

from research import errors

PyTree = Any

_QTYPE = jnp.int8
_MAGIC = b"RI8\x01"  # research int8, format version 1.


class QuantizedModel(NamedTuple):
    """What the eval step needs: `apply_fn(variables, x, train=False)` -> logits."""
    apply_fn: Callable[..., Any]
    variables: dict[str, PyTree]  # int8 kernels (qwix QArrays); the rest float.


def _rules(rule_type: type, module_path: str, *, static: bool,
           **kwargs: Any) -> list[Any]:
    return [rule_type(module_path=module_path, weight_qtype=_QTYPE,
                      act_qtype=_QTYPE, act_static_scale=static, **kwargs)]


def create_qat_model(model: nn.Module, *, module_path: str = ".*") -> nn.Module:
    """`model` training through int8 fake quantization (qwix `QtProvider`).

    The forward pass quantizes weights (per output channel) and inputs (per
    example, dynamic absmax ranges, so no extra variable collection is
    needed) of every matched conv and dense op; the backward pass is
    straight-through. The parameters and their tree stay the float ones:
    `init`, `apply`, `TrainState` and checkpoints work unchanged, and
    `post_training_quantize` turns the trained params into an int8 model.
    qwix's gradients: for dense layers those of the float op at the float
    inputs (it keeps the unquantized residuals); for convolutions those of
    the float op at the quantized inputs and weights.

    Args:
      model: a Linen module taking `(x, *, train)`.
      module_path: regex on module paths ("Conv_0", "Dense_2") to quantize.

    Returns:
      A Linen module with the same parameters and call signature.
    """
    provider = qwix.QtProvider(_rules(qwix.QtRule, module_path, static=False))
    return qwix.quantize_model(model, provider)


def check_traceable(model: nn.Module, x: jax.Array) -> None:
    """Raises UserError if `model` (under qwix) would leave ops float: qwix
    intercepts XLA's conv and dot_general, not custom calls (the C++ CPU
    kernels). Traces the model once, without running it."""
    jaxpr = str(jax.make_jaxpr(lambda x: model.init_with_output(
        jax.random.key(0), x, train=False)[0])(x))
    if "ffi_call" in jaxpr:
        raise errors.UserError(
            "Quantization needs the model's convolutions and matmuls in XLA, but "
            "it calls a custom kernel; set its kernel option (e.g. "
            "model_kwargs.conv_impl) to 'xla'.")


ACT_RANGES = ("max", "mean")


def post_training_quantize(model: nn.Module, variables: dict[str, PyTree],
                           calibration_batches: Iterable[Any], *,
                           module_path: str = ".*", act_range: str = "max"
                           ) -> QuantizedModel:
    """Int8 weights and statically calibrated int8 activations (W8A8).

    Runs the model over the calibration batches with qwix's `QtProvider`
    (`act_static_scale`) to collect each op input's per-example absmax, then
    `qwix.quantize_params` turns the float params and those statistics into
    the params of the qwix `PtqProvider` model: int8 kernels with float32
    scales per output channel, one float32 scale per op input, biases and
    BatchNorm float.

    `act_range` picks the static range from the per-example absmaxes:
    "max", their maximum over all calibration examples (no calibration
    example saturates); or "mean", qwix's own statistic, the mean over
    batches of the mean over examples, which saturates larger-than-average
    activations. In random-data checks of LeNet and ConvNet, "max" gave
    logit errors from about equal to 10x smaller.

    Args:
      model: the float Linen module, taking `(x, *, train)`.
      variables: its variables ({"params": ..., "batch_stats": ...}).
      calibration_batches: model inputs, e.g. [batch, height, width, channels]
        images from the training set; at least one.
      module_path: regex on module paths to quantize.
      act_range: "max" or "mean".

    Returns:
      A `QuantizedModel`; jit its `apply_fn` as the eval step does.

    Raises:
      UserError: unknown act_range.
      ValueError: no calibration batch, or a matched kernel stayed float
        (its op was not a lax conv / dot_general that qwix could intercept).
    """
    if act_range not in ACT_RANGES:
        raise errors.UserError(f"Unknown act_range {act_range!r}; choose from "
                               f"{list(ACT_RANGES)}.")
    stats, first, num_batches = None, None, 0
    for x in calibration_batches:
        x = jnp.asarray(x)
        first = x if first is None else first
        num_batches += 1
        absmax = _example_absmax(model, variables, x, module_path)
        if act_range == "max":
            batch = jax.tree.map(lambda a: a.max(0, keepdims=True), absmax)
            stats = batch if stats is None else jax.tree.map(jnp.maximum, stats,
                                                            batch)
        else:
            batch = jax.tree.map(lambda a: a.mean(0, keepdims=True), absmax)
            stats = batch if stats is None else jax.tree.map(jnp.add, stats, batch)
    if first is None:
        raise ValueError("post_training_quantize needs at least one calibration "
                         "batch.")
    ptq = qwix.quantize_model(model, qwix.PtqProvider(
        _rules(qwix.QuantizationRule, module_path, static=True)))
    abstract = _abstract_init(ptq, first)["params"]
    # qwix's statistics format: the range is sum_of_absmax / count.
    count = jnp.int32(1 if act_range == "max" else num_batches)
    quant_stats = jax.tree.map(
        lambda s: {"count": count, "sum_of_absmax": s}, stats)
    # quantize_params takes jax arrays only (not numpy).
    params = jax.tree.map(jnp.asarray, variables["params"])
    params = qwix.quantize_params(params, abstract, quant_stats)
    _check_quantized(params, module_path)
    return QuantizedModel(ptq.apply, {**variables, "params": params})


def _abstract_init(model: nn.Module, x: jax.Array) -> PyTree:
    """`model.init`'s shapes and dtypes (no values computed)."""
    return jax.eval_shape(functools.partial(model.init, train=False),
                          jax.random.key(0), x)


def _example_absmax(model: nn.Module, variables: dict[str, PyTree],
                    x: jax.Array, module_path: str) -> PyTree:
    """{module: {op_input: [batch, 1, ...]}}: each example's input absmax.

    With act_batch_axes=() qwix's statistics keep the batch axis, so one
    pass gives every example's absmax.
    """
    rules = _rules(qwix.QtRule, module_path, static=True, act_batch_axes=())
    observer = qwix.quantize_model(model, qwix.QtProvider(rules))
    # No "quant_stats" at all when no op matched: nothing to calibrate.
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         _abstract_init(observer, x).get("quant_stats", {}))
    # Not jitted: qwix updates the statistics inside the custom_vjp of its
    # quantized conv / dot_general, which leaks a tracer under jax.jit. Op by
    # op is fine for the few batches calibration needs.
    _, updated = observer.apply({**variables, "quant_stats": zeros}, x,
                                train=False, mutable=["quant_stats"])
    # From zero statistics one update leaves count 1 and the sum = the value.
    return jax.tree.map(lambda s: s["sum_of_absmax"],
                        updated.get("quant_stats", {}),
                        is_leaf=lambda s: isinstance(s, dict) and "count" in s)


def _check_quantized(params: PyTree, module_path: str) -> None:
    """Raises if a kernel of a matched module is still a float array."""
    for path, leaf in traverse_util.flatten_dict(params).items():
        module = "/".join(map(str, path[:-1]))
        if (path[-1] == "kernel" and isinstance(leaf, jax.Array)
                and re.fullmatch(module_path, module)):
            name = "/".join(map(str, path))
            raise ValueError(
                f"{name} was not quantized: qwix only sees "
                "jax.lax.conv_general_dilated and dot_general calls (build "
                "LeNet with conv_impl='xla').")


@functools.partial(jax.jit, static_argnames="axis")
def _int8_per_channel(w: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """qwix's symmetric int8 values and float32 scales along `axis`."""
    q = qwix.quantize(w.astype(jnp.float32), _QTYPE, channelwise_axes=[axis])
    return q.qvalue, q.scale.reshape(-1)


def _is_kernel(name: str, leaf: np.ndarray) -> bool:
    return (name.rsplit("/", 1)[-1] == "kernel" and leaf.ndim >= 2
            and jnp.issubdtype(leaf.dtype, jnp.floating))


def _flat_names(params: PyTree) -> dict[str, np.ndarray]:
    """{"Conv_0/kernel": array} for a tree of dicts with plain string keys."""
    flat = {}
    for path, leaf in traverse_util.flatten_dict(params).items():
        if not all(isinstance(k, str) and k and "/" not in k for k in path):
            raise ValueError(f"export_int8 needs string keys without '/'; got "
                             f"{path}.")
        flat["/".join(path)] = np.asarray(leaf)
    return flat


def export_int8(params: PyTree, path: str | os.PathLike) -> int:
    """Writes int8 kernels with float32 per-output-channel scales.

    Every floating "kernel" leaf with two or more axes (conv HWIO, dense
    [in, out]) is stored as int8 values plus one float32 scale per entry of
    its last (output) axis, from `qwix.quantize` (symmetric absmax); every
    other leaf (biases, BatchNorm, batch_stats if given) is stored as is.

    File layout: magic b"RI8\\x01", a little-endian uint32 header length, a
    JSON header listing [name, kind, shape(, dtype)] per leaf, then the raw
    little-endian bytes of each leaf in header order (for "int8" leaves the
    values, then the scales).

    Args:
      params: a pytree of nested dicts (e.g. `state.params`).
      path: the file to write.

    Returns:
      The file's size in bytes.
    """
    header, blobs = [], []
    for name, leaf in _flat_names(params).items():
        if _is_kernel(name, leaf):
            values, scales = _int8_per_channel(leaf, leaf.ndim - 1)
            header.append([name, "int8", list(leaf.shape)])
            blobs.append(np.asarray(values, np.int8).tobytes())
            blobs.append(np.asarray(scales, "<f4").tobytes())
        else:
            dtype = leaf.dtype.newbyteorder("<")
            header.append([name, "raw", list(leaf.shape), leaf.dtype.name])
            blobs.append(np.ascontiguousarray(leaf, dtype).tobytes())
    text = json.dumps(header, separators=(",", ":")).encode()
    with open(path, "wb") as f:
        f.write(_MAGIC + struct.pack("<I", len(text)) + text + b"".join(blobs))
    return os.path.getsize(path)


def load_int8(path: str | os.PathLike) -> PyTree:
    """Reads an `export_int8` file back as float params.

    Kernels come back dequantized (int8 value * float32 scale, the same
    numbers as `qwix.dequantize`); the other leaves exactly as written.

    Args:
      path: a file written by `export_int8`.

    Returns:
      Nested dicts of jax arrays, shaped like the exported params.
    """
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != _MAGIC:
        raise ValueError(f"{path} is not an export_int8 file.")
    (length,) = struct.unpack_from("<I", data, 4)
    offset = 8 + length
    flat = {}
    for name, kind, shape, *dtype in json.loads(data[8:offset]):
        shape = tuple(shape)
        size = int(np.prod(shape))
        if kind == "int8":
            q = np.frombuffer(data, np.int8, size, offset).reshape(shape)
            offset += size
            scale = np.frombuffer(data, "<f4", shape[-1], offset)
            offset += 4 * shape[-1]
            value = q.astype(np.float32) * scale.astype(np.float32)
        else:
            dt = np.dtype(jnp.dtype(dtype[0])).newbyteorder("<")
            value = np.frombuffer(data, dt, size, offset).reshape(shape)
            offset += size * dt.itemsize
        flat[tuple(name.split("/"))] = jnp.asarray(value)
    if offset != len(data):
        raise ValueError(f"{path}: {len(data) - offset} unexpected trailing bytes.")
    return traverse_util.unflatten_dict(flat)
