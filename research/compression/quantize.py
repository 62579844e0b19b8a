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
  the quantized model's own variables by hand, never re-quantizing: the file
  is the scored model, bit for bit, on any CPU.
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
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import qwix
import safetensors
import safetensors.numpy
# WithAux and HowToQuantize: the PTQ params' leaf types, not exported by name.
from qwix._src.core import qarray as qwix_qarray
from qwix._src.providers import ptq as qwix_ptq
from flax import linen as nn
from flax import traverse_util

from research import errors
from research.core import config_lib
from research import models

PyTree = Any

_QTYPE = jnp.int8
# The exported file: safetensors, with this metadata key describing the leaves.
_METADATA_KEY = "research.int8"
_FORMAT = "1"


class QuantizedModel(NamedTuple):
    """What the eval step needs: `apply_fn(variables, x, train=False)` -> logits."""
    apply_fn: Callable[..., Any]
    variables: dict[str, PyTree]  # int8 kernels (qwix QArrays); the rest float.


def _rules(rule_type: type, module_path: str, *, static: bool,
           activations: bool = True, **kwargs: Any) -> list[Any]:
    if not activations:  # int8 weights, float inputs (dense ops only in qwix)
        return [rule_type(module_path=module_path, weight_qtype=_QTYPE, **kwargs)]
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


def check_traceable(model: nn.Module, x: jax.Array, *, name: str = "this model",
                    impl_fields: Iterable[str] = ("conv_impl",)) -> None:
    """Raises UserError if `model` (under qwix) cannot be quantized: qwix
    fails to trace it, or it would leave ops float (qwix intercepts XLA's
    conv and dot_general, not the custom calls of the C++ CPU kernels).
    Traces the model once, without running it.

    Args:
      model: the model under qwix (`create_qat_model` or the PTQ observer).
      x: an input of the right shape and dtype.
      name: the model's registered name, for the message.
      impl_fields: its kernel options (`model_kwargs.<field>`), for the message.
    """
    try:
        jaxpr = str(jax.make_jaxpr(lambda x: model.init_with_output(
            jax.random.key(0), x, train=False)[0])(x))
    except (TypeError, NotImplementedError) as e:
        raise errors.UserError(
            f"Quantization does not support {name}: qwix cannot trace it "
            f"({type(e).__name__}: {str(e).splitlines()[0]}). Quantize one of "
            "the CNNs (lenet, convnet, airbench) or the GPT.") from None
    if "ffi_call" in jaxpr:
        fields = " and ".join(f"model_kwargs.{f}" for f in impl_fields)
        raise errors.UserError(
            f"Quantization needs {name}'s convolutions and matmuls in XLA, but "
            f"it calls a custom kernel; set {fields or 'its kernel option'} to "
            "'xla'.")


ACT_RANGES = ("max", "mean")


def post_training_quantize(model: nn.Module, variables: dict[str, PyTree],
                           calibration_batches: Iterable[Any], *,
                           module_path: str = ".*", act_range: str = "max",
                           activations: bool = True) -> QuantizedModel:
    """Int8 weights and statically calibrated int8 activations (W8A8), or,
    with `activations=False`, int8 weights only (W8A16: the op's inputs stay
    float; dense ops only, as qwix's convolutions need both).

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
      activations: quantize the ops' inputs too (else only one calibration
        batch is read, for the shapes).

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
        if not activations:  # weights only: one batch, for the shapes
            break
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
    ptq = qwix.quantize_model(model, qwix.PtqProvider(_rules(
        qwix.QuantizationRule, module_path, static=activations,
        activations=activations)))
    abstract = _abstract_init(ptq, first)["params"]
    quant_stats = {}
    if activations:  # qwix's statistics format: the range is sum_of_absmax / count
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


def _flat_leaves(variables: PyTree) -> dict[str, Any]:
    """{"params/Conv_0/kernel": leaf} for nested dicts with plain string
    keys; qwix's `WithAux` leaves stay whole."""
    flat = {}
    for path, leaf in traverse_util.flatten_dict(variables).items():
        if not all(isinstance(k, str) and k and "/" not in k and ":" not in k
                   for k in path):
            raise ValueError(f"export_int8 needs string keys without '/' or ':'; "
                             f"got {path}.")
        flat["/".join(path)] = leaf
    return flat


def _how_to_json(how: qwix_qarray.HowToQuantize) -> dict[str, Any]:
    if how.noise_fn is not None or jnp.dtype(how.qtype) != _QTYPE:
        raise ValueError(f"export_int8 writes int8 without noise functions; "
                         f"got {how}.")
    return {"channelwise_axes": list(how.channelwise_axes),
            "tiled_axes": {str(k): v for k, v in how.tiled_axes.items()},
            "calibration_method": how.calibration_method}


def _how_from_json(how: dict[str, Any]) -> qwix_qarray.HowToQuantize:
    return qwix_qarray.HowToQuantize(
        qtype=_QTYPE, channelwise_axes=how["channelwise_axes"],
        tiled_axes={int(k): v for k, v in how["tiled_axes"].items()},
        calibration_method=how["calibration_method"])


def export_int8(variables: PyTree, path: str | os.PathLike, *,
                model: dict[str, Any] | None = None) -> int:
    """Writes a quantized model's variables as safetensors: the scored model,
    bit for bit.

    `variables` are `post_training_quantize(...).variables`: their int8
    kernels (qwix `QArray`s) are written as they are, values and scales,
    never re-quantized, so `load_int8` gives back exactly the numbers that
    were evaluated. The static activation scales, biases and BatchNorm
    parameters and statistics are written as they are too.

    Layout: one tensor per leaf, named by its path ("params/Conv_0/bias");
    an int8 kernel is two tensors, "<path>:qvalue" (int8) and "<path>:scale"
    (float32, one per output channel, shaped to broadcast against the
    values: kernel = qvalue * scale). The metadata "research.int8" holds a
    JSON object: "format" (its version), "leaves" ({path: {"kind": "qarray" |
    "aux" | "raw", "how": qwix's recipe}}) and, if given, "model".

    Args:
      variables: nested dicts of arrays holding at least one int8 kernel.
      path: the file to write.
      model: how to rebuild the model: {"model": registered name,
        "model_kwargs": {...}, "module_path": the quantized modules' regex,
        "activations": False for int8 weights only (default True)};
        `load_int8_model` needs it.

    Returns:
      The file's size in bytes.

    Raises:
      ValueError: no int8 kernel in `variables` (pass the quantized model's,
        not the float ones), or leaves this format cannot hold.
    """
    tensors, leaves = {}, {}
    for name, leaf in _flat_leaves(variables).items():
        array = getattr(leaf, "array", leaf)
        if isinstance(array, qwix.QArray):
            if array.zero_point is not None:
                raise ValueError(f"{name}: export_int8 writes symmetric int8 only.")
            tensors[f"{name}:qvalue"] = np.asarray(array.qvalue)
            tensors[f"{name}:scale"] = np.asarray(array.scale)
            leaves[name] = {"kind": "qarray", "how": _how_to_json(leaf.how)}
        elif hasattr(leaf, "how"):
            tensors[name] = np.asarray(array)
            leaves[name] = {"kind": "aux", "how": _how_to_json(leaf.how)}
        else:
            tensors[name] = np.asarray(leaf)
            leaves[name] = {"kind": "raw"}
    if not any(v["kind"] == "qarray" for v in leaves.values()):
        raise ValueError("export_int8 found no int8 kernel: pass the variables of "
                         "post_training_quantize's model, not the float ones.")
    header = {"format": _FORMAT, "leaves": leaves}
    if model is not None:
        header["model"] = model
    safetensors.numpy.save_file(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path),
        metadata={_METADATA_KEY: json.dumps(header, separators=(",", ":"))})
    return os.path.getsize(path)


def _read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The header and tensors of an `export_int8` file."""
    try:
        with safetensors.safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (safetensors.SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); "
                         "re-export it from the quantized model.") from None
    if _METADATA_KEY not in metadata:
        raise ValueError(f"{path} is not an export_int8 file (no "
                         f"{_METADATA_KEY!r} metadata).")
    header = json.loads(metadata[_METADATA_KEY])
    if header.get("format") != _FORMAT:
        raise ValueError(f"{path}: export_int8 format {header.get('format')!r}, "
                         f"this code reads {_FORMAT!r}; re-export it.")
    return header, tensors


def load_int8(path: str | os.PathLike) -> PyTree:
    """Reads an `export_int8` file back as the quantized model's variables.

    The result is equal, leaf for leaf and bit for bit, to what was exported:
    `QuantizedModel.apply_fn(load_int8(path), x, train=False)` gives the
    scored model's logits. `qwix.dequantize` of a kernel's `.array` gives
    its float values.

    Returns:
      Nested dicts: qwix `WithAux` leaves for the quantized kernels and
      activation scales, jax arrays for the rest.

    Raises:
      ValueError: not an `export_int8` file of this format, or a damaged one.
    """
    header, tensors = _read(path)
    flat = {}
    for name, leaf in header["leaves"].items():
        try:
            if leaf["kind"] == "qarray":
                value = qwix_ptq.WithAux(
                    qwix.QArray(qvalue=jnp.asarray(tensors[f"{name}:qvalue"]),
                                scale=jnp.asarray(tensors[f"{name}:scale"]),
                                zero_point=None, qtype=_QTYPE),
                    _how_from_json(leaf["how"]))
            elif leaf["kind"] == "aux":
                value = qwix_ptq.WithAux(jnp.asarray(tensors[name]),
                                         _how_from_json(leaf["how"]))
            else:
                value = jnp.asarray(tensors[name])
        except KeyError as e:
            raise ValueError(f"{path} lacks the tensor {e}; re-export it.") from None
        flat[tuple(name.split("/"))] = value
    return traverse_util.unflatten_dict(flat)


def load_int8_model(path: str | os.PathLike) -> QuantizedModel:
    """The quantized model from an `export_int8` file alone: the registered
    model the file names, quantized as it was, with the file's variables.
    Its logits equal those of the model that was exported.

    Raises:
      ValueError: the file does not say which model it holds (exported
        without `model`), or is not an `export_int8` file.
      UserError: the model it names is not registered here.
    """
    header, _ = _read(path)
    if "model" not in header:
        raise ValueError(f"{path} does not name its model (exported without "
                         "`model=`); build the model and use load_int8.")
    spec = header["model"]
    model = models.create_model(spec["model"], **spec["model_kwargs"])
    activations = spec.get("activations", True)
    ptq = qwix.quantize_model(model, qwix.PtqProvider(
        _rules(qwix.QuantizationRule, spec["module_path"], static=activations,
               activations=activations)))
    return QuantizedModel(ptq.apply, load_int8(path))


# Quantization-aware training: the model under qwix's fake quantization
# (`create_qat_model`, applied by the assembly); off by default.
SECTION = config_lib.Section("quant", {"quant": {
    "qat": False,                 # train through int8 fake quantization (qwix)
}})
