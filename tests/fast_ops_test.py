"""research.models.fast_ops against flax / jax autodiff (float32)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from research.models import fast_ops


def _close(a, b, rtol=2e-6):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    scale = max(np.max(np.abs(b)), 1e-30)
    assert np.max(np.abs(a - b)) <= rtol * scale, (np.max(np.abs(a - b)), scale)


def _normal(seed, shape, scale=1.0, shift=0.0):
    x = np.random.default_rng(seed).standard_normal(shape) * scale + shift
    return jnp.asarray(x, jnp.float32)


def _exact_gelu(x):
    return jax.nn.gelu(x, approximate=False)


def test_gelu_and_bias_gelu_match_autodiff():
    x, b, dy = _normal(0, (4, 5, 5, 6), 3), _normal(1, (6,)), _normal(2, (4, 5, 5, 6))
    y, vjp = jax.vjp(fast_ops.gelu, x)
    y_ref, vjp_ref = jax.vjp(_exact_gelu, x)
    _close(y, y_ref)
    _close(vjp(dy)[0], vjp_ref(dy)[0])
    y, vjp = jax.vjp(fast_ops.bias_gelu, x, b)
    y_ref, vjp_ref = jax.vjp(lambda x, b: _exact_gelu(x + b), x, b)
    _close(y, y_ref)
    for got, want in zip(vjp(dy), vjp_ref(dy)):
        _close(got, want)


@pytest.mark.parametrize("shape", [(8, 5, 5, 6), (64, 3, 3, 16), (3, 7, 9, 4)])
def test_batch_norm_gelu_matches_autodiff(shape):
    x, b, dy = _normal(3, shape, 2, 0.5), _normal(4, shape[-1:]), _normal(5, shape)

    def ref(x, b):
        mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
        return _exact_gelu((x - mean) * jax.lax.rsqrt(var + 1e-5) + b)

    (y, mean, var), vjp = jax.vjp(lambda x, b: fast_ops.batch_norm_gelu(x, b, 1e-5), x, b)
    y_ref, vjp_ref = jax.vjp(ref, x, b)
    _close(y, y_ref)
    _close(mean, x.mean((0, 1, 2)))
    _close(var, x.var((0, 1, 2)), rtol=1e-5)
    zeros = jnp.zeros(shape[-1:])
    for got, want in zip(vjp((dy, zeros, zeros)), vjp_ref(dy)):
        _close(got, want, rtol=1e-5)


def test_batch_norm_gelu_module_is_batchnorm_then_gelu():
    """Same variables and running statistics as nn.BatchNorm(use_scale=False)
    followed by GELU, in training and in evaluation."""
    x, dy = _normal(6, (16, 4, 4, 8), 2, 1), _normal(7, (16, 4, 4, 8))
    ours = fast_ops.BatchNormGelu(momentum=0.6, epsilon=1e-12)
    bn = nn.BatchNorm(momentum=0.6, epsilon=1e-12, use_scale=False)

    class Theirs(nn.Module):
        @nn.compact
        def __call__(self, x, *, train):
            return _exact_gelu(nn.BatchNorm(momentum=0.6, epsilon=1e-12, use_scale=False,
                                            use_running_average=not train, name="bn")(x))

    v_ours = ours.init(jax.random.PRNGKey(0), x, train=False)
    v_bn = bn.init(jax.random.PRNGKey(0), x, use_running_average=True)
    assert jax.tree.map(jnp.shape, v_ours) == jax.tree.map(jnp.shape, v_bn)
    v = {"params": {"bias": _normal(8, (8,))}, "batch_stats": v_ours["batch_stats"]}
    theirs, v_theirs = Theirs(), {"params": {"bn": v["params"]},
                                  "batch_stats": {"bn": v["batch_stats"]}}

    def loss(module, variables, wrap):
        def f(params, x):
            y, upd = module.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                  x, train=True, mutable=["batch_stats"])
            return jnp.sum(y * dy), upd
        (value, upd), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
            variables["params"], x)
        return value, wrap(upd["batch_stats"]), wrap(grads[0]), grads[1]

    got = loss(ours, v, lambda t: t)
    want = loss(theirs, v_theirs, lambda t: t["bn"])
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        _close(a, b, rtol=1e-5)
    stats = got[1]
    _close(ours.apply({"params": v["params"], "batch_stats": stats}, x, train=False),
           theirs.apply({"params": v_theirs["params"], "batch_stats": {"bn": stats}},
                        x, train=False))


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (3, 7, 9, 5), (1, 31, 31, 4)])
def test_max_pool2_matches_nn_max_pool(shape):
    """Tie-free inputs: the same output and gradient as nn.max_pool."""
    x, dy = _normal(9, shape), _normal(10, (shape[0], shape[1] // 2, shape[2] // 2, shape[3]))
    y, vjp = jax.jit(lambda x: jax.vjp(fast_ops.max_pool2, x))(x)
    y_ref, vjp_ref = jax.vjp(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)), x)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(vjp(dy)[0], vjp_ref(dy)[0])


def test_max_pool2_ties_go_to_the_first_maximum_and_bf16_stays_bf16():
    x = jnp.ones((1, 4, 4, 2), jnp.bfloat16)
    y, vjp = jax.vjp(fast_ops.max_pool2, x)
    assert y.dtype == jnp.bfloat16
    dx = vjp(jnp.ones_like(y))[0]
    assert dx.dtype == jnp.bfloat16
    expected = np.zeros((4, 4), np.float32)
    expected[::2, ::2] = 1
    np.testing.assert_array_equal(np.asarray(dx[0, :, :, 0], np.float32), expected)
