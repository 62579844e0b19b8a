"""The oneDNN convolutions (research/kernels/onednn.py) against
lax.conv_general_dilated in float32: outputs, input and weight gradients.

Tolerances. oneDNN multiplies bfloat16 operands and sums in float32:
- on operands that are exactly bfloat16 (rounded before the call), every
  product is exact in float32 and only the order of the float32 sums differs
  from the reference, so float32 results must agree to ~1e-6 of the largest
  magnitude (RTOL below; the weight gradients sum up to 10^5 terms);
- on arbitrary float32 operands, rounding each operand to bfloat16 (8
  significant bits: relative error <= u = 2^-8) changes each product by at
  most (1 + u)^2 - 1 < 1.01 * 2^-7 of its magnitude, so |result - reference|
  <= 1.01 * 2^-7 * (|x| (*) |w|) elementwise (the same convolution on
  absolute values), plus the float32 sum-order term;
- a bfloat16 output adds one more rounding: 2^-8 of |result|, below
  2^-8 * (|reference| + the bound above).
Skipped where the library is not built or oneDNN is not installed, unless
$RESEARCH_REQUIRE_KERNELS is set.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import lax

from research import kernels
from research.kernels import onednn as oc

if not kernels.onednn_available():
    if os.environ.get("RESEARCH_REQUIRE_KERNELS"):
        raise RuntimeError("$RESEARCH_REQUIRE_KERNELS is set but the oneDNN "
                           f"convolutions are unavailable: {kernels.onednn_load_error()}")
    pytest.skip(f"oneDNN convolutions unavailable: {kernels.onednn_load_error()}",
                allow_module_level=True)

RTOL = 2e-6
BF16_U = 2.0 ** -8  # bfloat16's unit roundoff (8 significant bits)
PRODUCT = 1.01 * 2.0 ** -7  # > (1 + u)^2 - 1: both operands of a product rounded


def _bf16_exact(rng, shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32)


def _ref(x, w, pads):
    return lax.conv_general_dilated(x, w, (1, 1), pads,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=lax.Precision.HIGHEST)


def _ref_grads(x, w, pads, dy):
    _, vjp = jax.vjp(lambda a, b: _ref(a, b, pads), x, w)
    return vjp(dy)


def _close(actual, expected, rtol=RTOL, bound=None):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = np.max(np.abs(expected))
    allowed = rtol * scale + (0.0 if bound is None else np.asarray(bound, np.float64))
    err = np.abs(actual - expected)
    assert np.all(err <= allowed), (float(np.max(err - allowed)), float(scale))


# (batch, height, width, channels, outputs, kernel, padding): the airbench
# layers at small batch, and odd shapes (asymmetric SAME padding of 2x2, one
# image, widths that fill no vector, 1x1).
SHAPES = [(4, 32, 32, 3, 24, 2, "VALID"), (3, 31, 31, 24, 64, 3, "SAME"),
          (2, 15, 15, 64, 64, 3, "SAME"), (5, 15, 15, 64, 128, 3, "SAME"),
          (2, 7, 7, 128, 128, 3, "SAME"), (3, 3, 3, 128, 128, 3, "SAME"),
          (1, 9, 9, 5, 7, 2, "SAME"), (3, 7, 5, 16, 8, 3, "SAME"),
          (2, 6, 11, 17, 3, 1, "VALID"), (2, 8, 8, 4, 6, 3, ((0, 2), (1, 0)))]


@pytest.mark.parametrize("threading", ["pool", "omp"])
@pytest.mark.parametrize("n,h,w,c,o,k,padding", SHAPES)
def test_matches_lax_conv_on_bf16_operands(n, h, w, c, o, k, padding, threading):
    """float32 out and gradients: only the float32 sum order differs."""
    rng = np.random.default_rng(n * 1000 + h * 10 + c)
    x, kernel = _bf16_exact(rng, (n, h, w, c)), _bf16_exact(rng, (k, k, c, o))
    pads = oc.explicit_padding(padding, (k, k))
    fn = jax.jit(lambda a, b: oc.conv2d(a, b, padding, out_dtype=jnp.float32,
                                        threading=threading))
    y, vjp = jax.vjp(fn, x, kernel)
    expected = _ref(x, kernel, pads)
    assert y.shape == expected.shape and y.dtype == jnp.float32
    _close(y, expected)
    dy = _bf16_exact(rng, expected.shape)
    dx, dw = vjp(dy)
    dx_ref, dw_ref = _ref_grads(x, kernel, pads, dy)
    assert dx.dtype == jnp.float32 and dw.dtype == jnp.float32
    _close(dx, dx_ref)
    _close(dw, dw_ref, rtol=1e-5)


@pytest.mark.parametrize("n,h,w,c,o,k,padding", SHAPES[:6])
def test_float32_operands_within_bf16_bound(n, h, w, c, o, k, padding):
    """Arbitrary float32 operands, bfloat16 output: within the rounding bound."""
    rng = np.random.default_rng(7 + n + c)
    x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, c, o)), jnp.float32)
    pads = oc.explicit_padding(padding, (k, k))
    y, vjp = jax.vjp(lambda a, b: oc.conv2d(a, b, padding, out_dtype=jnp.bfloat16),
                     x, kernel)
    expected = _ref(x, kernel, pads)
    assert y.dtype == jnp.bfloat16
    bound = PRODUCT * _ref(jnp.abs(x), jnp.abs(kernel), pads)
    bound += BF16_U * (jnp.abs(expected) + bound)
    _close(y.astype(jnp.float32), expected, bound=bound)
    dy = jnp.asarray(rng.standard_normal(expected.shape), jnp.bfloat16)
    dx, dw = vjp(dy)
    assert dx.dtype == jnp.float32 and dw.dtype == jnp.float32  # x's, kernel's
    dyf = dy.astype(jnp.float32)
    dx_ref, dw_ref = _ref_grads(x, kernel, pads, dyf)
    dx_abs, dw_abs = _ref_grads(jnp.abs(x), jnp.abs(kernel), pads, jnp.abs(dyf))
    _close(dx, dx_ref, bound=PRODUCT * dx_abs)  # dy is bfloat16 already:
    _close(dw, dw_ref, rtol=1e-5, bound=PRODUCT * dw_abs)  # PRODUCT is loose


def test_bfloat16_activations_keep_their_dtype():
    rng = np.random.default_rng(3)
    x = _bf16_exact(rng, (2, 7, 7, 16)).astype(jnp.bfloat16)
    kernel = _bf16_exact(rng, (3, 3, 16, 8))
    y, vjp = jax.vjp(lambda a, b: oc.conv2d(a, b), x, kernel)
    assert y.dtype == jnp.bfloat16
    dx, dw = vjp(jnp.ones_like(y))
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    dx_ref, dw_ref = _ref_grads(x.astype(jnp.float32), kernel, ((1, 1), (1, 1)),
                                jnp.ones(y.shape, jnp.float32))
    _close(dx.astype(jnp.float32), dx_ref, bound=BF16_U * jnp.abs(dx_ref))
    _close(dw, dw_ref)


def test_module_is_a_drop_in_for_nn_conv():
    """Same parameter tree as nn.Conv(use_bias=False); same function."""
    x = _bf16_exact(np.random.default_rng(0), (2, 8, 8, 6))
    ours = oc.Conv(5, (3, 3), dtype=jnp.float32)
    theirs = nn.Conv(5, (3, 3), use_bias=False, precision=lax.Precision.HIGHEST)
    params = theirs.init(jax.random.PRNGKey(0), x)
    ours_params = ours.init(jax.random.PRNGKey(0), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ours_params)
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16).astype(jnp.float32), params)
    _close(ours.apply(params, x), theirs.apply(params, x))
    c = _bf16_exact(np.random.default_rng(1), (2, 8, 8, 5))  # an exact cotangent

    def grad(module):
        return jax.jit(jax.grad(lambda p: jnp.sum(module.apply(p, x) * c)))(params)
    _close(grad(ours)["params"]["kernel"], grad(theirs)["params"]["kernel"], rtol=1e-5)


def test_xla_impl_is_the_same_function():
    rng = np.random.default_rng(5)
    x, kernel = _bf16_exact(rng, (3, 9, 9, 8)), _bf16_exact(rng, (3, 3, 8, 4))
    _close(oc.conv2d(x, kernel, out_dtype=jnp.float32, impl="xla"),
           oc.conv2d(x, kernel, out_dtype=jnp.float32, impl="kernel"))


def test_bad_shapes_and_options_are_refused():
    x = jnp.ones((2, 8, 8, 4), jnp.float32)
    with pytest.raises(ValueError):
        oc.conv2d(x, jnp.ones((3, 3, 4, 2)), "FULL")
    with pytest.raises(ValueError):
        oc.conv2d(x, jnp.ones((3, 3, 4, 2)), threading="tbb")
    with pytest.raises(Exception):  # channels do not match
        jax.block_until_ready(oc.conv2d(x, jnp.ones((3, 3, 5, 2))))
