"""Stride-1 2-D convolutions through oneDNN (NHWC, bfloat16, float32 sums).

`conv2d(x, kernel)` computes what `lax.conv_general_dilated(x, kernel, (1, 1),
padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))` computes, with x and the
kernel rounded to bfloat16 and products summed in float32 by oneDNN's AVX-512
BF16 kernels (research/kernels/onednn_conv.cc). Its VJP runs oneDNN's
backward-data and backward-weights primitives: the output gradient is rounded
to bfloat16, the input gradient comes back in x's dtype, the weight gradient in
float32 (summed in float32) and then the kernel's dtype. `Conv` is a drop-in
for `nn.Conv(features, kernel_size, use_bias=False)` with the same parameter
tree (kernel HWIO), so checkpoints move between the two. On several devices
each runs oneDNN on its own rows (`kernels.per_device`).
"""
from collections.abc import Sequence
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

from research import kernels

# How oneDNN uses the cores: "pool" cuts the batch over XLA's intra-op threads
# (one single-threaded oneDNN call each); "omp" runs one call on oneDNN's own
# OpenMP team. $RESEARCH_ONEDNN_THREADING sets the default.
THREADINGS = {"pool": 0, "omp": 1}
THREADING = os.environ.get("RESEARCH_ONEDNN_THREADING", "pool")


def explicit_padding(padding, kernel_size: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """'SAME' / 'VALID' / ((top, bottom), (left, right)) -> explicit pairs
    (SAME as XLA pads at stride 1: the extra one at the end)."""
    if isinstance(padding, str):
        if padding.upper() == "VALID":
            return ((0, 0), (0, 0))
        if padding.upper() == "SAME":
            return tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel_size)
        raise ValueError(f"padding {padding!r}")
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def conv2d(x: jax.Array, kernel: jax.Array, padding="SAME", *,
           out_dtype=None, impl: str = "kernel", threading: str | None = None
           ) -> jax.Array:
    """x [N, H, W, C] (*) kernel [KH, KW, C, O] -> [N, Ho, Wo, O], stride 1.

    out_dtype: of the output (bfloat16 or float32; default x's dtype).
    impl "xla" runs lax.conv_general_dilated on the same bfloat16-rounded
    operands with float32 accumulation (the reference).
    """
    pads = explicit_padding(padding, kernel.shape[:2])
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if kernels.resolve(impl, "conv_impl", library="onednn") == "xla":
        y = lax.conv_general_dilated(
            x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), (1, 1), pads,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            preferred_element_type=jnp.float32)
        return y.astype(out_dtype)
    threading = threading or THREADING
    if threading not in THREADINGS:
        raise ValueError(f"threading {threading!r}; choose from {tuple(THREADINGS)}.")
    config = (pads, THREADINGS[threading])
    return kernels.per_device(lambda x, w: _conv(x, w, config, out_dtype.name),
                              (True, False), x, kernel)


def _attrs(config):
    ((top, bottom), (left, right)), threading = config
    return dict(pad_top=np.int64(top), pad_bottom=np.int64(bottom),
                pad_left=np.int64(left), pad_right=np.int64(right),
                threading=np.int64(threading))


def _fwd_call(x, w, config, out_dtype):
    n, h, width, _ = x.shape
    kh, kw, _, o = w.shape
    (top, bottom), (left, right) = config[0]
    shape = (n, h + top + bottom - kh + 1, width + left + right - kw + 1, o)
    return jax.ffi.ffi_call("research_onednn_conv_fwd",
                            jax.ShapeDtypeStruct(shape, out_dtype),
                            vmap_method="sequential")(x, w, **_attrs(config))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, config, out_dtype):
    """config: (explicit padding, threading code), static."""
    return _fwd_call(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), config, out_dtype)


def _conv_fwd(x, w, config, out_dtype):
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    # Zero-size arrays carry the primal dtypes to the backward pass.
    return (_fwd_call(xb, wb, config, out_dtype),
            (xb, wb, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype)))


def _conv_bwd(config, out_dtype, residuals, dy):
    del out_dtype
    xb, wb, x_like, w_like = residuals
    dy = dy.astype(jnp.bfloat16)
    # bf16 or f32 straight from oneDNN; other dtypes through f32.
    dx_dtype = x_like.dtype if x_like.dtype in (jnp.bfloat16, jnp.float32) else jnp.float32
    dx = jax.ffi.ffi_call("research_onednn_conv_bwd_data",
                          jax.ShapeDtypeStruct(xb.shape, dx_dtype),
                          vmap_method="sequential")(dy, wb, **_attrs(config))
    dw = jax.ffi.ffi_call("research_onednn_conv_bwd_weights",
                          jax.ShapeDtypeStruct(wb.shape, jnp.float32),
                          vmap_method="sequential")(xb, dy, **_attrs(config))
    return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


class Conv(nn.Module):
    """nn.Conv(features, kernel_size, padding, use_bias=False) on oneDNN.

    The parameter is `kernel` [KH, KW, C, O] in param_dtype, initialised as
    nn.Conv does (lecun_normal unless kernel_init says otherwise). Output in
    `dtype` (default: the input's). impl: "kernel" (oneDNN), "xla" (the same
    function through lax.conv_general_dilated) or "auto".
    """
    features: int
    kernel_size: Sequence[int] = (3, 3)
    padding: str | Sequence[tuple[int, int]] = "SAME"
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init,
                            (*self.kernel_size, x.shape[-1], self.features),
                            self.param_dtype)
        return conv2d(x, kernel, self.padding, out_dtype=self.dtype or x.dtype,
                      impl=self.impl)
