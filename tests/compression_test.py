"""Compression math: distillation losses, pruning masks and schedules, int8."""
import functools
import os
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import qwix
import safetensors
from absl.testing import absltest
from absl.testing import parameterized
from flax import linen as nn

from research import errors
from research.compression import distill
from research.compression import prune
from research.compression import quantize
from research.models import cnn


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


class DistillTest(absltest.TestCase):

    def test_losses_match_numpy(self):
        student = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], np.float32)
        teacher = np.array([[2.0, 1.0, 0.0], [0.5, 0.5, 1.0]], np.float32)
        labels = np.array([1, 2])
        t, alpha = 2.0, 0.3
        ce = -_np_log_softmax(student)[np.arange(2), labels]
        log_p, log_q = _np_log_softmax(teacher / t), _np_log_softmax(student / t)
        kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
        expected = alpha * ce + (1 - alpha) * t ** 2 * kl
        got = distill.distillation_losses(student, teacher, labels,
                                          temperature=t, alpha=alpha)
        self.assertEqual(got.shape, (2,))
        np.testing.assert_allclose(got, expected, rtol=1e-6)
        # First example by hand: CE = log(1 + e^-1 + e^-1.5), and so on.
        self.assertAlmostEqual(float(ce[0]), np.log(1 + np.exp(-1) + np.exp(-1.5)),
                               places=6)

    def test_limits_and_stability(self):
        logits = jnp.array([[3.0, -1.0, 0.0]])
        labels = jnp.array([0])
        same = distill.distillation_losses(logits, logits, labels,
                                           temperature=4.0, alpha=0.0)
        np.testing.assert_allclose(same, [0.0], atol=1e-7)
        ce_only = distill.distillation_losses(logits, -logits, labels,
                                              temperature=4.0, alpha=1.0)
        np.testing.assert_allclose(
            ce_only, optax.softmax_cross_entropy_with_integer_labels(logits, labels),
            rtol=1e-6)
        # Huge logits and a -inf teacher class stay finite.
        big = distill.distillation_losses(
            jnp.array([[1e4, -1e4, 0.0]]), jnp.array([[-1e4, 1e4, -jnp.inf]]),
            labels, temperature=1.0, alpha=0.5)
        self.assertTrue(np.isfinite(big).all())
        # CE ~ 0; KL = 0 - log q(class 1) = 2e4; times (1 - alpha) T^2 = 0.5.
        self.assertAlmostEqual(float(big[0]), 1e4, delta=1.0)

    def test_no_gradient_into_teacher(self):
        def loss(s, t):
            return distill.distillation_losses(
                s, t, jnp.array([0]), temperature=2.0, alpha=0.5).sum()
        g_teacher = jax.grad(loss, argnums=1)(jnp.ones((1, 3)), jnp.eye(3)[:1])
        np.testing.assert_array_equal(g_teacher, 0.0)

    def test_agreement(self):
        s = jnp.array([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
        t = jnp.array([[5.0, 1.0], [3.0, 1.0], [0.0, 1.0]])
        np.testing.assert_array_equal(distill.agreement(s, t), [1.0, 0.0, 0.0])

    def test_bad_config(self):
        with self.assertRaises(errors.UserError):
            distill.distillation_losses(jnp.zeros((1, 2)), jnp.zeros((1, 2)),
                                        jnp.array([0]), temperature=0.0, alpha=0.5)


def _two_layers():
    return {
        "a": {"kernel": jnp.array([[1.0, 2.0], [3.0, 4.0]]),
              "bias": jnp.array([0.0, 0.1])},
        "b": {"kernel": jnp.array([[0.5, 5.0], [6.0, 7.0]])},
    }


class MaskTest(parameterized.TestCase):

    def test_ties_go_to_the_lower_index(self):
        # |w| = 1, 1, 2, .5, .5, 3: sparsity .5 prunes 3 weights, the two .5s
        # (indices 3 then 4) and then the first 1 (index 0, not index 1).
        params = {"k": jnp.array([[1.0, -1.0, 2.0], [0.5, -0.5, 3.0]])}
        masks = prune.magnitude_masks(params, 0.5, scope="layer")
        np.testing.assert_array_equal(
            masks["k"], [[False, True, True], [False, False, True]])

    def test_layer_scope(self):
        masks = prune.magnitude_masks(_two_layers(), 0.5, scope="layer")
        np.testing.assert_array_equal(masks["a"]["kernel"], [[0, 0], [1, 1]])
        np.testing.assert_array_equal(masks["b"]["kernel"], [[0, 0], [1, 1]])
        np.testing.assert_array_equal(masks["a"]["bias"], [True, True])

    def test_global_scope(self):
        # Over all 8 kernel weights, prune the 4 smallest: .5, 1, 2, 3.
        masks = prune.magnitude_masks(_two_layers(), 0.5, scope="global")
        np.testing.assert_array_equal(masks["a"]["kernel"], [[0, 0], [0, 1]])
        np.testing.assert_array_equal(masks["b"]["kernel"], [[0, 1], [1, 1]])
        np.testing.assert_array_equal(masks["a"]["bias"], [True, True])

    @parameterized.parameters(
        (0.0, 5, 0), (0.3, 5, 2), (0.5, 5, 2), (0.7, 5, 4), (0.9, 10, 9),
        (0.25, 12, 3))
    def test_exact_count(self, s, n, pruned):
        # round(s * n), halves to even: 1.5 -> 2, 2.5 -> 2, 3.5 -> 4.
        params = {"w": jnp.arange(1.0, n + 1).reshape(1, n)}
        masks = prune.magnitude_masks(params, s, scope="layer")
        self.assertEqual(int((~masks["w"]).sum()), pruned)
        np.testing.assert_array_equal(masks["w"][0, pruned:], True)

    def test_predicate_and_previous_masks(self):
        params = _two_layers()
        only_b = prune.magnitude_masks(
            params, 0.5, scope="global", prunable=lambda p, x: p.startswith("b/"))
        np.testing.assert_array_equal(only_b["a"]["kernel"], True)
        np.testing.assert_array_equal(only_b["b"]["kernel"], [[0, 0], [1, 1]])
        # A previously pruned weight stays pruned even though |7| is largest.
        old = jax.tree.map(lambda x: jnp.ones(x.shape, bool), params)
        old["b"]["kernel"] = jnp.array([[True, True], [True, False]])
        masks = prune.magnitude_masks(params, 0.25, scope="layer", masks=old)
        np.testing.assert_array_equal(masks["b"]["kernel"], [[True, True],
                                                             [True, False]])

    def test_under_jit_with_traced_sparsity(self):
        fn = jax.jit(lambda p, s: prune.magnitude_masks(p, s, scope="global"))
        np.testing.assert_array_equal(
            fn(_two_layers(), jnp.float32(0.5))["b"]["kernel"], [[0, 1], [1, 1]])

    def test_errors(self):
        with self.assertRaises(errors.UserError):
            prune.magnitude_masks(_two_layers(), 1.0)
        with self.assertRaises(errors.UserError):
            prune.magnitude_masks(_two_layers(), 0.5, scope="row")

    def test_sparsity_report(self):
        params = _two_layers()
        params["a"]["kernel"] = params["a"]["kernel"].at[0, 0].set(0.0)
        report = prune.sparsity(params)
        self.assertEqual(report, {"a/kernel": 0.25, "b/kernel": 0.0,
                                  "total": 0.125})
        masks = prune.magnitude_masks(params, 0.5, scope="global")
        self.assertEqual(prune.sparsity(masks)["total"], 0.5)
        self.assertEqual(prune.count_nonzero(params), 8)  # 7 kernel + 1 bias.
        self.assertEqual(
            prune.count_nonzero(params, prunable=prune.default_prunable), 7)


class ScheduleTest(absltest.TestCase):

    def test_cubic_values(self):
        fn = functools.partial(prune.cubic_sparsity, initial=0.0, final=0.8,
                               begin_step=10, end_step=20)
        # s = .8 - .8 * (1 - (t - 10) / 10) ** 3.
        for step, expected in ((0, 0.0), (10, 0.0), (12, 0.8 - 0.8 * 0.512),
                               (15, 0.7), (19, 0.8 - 0.8 * 0.001), (20, 0.8),
                               (100, 0.8)):
            self.assertAlmostEqual(float(fn(step)), expected, places=6)
        traced = jax.jit(fn)(jnp.arange(0, 25, 5))
        np.testing.assert_allclose(traced, [0, 0, 0, 0.7, 0.8], atol=1e-7)
        start = prune.cubic_sparsity(0, initial=0.2, final=0.6, begin_step=0,
                                     end_step=4)
        self.assertAlmostEqual(float(start), 0.2, places=6)

    def test_one_shot(self):
        fn = jax.jit(functools.partial(prune.one_shot_sparsity, final=0.9,
                                       begin_step=3))
        np.testing.assert_allclose([fn(s) for s in range(5)],
                                   [0, 0, 0, 0.9, 0.9], atol=1e-7)


class PruneOptimizerTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("sgd_momentum", optax.sgd(0.1, momentum=0.9), "layer"),
        ("adam", optax.adam(0.1), "global"))
    def test_pruned_weights_stay_exactly_zero(self, inner, scope):
        key = jax.random.key(0)
        params = {"Dense_0": {"kernel": jax.random.normal(key, (6, 5)),
                              "bias": jnp.ones(5)},
                  "Dense_1": {"kernel": jax.random.normal(key, (5, 4))}}
        schedule = functools.partial(prune.cubic_sparsity, initial=0.2,
                                     final=0.6, begin_step=2, end_step=6)
        tx = prune.prune(inner, schedule, scope=scope, update_every=2,
                         begin_step=2)
        state = tx.init(params)

        @jax.jit
        def step(params, state, i):
            # Gradients are never zero, and they push every weight away from
            # zero: only the masking can keep the pruned ones at exactly 0.
            grads = jax.tree.map(
                lambda p: -jnp.sign(p) - 0.1 * jax.random.normal(
                    jax.random.fold_in(key, i), p.shape), params)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        previous = None
        for i in range(10):
            params, state = step(params, state, i)
            masks = state.masks
            for name in ("Dense_0", "Dense_1"):
                kernel = np.asarray(params[name]["kernel"])
                mask = np.asarray(masks[name]["kernel"])
                np.testing.assert_array_equal(kernel[~mask], 0.0)
                self.assertTrue((kernel[mask] != 0).all())
                if previous is not None:  # Once pruned, stays pruned.
                    self.assertFalse((mask & ~previous[name]).any())
            previous = {n: np.asarray(masks[n]["kernel"]) for n in masks}
            np.testing.assert_array_equal(masks["Dense_0"]["bias"], True)
        # Masks updated at steps 2, 4, 6, 8 to cubic(6) = 0.6 of 50 weights.
        self.assertEqual(int(state.count), 10)
        self.assertAlmostEqual(prune.sparsity(params)["total"], 0.6)

    def test_momentum_before_pruning_does_not_revive(self):
        # Constant gradients build up momentum for 3 steps, then a one-shot
        # prune at step 3; the next steps' inner updates for the pruned
        # weights are non-zero (momentum), but the weights stay 0.
        params = {"w": jnp.array([[0.1, 0.2], [3.0, 4.0]])}
        tx = prune.prune(optax.sgd(0.01, momentum=0.9),
                         functools.partial(prune.one_shot_sparsity, final=0.5,
                                           begin_step=3),
                         update_every=1, begin_step=0)
        state = tx.init(params)
        grads = {"w": jnp.ones((2, 2))}
        update = jax.jit(tx.update)
        for i in range(6):
            updates, state = update(grads, state, params)
            params = optax.apply_updates(params, updates)
            if i < 3:
                self.assertTrue((params["w"] != 0).all())
        np.testing.assert_array_equal(params["w"][0], [0.0, 0.0])
        trace = state.inner_state[0].trace["w"]
        self.assertTrue((trace[0] != 0).all())  # Momentum is still there.

    def test_bad_update_every(self):
        with self.assertRaises(errors.UserError):
            prune.prune(optax.sgd(0.1), lambda s: 0.5, update_every=0)

    @staticmethod
    def _options(**kw):
        return ml_collections.ConfigDict({
            "sparsity": 0.75, "schedule": "cubic", "scope": "layer",
            "begin_step": 0, "end_step": 0, "update_every": 50,
            "exclude": "", **kw})

    def _final_sparsity(self, options, total_steps):
        params = {"a": {"kernel": jnp.arange(1.0, 101.0).reshape(10, 10)},
                  "whiten_kernel": jnp.arange(1.0, 17.0).reshape(4, 4)}
        tx = prune.from_config(optax.sgd(0.0), options, total_steps)
        state = tx.init(params)
        update = jax.jit(tx.update)
        for _ in range(total_steps):
            _, state = update(jax.tree.map(jnp.zeros_like, params), state, params)
        return prune.sparsity(state.masks)

    def test_the_final_sparsity_is_reached_within_the_run(self):
        # 144 steps: 3/4 is step 108, whose next update (150) is past the
        # run; the last update before it (100) reaches the final sparsity.
        report = self._final_sparsity(self._options(), 144)
        self.assertEqual(report["a/kernel"], 0.75)
        with self.assertRaisesRegex(errors.UserError, "lower prune.update_every"):
            prune.from_config(optax.sgd(0.1), self._options(end_step=120), 144)
        with self.assertRaisesRegex(errors.UserError, "lower prune.update_every"):
            prune.from_config(optax.sgd(0.1), self._options(update_every=200), 144)

    def test_excluded_leaves_are_never_pruned(self):
        report = self._final_sparsity(self._options(exclude="whiten"), 144)
        self.assertEqual(report["whiten_kernel"], 0.0)
        self.assertEqual(report["a/kernel"], 0.75)
        self.assertEqual(self._final_sparsity(self._options(), 144)[
            "whiten_kernel"], 0.75)
        with self.assertRaisesRegex(errors.UserError, "not a regular expression"):
            prune.check_options(self._options(exclude="("))


class _Dense(nn.Module):
    @nn.compact
    def __call__(self, x, *, train=False):
        return nn.Dense(5)(x)


class _Conv(nn.Module):
    @nn.compact
    def __call__(self, x, *, train=False):
        return nn.Conv(4, (3, 3), use_bias=False)(x)


_RANGES = {"kernel": None, "bias": (-0.1, 0.1), "scale": (0.5, 1.5),
           "mean": (-0.1, 0.1), "var": (0.5, 2.0)}


def _random_variables(model, input_shape, seed=0):
    """Variables of `model` with random values, shaped by `jax.eval_shape`.

    Cheaper than `model.init`, whose jitted random initialisers take seconds
    to compile; kernels are U(+-1/sqrt(fan_in)), BatchNorm statistics are
    not the initial (0, 1), so that they matter.
    """
    shapes = jax.eval_shape(functools.partial(model.init, train=False),
                            jax.random.key(0), jnp.zeros(input_shape))
    rng = np.random.default_rng(seed)

    def value(path, s):
        low_high = _RANGES[path[-1].key]
        if low_high is None:
            bound = 1 / np.prod(s.shape[:-1]) ** 0.5
            low_high = (-bound, bound)
        return jnp.asarray(rng.uniform(*low_high, s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(value, shapes)


@functools.cache
def _lenet():
    """LeNet on XLA convolutions (qwix intercepts lax ops), random variables."""
    model = cnn.LeNet(conv_impl="xla")
    return model, _random_variables(model, (1, 32, 32, 3))


def _int8(x, axis):
    """qwix's int8 quantize-dequantize of x, one scale per index of `axis`."""
    return qwix.dequantize(qwix.quantize(x, jnp.int8, channelwise_axes=[axis]))


def _is_qarray(value):
    return isinstance(value, qwix.QArray)


class _Matmul(nn.Module):
    """A dense layer through jnp.matmul, which qwix does not intercept."""
    @nn.compact
    def __call__(self, x, *, train=False):
        kernel = self.param("kernel", nn.initializers.ones, (x.shape[-1], 2))
        return jnp.matmul(x, kernel)


class QuantizeTest(absltest.TestCase):

    def test_int8_round_trip_error_bound(self):
        w = jax.random.normal(jax.random.key(0), (3, 3, 4, 8)) * jnp.arange(1, 9)
        q = qwix.quantize(w, jnp.int8, channelwise_axes=[3])
        self.assertEqual(q.qvalue.dtype, jnp.int8)
        self.assertEqual(q.scale.shape, (1, 1, 1, 8))
        err = jnp.abs(qwix.dequantize(q) - w)
        # Half a step per element, plus the rounding of w / scale: XLA's CPU
        # division is not correctly rounded on every CPU (AVX-512 builds use a
        # refined reciprocal), a few float32 ulps of a quotient up to 128,
        # i.e. ~1e-5 of a step; 1e-4 holds on AVX2 and AVX-512 alike.
        self.assertTrue(bool((err <= q.scale * (0.5 + 1e-4)).all()))
        self.assertGreater(float((err / q.scale).max()), 0.45)  # Bound is tight.

    def test_straight_through_gradients(self):
        """QAT gradients: the quantizer's Jacobian is the identity (STE).

        The inputs and weights lie on the int8 grid of a scale of exactly
        1/128 (each example and each output channel holds one +-127.5/128,
        which sets that scale): every value is half a step from a rounding
        boundary, so the quantized values are the same on every CPU and
        under any fusion (XLA's division may differ from the correctly
        rounded one by ulps; off the grid that flips values lying near a
        boundary by a whole step, which moves a gradient by up to ~10%).
        What is left is float summation order: rtol 1e-5.
        """
        rng = np.random.default_rng(0)

        def on_grid(shape, axis):
            k = rng.integers(-127, 128, shape).astype(np.float32)
            for i in range(shape[axis]):
                index = tuple(0 if a != axis else i for a in range(len(shape)))
                k[index] = 127.5 * rng.choice([-1, 1])
            return jnp.asarray(k / 128)

        for model, shape in ((_Dense(), (3, 7)), (_Conv(), (2, 6, 6, 3))):
            x = on_grid(shape, 0)
            shapes = jax.eval_shape(functools.partial(model.init, train=False),
                                    jax.random.key(0), x)["params"]
            params = jax.tree.map(lambda s: on_grid(s.shape, s.ndim - 1), shapes)
            if isinstance(model, _Dense):
                params["Dense_0"]["bias"] = jnp.asarray(
                    rng.uniform(-0.1, 0.1, 5), jnp.float32)
            qat = quantize.create_qat_model(model)
            cot = jax.random.normal(jax.random.key(2), jax.eval_shape(
                model.apply, {"params": params}, x).shape)

            def grad(m, p, x):
                def loss(p, x):
                    return jnp.sum(m.apply({"params": p}, x) * cot)
                return jax.jit(jax.grad(loss, argnums=(0, 1)))(p, x)

            gp, gx = grad(qat, params, x)
            if isinstance(model, _Dense):
                # qwix keeps the float residuals: exactly the float gradients.
                fp, fx = grad(model, params, x)
                np.testing.assert_array_equal(gx, fx)
                np.testing.assert_array_equal(gp["Dense_0"]["kernel"],
                                              fp["Dense_0"]["kernel"])
            else:
                # d conv(q(x), q(w)) with dq = identity: the float conv's
                # gradients at the quantized weights and inputs.
                kernel = params["Conv_0"]["kernel"]
                np.testing.assert_array_equal(_int8(kernel, 3),
                                              jnp.clip(kernel, -127 / 128, 127 / 128))
                _, fx = grad(model, {"Conv_0": {"kernel": _int8(kernel, 3)}}, x)
                np.testing.assert_allclose(gx, fx, rtol=1e-5, atol=1e-6)
                fp, _ = grad(model, params, _int8(x, 0))
                np.testing.assert_allclose(gp["Conv_0"]["kernel"],
                                           fp["Conv_0"]["kernel"],
                                           rtol=1e-5, atol=1e-5)
                # Not the float gradients: the quantization is in the path.
                float_gp, _ = grad(model, params, x)
                self.assertGreater(float(jnp.abs(float_gp["Conv_0"]["kernel"] -
                                                 fp["Conv_0"]["kernel"]).max()), 1e-3)

    def test_qat_forward_close_to_float_and_params_unchanged(self):
        model, variables = _lenet()
        x = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3))
        qat = quantize.create_qat_model(model)
        qat_variables = jax.eval_shape(functools.partial(qat.init, train=False),
                                       jax.random.key(1), x)
        self.assertEqual(jax.tree.structure(qat_variables),
                         jax.tree.structure(variables))
        f = jax.jit(functools.partial(model.apply, train=False))(variables, x)
        q = jax.jit(functools.partial(qat.apply, train=False))(variables, x)
        err = float(jnp.abs(q - f).max() / jnp.abs(f).max())
        self.assertLess(err, 0.05)

    def _check_ptq(self, model, variables, shape, tolerance):
        x = jax.random.uniform(jax.random.key(0), shape)
        calibration = [jax.random.uniform(jax.random.key(i), shape)
                       for i in range(2, 5)]
        quantized = quantize.post_training_quantize(model, variables, calibration)
        qarrays = [v for v in jax.tree.leaves(quantized.variables["params"],
                                              is_leaf=_is_qarray) if _is_qarray(v)]
        num_kernels = sum(1 for p in jax.tree_util.tree_flatten_with_path(
            variables["params"])[0] if p[0][-1].key == "kernel")
        self.assertLen(qarrays, num_kernels)
        for q in qarrays:
            self.assertEqual(q.qvalue.dtype, jnp.int8)
        f = jax.jit(functools.partial(model.apply, train=False))(variables, x)
        q = jax.jit(functools.partial(quantized.apply_fn, train=False))(
            quantized.variables, x)
        err = float(jnp.abs(q - f).max() / jnp.abs(f).max())
        self.assertLess(err, tolerance)

    def test_ptq_lenet(self):
        self._check_ptq(*_lenet(), (4, 32, 32, 3), 0.05)

    def test_ptq_convnet_with_batchnorm(self):
        model = cnn.ConvNet(features=(8, 16))
        variables = _random_variables(model, (1, 8, 8, 3))
        self._check_ptq(model, variables, (4, 8, 8, 3), 0.05)

    def test_ptq_activation_ranges(self):
        model = _Dense()
        variables = _random_variables(model, (3, 7))
        batches = [jnp.array([[1.0] * 7, [-4.0] * 7, [2.0] * 7]),
                   jnp.array([[3.0] * 7, [0.5] * 7, [-1.0] * 7])]
        # Per-example absmax: 1, 4, 2 and 3, .5, 1.
        for act_range, absmax in (("max", 4.0), ("mean", (7 / 3 + 4.5 / 3) / 2)):
            quantized = quantize.post_training_quantize(
                model, variables, batches, act_range=act_range)
            scale = quantized.variables["params"]["Dense_0"][
                "dot_general0_lhs_scale"].array
            np.testing.assert_allclose(scale, [[absmax / 127.5]], rtol=1e-6)
        with self.assertRaises(errors.UserError):
            quantize.post_training_quantize(model, variables, batches,
                                            act_range="p99")

    def test_ptq_refuses_ops_qwix_cannot_see(self):
        model = _Matmul()
        variables = _random_variables(model, (2, 3))
        with self.assertRaisesRegex(ValueError, "^kernel was not quantized"):
            quantize.post_training_quantize(model, variables, [jnp.ones((2, 3))])

    def test_export_keeps_batchnorm_and_activation_scales(self):
        model = cnn.ConvNet(features=(4, 8))
        variables = _random_variables(model, (1, 8, 8, 3))
        quantized = quantize.post_training_quantize(
            model, variables, [jax.random.uniform(jax.random.key(1), (4, 8, 8, 3))])
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "convnet.int8.safetensors")
            quantize.export_int8(quantized.variables, path)
            loaded = quantize.load_int8(path)
        for name, leaves in variables["batch_stats"].items():
            for key, value in leaves.items():
                np.testing.assert_array_equal(loaded["batch_stats"][name][key], value)
        np.testing.assert_array_equal(loaded["params"]["BatchNorm_0"]["scale"],
                                      variables["params"]["BatchNorm_0"]["scale"])
        act_scale = loaded["params"]["Conv_1"]["conv_general_dilated0_lhs_scale"]
        np.testing.assert_array_equal(
            act_scale.array, quantized.variables["params"]["Conv_1"][
                "conv_general_dilated0_lhs_scale"].array)
        self.assertEqual(loaded["params"]["Conv_1"]["kernel"].array.qvalue.shape,
                         (3, 3, 4, 8))

    def test_export_is_the_scored_model(self):
        """The file holds the evaluated int8 numbers: loading it gives the
        same variables bit for bit and the same logits, on any CPU; the file
        alone rebuilds the model."""
        model, variables = _lenet()
        params = variables["params"]
        float_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
        self.assertEqual(float_bytes, 62_006 * 4)
        calibration = [jax.random.uniform(jax.random.key(i), (4, 32, 32, 3))
                       for i in range(2)]
        quantized = quantize.post_training_quantize(model, variables, calibration)
        spec = {"model": "lenet", "model_kwargs": {"conv_impl": "xla"},
                "module_path": ".*"}
        x = jax.random.uniform(jax.random.key(5), (4, 32, 32, 3))
        apply = jax.jit(functools.partial(quantized.apply_fn, train=False))
        expected = apply(quantized.variables, x)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "lenet.int8.safetensors")
            size = quantize.export_int8(quantized.variables, path, model=spec)
            self.assertEqual(size, os.path.getsize(path))
            loaded = quantize.load_int8(path)
            rebuilt = quantize.load_int8_model(path)
            with safetensors.safe_open(path, framework="numpy") as f:  # no qwix
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            with self.assertRaisesRegex(ValueError, "no int8 kernel"):
                quantize.export_int8(variables, os.path.join(tmp, "float.st"))
            with open(path, "rb") as f:
                data = f.read()
            with open(path, "wb") as f:
                f.write(data[:-10])
            with self.assertRaisesRegex(ValueError, "re-export"):
                quantize.load_int8(path)
        # int8 kernels: a quarter of float32, plus float biases and scales,
        # plus the safetensors header (tensor table and layout metadata).
        payload = sum(t.nbytes for t in tensors.values())
        self.assertLessEqual(payload / float_bytes, 0.26)
        self.assertLess(size - payload, 4096)
        self.assertEqual(jax.tree.structure(loaded),
                         jax.tree.structure(quantized.variables))
        for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(quantized.variables)):
            self.assertEqual(a.dtype, b.dtype)
            np.testing.assert_array_equal(a, b)
        for name in params:
            kernel = loaded["params"][name]["kernel"].array
            self.assertEqual(kernel.qvalue.dtype, jnp.int8)
            err = jnp.abs(qwix.dequantize(kernel) - params[name]["kernel"])
            self.assertTrue(bool((err <= kernel.scale * (0.5 + 1e-4)).all()))
            # The documented layout, read without qwix.
            np.testing.assert_array_equal(
                tensors[f"params/{name}/kernel:qvalue"] *
                tensors[f"params/{name}/kernel:scale"], qwix.dequantize(kernel))
        np.testing.assert_array_equal(apply(loaded, x), expected)
        np.testing.assert_array_equal(
            jax.jit(functools.partial(rebuilt.apply_fn, train=False))(
                rebuilt.variables, x), expected)


if __name__ == "__main__":
    absltest.main()
