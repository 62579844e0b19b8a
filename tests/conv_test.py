"""The C++ CPU kernels against XLA: outputs and gradients on random inputs.

The kernels are built by `pip install -e .` (run.sh does it). Where they are
not built the kernel tests skip, unless $RESEARCH_REQUIRE_KERNELS is set (CI
sets it, so a broken build fails there instead of skipping).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import errors
from research import kernels
from research import models
from research.core import state as state_lib
from research.kernels import conv as bmc

if not kernels.available():
    if os.environ.get("RESEARCH_REQUIRE_KERNELS"):
        raise RuntimeError(f"$RESEARCH_REQUIRE_KERNELS is set but the C++ kernels "
                           f"are unavailable: {kernels.load_error()}")
    pytest.skip(f"C++ kernels unavailable: {kernels.load_error()}",
                allow_module_level=True)

# Of the largest magnitude: float32 sums in another order. Weight gradients
# sum hundreds of thousands of terms, with cancellation.
RTOL, GRAD_RTOL = 2e-6, 1e-5


def _close(actual, expected, rtol=RTOL):
    scale = float(jnp.max(jnp.abs(expected)))
    assert float(jnp.max(jnp.abs(actual - expected))) <= rtol * scale, (
        float(jnp.max(jnp.abs(actual - expected))), scale)


def _random(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


# (batch, channels, height, width, kernel, outputs): LeNet's two layers at
# every lane width and with odd sizes (tails of 1-3 columns, 17 outputs).
CONV_SHAPES = [(4, 3, 32, 32, 5, 6), (8, 3, 32, 32, 5, 6), (32, 3, 32, 32, 5, 6),
               (4, 6, 14, 14, 5, 16), (8, 6, 14, 14, 5, 16), (48, 6, 14, 14, 5, 16),
               (4, 2, 9, 10, 3, 17), (16, 5, 7, 8, 7, 3), (8, 1, 6, 11, 1, 2),
               (12, 4, 5, 5, 5, 1)]


@pytest.mark.parametrize("n,c,h,w,k,o", CONV_SHAPES)
def test_conv_matches_lax_conv(n, c, h, w, k, o):
    """Forward, input and weight gradients against lax.conv_general_dilated."""
    rng = np.random.default_rng(n * 1000 + c * 100 + h)
    x_nhwc, kernel = _random(rng, (n, h, w, c)), _random(rng, (k, k, c, o))
    x = bmc.to_blocks(x_nhwc, bmc.lanes_for(n))
    reference = jax.lax.conv_general_dilated(
        x_nhwc, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    dy = _random(rng, reference.shape)

    def loss(impl, x, kernel):
        y = bmc.from_blocks(bmc.conv(x, kernel, impl), n)
        return jnp.sum(y * dy), y

    grads = {}
    for impl in ("kernel", "xla"):
        (_, y), grads[impl] = jax.jit(jax.value_and_grad(
            lambda x, kernel, impl=impl: loss(impl, x, kernel), (0, 1),
            has_aux=True))(x, kernel)
        _close(y, reference)
    for got, want in zip(grads["kernel"], grads["xla"]):
        _close(got, want, GRAD_RTOL)
    # The padding images got no gradient from the loss.
    dx = bmc.from_blocks(grads["kernel"][0], x.shape[0] * x.shape[-1])
    assert float(jnp.abs(dx[n:]).max(initial=0.0)) == 0.0


@pytest.mark.parametrize("shape", [(2, 6, 28, 28, 16), (1, 16, 10, 10, 4),
                                   (3, 5, 7, 9, 8)])
def test_bias_relu_pool_matches_xla(shape):
    rng = np.random.default_rng(sum(shape))
    y, bias = _random(rng, shape), _random(rng, shape[1:2])
    pooled = {impl: jax.jit(bmc.bias_relu_pool, static_argnums=2)(y, bias, impl)
              for impl in ("kernel", "xla")}
    np.testing.assert_array_equal(pooled["kernel"], pooled["xla"])  # a max: exact
    g = _random(rng, pooled["xla"].shape)
    grads = {impl: jax.jit(jax.grad(
        lambda y, b, impl=impl: jnp.sum(bmc.bias_relu_pool(y, b, impl) * g), (0, 1)))(
            y, bias) for impl in ("kernel", "xla")}
    np.testing.assert_array_equal(grads["kernel"][0], grads["xla"][0])
    _close(grads["kernel"][1], grads["xla"][1])
    assert float(jnp.abs(grads["kernel"][0]).max()) > 0  # not all dead


@pytest.mark.parametrize("batch", [4, 13, 128])
def test_lenet_kernel_and_xla_compute_the_same_function(batch):
    """Same parameters (one tree for both), same logits and gradients."""
    rng = np.random.default_rng(batch)
    images = jnp.asarray(rng.uniform(size=(batch, 32, 32, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, batch))
    fast, reference = (models.create_model("lenet", conv_impl=impl)
                       for impl in ("kernel", "xla"))
    variables = state_lib.init_variables(jax.random.key(0), fast, (1, 32, 32, 3))
    assert jax.tree.structure(variables) == jax.tree.structure(
        state_lib.init_variables(jax.random.key(0), reference, (1, 32, 32, 3)))

    def loss(model, params):
        logits = model.apply({"params": params}, images)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits),
                                             labels[:, None], 1)), logits

    out = {}
    for name, model in (("kernel", fast), ("xla", reference)):
        out[name] = jax.jit(jax.value_and_grad(
            lambda p, model=model: loss(model, p), has_aux=True))(variables["params"])
    (loss_k, logits_k), grads_k = out["kernel"]
    (loss_x, logits_x), grads_x = out["xla"]
    _close(logits_k, logits_x, 1e-5)
    np.testing.assert_allclose(float(loss_k), float(loss_x), rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads_k), jax.tree.leaves(grads_x)):
        _close(got, want, 1e-5)


def test_lanes_for():
    assert [bmc.lanes_for(n) for n in (1, 4, 8, 12, 16, 24, 63, 64, 100)] == [
        4, 4, 8, 4, 16, 8, 16, 16, 16]


def test_conv_impl_is_validated():
    with pytest.raises(errors.UserError, match="conv_impl='fast'; choose from"):
        models.create_model("lenet", conv_impl="fast")
    models.create_model("lenet", conv_impl="kernel")  # built here: accepted


def test_nan_propagates_through_the_kernels():
    """A NaN input must reach the loss, as with XLA (the trainer stops on it)."""
    images = jnp.zeros((4, 32, 32, 3)).at[2, 5, 7, 1].set(jnp.nan)
    model = models.create_model("lenet", conv_impl="kernel")
    variables = state_lib.init_variables(jax.random.key(0), model, (1, 32, 32, 3))
    logits = jax.jit(model.apply)(variables, images)
    assert bool(jnp.isnan(logits[2]).all())
    assert bool(jnp.isfinite(logits[jnp.array([0, 1, 3])]).all())
