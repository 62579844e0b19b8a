"""Convolutions over batch-minor activations, [batch / L, C, H, W, L].

With L images innermost, a CPU vector holds one pixel of L images, so the
few-channel convolutions of small CNNs run as full-width multiply-adds in
the C++ kernel (`conv_kernels.cc`); each block of L images is contiguous.
`conv` and `bias_relu_pool` run the kernel or, with `impl="xla"`, the same
function in XLA (the reference of tests/conv_test.py). Multi-device: each
device runs the kernel on its own blocks (`kernels.per_device`).
"""
import jax
import jax.numpy as jnp
from jax import lax

from research import kernels


def lanes_for(n: int) -> int:
    """Images per block for a batch of n: 16 (a 512-bit vector) for large
    batches, else whichever of 16, 8, 4 pads n the least (larger on ties).
    Zen 4 runs a 16-float multiply-add as two 8-float halves, so 8 costs no
    speed there; 4 halves the rate but pads a batch of 4 not at all."""
    if n >= 64:
        return 16
    return min((16, 8, 4), key=lambda lanes: (-n % lanes, -lanes))


def to_blocks(x: jax.Array, lanes: int) -> jax.Array:
    """NHWC [N, H, W, C] -> [ceil(N / lanes), C, H, W, lanes], zero-padded."""
    n, h, w, c = x.shape
    x = jnp.pad(x, ((0, -n % lanes), (0, 0), (0, 0), (0, 0)))
    return x.reshape(-1, lanes, h, w, c).transpose(0, 4, 2, 3, 1)


def from_blocks(x: jax.Array, n: int) -> jax.Array:
    """[N / L, C, H, W, L] -> NHWC [n, H, W, C] (drops the padding)."""
    nb, c, h, w, lanes = x.shape
    return x.transpose(0, 4, 2, 3, 1).reshape(nb * lanes, h, w, c)[:n]


def conv(x: jax.Array, w: jax.Array, impl: str = "auto") -> jax.Array:
    """Valid cross-correlation, stride 1: x [N/L, C, H, W, L] (L = 4, 8 or
    16) and w [K, K, C, O] (flax's HWIO) -> [N/L, O, H-K+1, W-K+1, L]."""
    if kernels.resolve(impl, "conv_impl") == "kernel":
        return kernels.per_device(_kernel_conv, (True, False), x, w)
    nb, c, h, width, lanes = x.shape
    chwn = x.transpose(1, 2, 3, 0, 4).reshape(c, h, width, nb * lanes)
    y = lax.conv_general_dilated(chwn, w, (1, 1), "VALID",
                                 dimension_numbers=("CHWN", "HWIO", "CHWN"))
    o, ho, wo, _ = y.shape
    return y.reshape(o, ho, wo, nb, lanes).transpose(3, 0, 1, 2, 4)


def bias_relu_pool(y: jax.Array, bias: jax.Array, impl: str = "auto") -> jax.Array:
    """max_pool(relu(y + bias)) with 2x2 windows: y [N/L, O, H, W, L], bias
    [O] -> [N/L, O, H/2, W/2, L]. The kernel does it in one pass and keeps
    only which input won each window for the gradient."""
    if kernels.resolve(impl, "conv_impl") == "kernel":
        return kernels.per_device(_kernel_bias_relu_pool, (True, False), y, bias)
    return max_pool(jax.nn.relu(y + bias[:, None, None, None]))


def max_pool(x: jax.Array, window: int = 2) -> jax.Array:
    """Non-overlapping max pooling over H and W of [N/L, C, H, W, L]."""
    nb, c, h, w, lanes = x.shape
    x = x[:, :, :h - h % window, :w - w % window]
    return x.reshape(nb, c, h // window, window, w // window, window,
                     lanes).max(axis=(3, 5))


def _out_shape(x: jax.Array, w: jax.Array) -> jax.ShapeDtypeStruct:
    nb, _, h, width, lanes = x.shape
    k, _, _, o = w.shape
    return jax.ShapeDtypeStruct((nb, o, h - k + 1, width - k + 1, lanes), jnp.float32)


def _fwd_call(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.ffi.ffi_call("research_conv_fwd", _out_shape(x, w),
                            vmap_method="sequential")(x, w)


@jax.custom_vjp
def _kernel_conv(x: jax.Array, w: jax.Array) -> jax.Array:
    return _fwd_call(x, w)


def _kernel_conv_fwd(x, w):
    return _fwd_call(x, w), (x, w)


def _kernel_conv_bwd(residuals, dy):
    x, w = residuals
    k = w.shape[0]
    dw = jax.ffi.ffi_call("research_conv_dw", jax.ShapeDtypeStruct(w.shape, w.dtype),
                          vmap_method="sequential")(x, dy)
    # The input gradient is a full correlation of dy with the flipped kernel;
    # XLA drops it where nothing uses it (the first layer's input).
    pad = (k - 1, k - 1)
    dy_padded = jnp.pad(dy, ((0, 0), (0, 0), pad, pad, (0, 0)))
    dx = _fwd_call(dy_padded, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2))
    return dx, dw


_kernel_conv.defvjp(_kernel_conv_fwd, _kernel_conv_bwd)


def _pool_call(y: jax.Array, bias: jax.Array) -> tuple[jax.Array, jax.Array]:
    nb, o, h, w, lanes = y.shape
    shape = (nb, o, h // 2, w // 2, lanes)
    return jax.ffi.ffi_call(
        "research_bias_relu_pool",
        (jax.ShapeDtypeStruct(shape, jnp.float32),
         jax.ShapeDtypeStruct(shape, jnp.int8)),
        vmap_method="sequential")(y, bias)


@jax.custom_vjp
def _kernel_bias_relu_pool(y: jax.Array, bias: jax.Array) -> jax.Array:
    return _pool_call(y, bias)[0]


def _kernel_bias_relu_pool_fwd(y, bias):
    pooled, winners = _pool_call(y, bias)
    return pooled, (winners, jax.ShapeDtypeStruct(y.shape, y.dtype))


def _kernel_bias_relu_pool_bwd(residuals, dpooled):
    winners, y = residuals
    return tuple(jax.ffi.ffi_call(
        "research_bias_relu_pool_grad",
        (jax.ShapeDtypeStruct(y.shape, jnp.float32),
         jax.ShapeDtypeStruct((y.shape[1],), jnp.float32)),
        vmap_method="sequential")(dpooled, winners))


_kernel_bias_relu_pool.defvjp(_kernel_bias_relu_pool_fwd, _kernel_bias_relu_pool_bwd)
