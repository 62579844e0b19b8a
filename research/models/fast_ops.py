"""CNN building blocks with hand-written VJPs that XLA:CPU runs fast.

Measured in an airbench-style train step (batch 1024, bf16 activations, the
convolutions in oneDNN): autodiff of flax's BatchNorm + GELU + max-pool cost
about as much as the convolutions around them. XLA:CPU reduces a single
input to a per-channel sum quickly, but a reduction with two inputs or two
outputs (sum and sum of squares; sum of dy * x_hat) runs ~8x slower, and
`nn.max_pool`'s gradient (select-and-scatter) is slower still. Here:

- `BatchNormGelu`: gelu(BatchNorm(x)) in training mode (no scale, with bias,
  as airbench's BatchNorm), the same variables as `nn.BatchNorm(use_scale=
  False)` (params `bias`; batch_stats `mean`, `var`; flax's momentum
  convention), batch statistics from two single-input sums, and one VJP for
  both ops: GELU's derivative, then the two sums BatchNorm's gradient needs,
  each over a materialised array, then one elementwise pass;
- `gelu`, `bias_gelu`: exact (erf) GELU, as torch.nn.GELU(), with a one-pass
  VJP; `bias_gelu` also returns the bias gradient as a single-input sum;
- `max_pool2`: 2x2 max pooling, stride 2 (floor), whose VJP routes the
  gradient to the first maximum of each window (as PyTorch does) through an
  int8 index kept from the forward pass.

Every function computes in float32 and returns its input's dtype, so bf16
activations stay bf16 between layers. Tested against flax/jax autodiff in
tests/fast_ops_test.py.
"""
import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def channel_sum(x: jax.Array) -> jax.Array:
    """Float32 sum over all but the last axis; one input, one output (XLA:CPU's
    fast reduction path)."""
    return jnp.sum(x, axis=tuple(range(x.ndim - 1)), dtype=jnp.float32)


def _gelu(z):
    return z * 0.5 * (1.0 + jax.lax.erf(z * _SQRT1_2))


def _gelu_grad(z):
    return 0.5 * (1.0 + jax.lax.erf(z * _SQRT1_2)) + z * _INV_SQRT_2PI * jnp.exp(-0.5 * z * z)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """x * Phi(x) (erf form), computed in float32, in x's dtype."""
    return _gelu(x.astype(jnp.float32)).astype(x.dtype)


def _gelu_fwd(x):
    return gelu(x), x


def _gelu_bwd(x, dy):
    g = dy.astype(jnp.float32) * _gelu_grad(x.astype(jnp.float32))
    return (g.astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


@jax.custom_vjp
def bias_gelu(x: jax.Array, bias: jax.Array) -> jax.Array:
    """gelu(x + bias) over the last axis, in x's dtype."""
    return _gelu(x.astype(jnp.float32) + bias).astype(x.dtype)


def _bias_gelu_fwd(x, bias):
    return bias_gelu(x, bias), (x, bias)


def _bias_gelu_bwd(res, dy):
    x, bias = res
    g = (dy.astype(jnp.float32) * _gelu_grad(x.astype(jnp.float32) + bias)).astype(x.dtype)
    g = jax.lax.optimization_barrier(g)  # materialised: the sum reads one array
    return g, channel_sum(g).astype(bias.dtype)


bias_gelu.defvjp(_bias_gelu_fwd, _bias_gelu_bwd)


def _bn_gelu_fwd(x, bias, eps):
    m = x.size // x.shape[-1]
    s1 = channel_sum(x)
    s2 = channel_sum(jnp.square(jax.lax.optimization_barrier(x).astype(jnp.float32)))
    mean = s1 / m
    var = jnp.maximum(s2 / m - mean * mean, 0.0)
    inv = jax.lax.rsqrt(var + eps)
    z = (x.astype(jnp.float32) - mean) * inv + bias
    return (_gelu(z).astype(x.dtype), mean, var), (x, mean, inv, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def batch_norm_gelu(x: jax.Array, bias: jax.Array, eps: float):
    """Training mode: (gelu((x - mean) / sqrt(var + eps) + bias), mean, var)
    with the batch statistics over all but the last axis (var biased, as
    flax and PyTorch normalise). Gradients flow to x and bias only."""
    return _bn_gelu_fwd(x, bias, eps)[0]


def _bn_gelu_bwd(eps, res, cts):
    del eps
    x, mean, inv, bias = res
    dy = cts[0]  # mean and var only feed the running statistics
    m = x.size // x.shape[-1]
    xhat = (x.astype(jnp.float32) - mean) * inv
    g = dy.astype(jnp.float32) * _gelu_grad(xhat + bias)
    g, gx = jax.lax.optimization_barrier((g, g * xhat))
    dbias, dscale = channel_sum(g), channel_sum(gx)
    dx = inv * (g - dbias / m - xhat * (dscale / m))
    return dx.astype(x.dtype), dbias.astype(bias.dtype)


batch_norm_gelu.defvjp(_bn_gelu_fwd, _bn_gelu_bwd)


class BatchNormGelu(nn.Module):
    """gelu(nn.BatchNorm(use_scale=False, momentum, epsilon)(x)) with the same
    variables, so checkpoints are interchangeable with that pair."""
    momentum: float = 0.99
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        c = x.shape[-1]
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if not train:
            z = ((x.astype(jnp.float32) - ra_mean.value)
                 * jax.lax.rsqrt(ra_var.value + self.epsilon) + bias)
            return _gelu(z).astype(x.dtype)
        y, mean, var = batch_norm_gelu(x, bias, self.epsilon)
        if not self.is_initializing():
            mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y


def _windows(x):
    n, h, w, c = x.shape
    x = x[:, :h - h % 2, :w - w % 2]
    return [x[:, i::2, j::2] for i in (0, 1) for j in (0, 1)]


def _max_pool2_fwd(x):
    # Materialised first: the index compares the input with the max, and a
    # producer that XLA recomputed (differently rounded) in another fusion
    # would match nothing.
    a, b, c, d = _windows(jax.lax.optimization_barrier(x))
    m = jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))
    first = jnp.where(a == m, 0, jnp.where(b == m, 1, jnp.where(c == m, 2, 3)))
    return m, (first.astype(jnp.int8), x.shape)


@jax.custom_vjp
def max_pool2(x: jax.Array) -> jax.Array:
    """2x2 max pooling, stride 2, NHWC; odd heights/widths drop the last
    row/column (floor, as nn.MaxPool2d(2)). NaN-free inputs."""
    return _max_pool2_fwd(x)[0]


def _max_pool2_bwd(res, dy):
    first, shape = res
    n, h, w, c = shape
    parts = [jnp.where(first == k, dy, jnp.zeros_like(dy)) for k in range(4)]
    g = jnp.stack(parts, axis=3).reshape(n, h // 2, w // 2, 2, 2, c)
    g = g.transpose(0, 1, 3, 2, 4, 5).reshape(n, h - h % 2, w - w % 2, c)
    return (jnp.pad(g, ((0, 0), (0, h % 2), (0, w % 2), (0, 0))),)


max_pool2.defvjp(_max_pool2_fwd, _max_pool2_bwd)
