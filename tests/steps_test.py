"""The step functions: learning, fused chunks, non-finite detection, masking."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest

from research import config_lib
from research import input_pipeline
from research import models
from research import objectives
from research import state as state_lib
from research import steps
from tests import conftest

OBJECTIVE = objectives.Classification()
IDENTITY = lambda batch: batch  # noqa: E731  (float inputs need no preprocessing)
PIPELINE = steps.Pipeline(objective=OBJECTIVE, preprocess_fn=IDENTITY)
KEYS = {"dropout": jax.random.key(3), "augment": jax.random.key(4)}


def _setup(learning_rate=0.01, n=32):
    config = config_lib.load_config(os.path.join(conftest.CONFIGS, "cifar_cnn.py"),
                                    {"learning_rate": learning_rate})
    model = models.create_model("lenet")
    state = state_lib.create_train_state(jax.random.key(0), config, model,
                                         (1, 32, 32, 3))
    rng = np.random.default_rng(0)
    data = {"image": jnp.asarray(rng.uniform(size=(n, 32, 32, 3)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, 10, n), jnp.int32)}
    return state, data


def _chunk_fn(num_steps, batch_size=4):
    chunk = jax.jit(functools.partial(
        steps.train_steps, num_steps=num_steps, batch_size=batch_size,
        grad_accum_steps=1, pipeline=PIPELINE))

    def run(state, totals, bad, data, order):
        rows = {"rows": data, "row_of": jnp.arange(order.shape[0], dtype=jnp.int32)}
        return chunk(state, totals, bad, rows, order, KEYS, {})
    return run


def _train_step(**kwargs):
    return jax.jit(lambda state, batch, key: steps.train_step(
        state, batch, key, {}, objective=OBJECTIVE, **kwargs)[:2])


class TrainStepTest(absltest.TestCase):

    def test_loss_falls_on_a_fixed_batch_and_params_change(self):
        state, data = _setup(learning_rate=0.03)
        batch = jax.tree.map(lambda a: a[:8], data)
        step = _train_step()
        first = None
        initial = state.params
        for _ in range(20):
            state, metrics = step(state, batch, jax.random.key(1))
            loss = float(metrics.compute()["loss"])
            first = loss if first is None else first
        self.assertLess(loss, 0.85 * first)  # measured: 2.32 -> 1.83
        self.assertEqual(int(state.step), 20)
        self.assertEqual(jax.tree.map(jnp.shape, state.params),
                         jax.tree.map(jnp.shape, initial))
        self.assertEqual(jax.tree.map(lambda x: x.dtype, state.params),
                         jax.tree.map(lambda x: x.dtype, initial))
        for before, after in zip(jax.tree.leaves(initial),
                                 jax.tree.leaves(state.params)):
            self.assertFalse(np.array_equal(before, after))

    def test_matches_a_hand_written_sgd_momentum_step(self):
        state, data = _setup(learning_rate=0.1)
        batch = jax.tree.map(lambda a: a[:4], data)

        def loss_fn(params):
            logits = state.apply_fn({"params": params}, batch["image"])
            return optax.softmax_cross_entropy_with_integer_labels(
                logits, batch["label"]).mean()

        grads = jax.grad(loss_fn)(state.params)
        new_state, _ = _train_step()(state, batch, jax.random.key(0))
        # First momentum step: trace = grad, params -= lr * grad.
        expected = jax.tree.map(lambda p, g: p - 0.1 * g, state.params, grads)
        jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5,
                                       atol=1e-6), new_state.params, expected)

    def test_fused_chunk_equals_single_steps_bitwise(self):
        state, data = _setup()
        perm = jax.random.permutation(jax.random.key(2), 32).astype(jnp.int32)
        empty = OBJECTIVE.metrics_cls.empty
        one, four = _chunk_fn(1), _chunk_fn(4)
        a, ta, _ = four(state, empty(), jnp.int32(-1), data, perm)
        b, tb = state, empty()
        for _ in range(4):
            b, tb, _ = one(b, tb, jnp.int32(-1), data, perm)
        self.assertEqual(int(a.step), 4)
        jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
        self.assertEqual(float(ta.compute()["loss"]), float(tb.compute()["loss"]))

    def test_batches_follow_the_permutation(self):
        state, data = _setup(learning_rate=1e-9)
        perm = jnp.arange(32, dtype=jnp.int32)[::-1]
        _, totals, _ = _chunk_fn(8)(state, OBJECTIVE.metrics_cls.empty(),
                                    jnp.int32(-1), data, perm)
        # 8 steps x 4 = every example exactly once: the epoch's mean loss.
        logits = state.apply_fn({"params": state.params}, data["image"])
        expected = OBJECTIVE.losses(logits, data["label"], False).mean()
        np.testing.assert_allclose(float(totals.compute()["loss"]), float(expected),
                                   rtol=1e-5)

    def test_first_non_finite_step_is_reported(self):
        state, data = _setup()
        perm = jnp.arange(32, dtype=jnp.int32)
        data["image"] = data["image"].at[9].set(jnp.nan)  # read by step 2 (8..11)
        _, _, bad = _chunk_fn(4)(state, OBJECTIVE.metrics_cls.empty(), jnp.int32(-1),
                                 data, perm)
        self.assertEqual(int(bad), 2)


class EvaluateTest(absltest.TestCase):

    def test_padded_batches_count_every_example_once(self):
        state, data = _setup(n=37)
        raw = {k: np.asarray(v) for k, v in data.items()}
        padded = input_pipeline.pad_to_batches(raw, 8)
        self.assertEqual(padded["image"].shape, (5, 8, 32, 32, 3))
        self.assertEqual(int(padded["mask"].sum()), 37)
        totals = steps.evaluate_batches(state.apply_fn, state.variables, padded, {},
                                        pipeline=PIPELINE)
        logits = state.apply_fn(state.variables, data["image"])
        result = totals.compute()
        np.testing.assert_allclose(float(result["loss"]),
                                   float(OBJECTIVE.losses(logits, data["label"],
                                                          False).mean()), rtol=1e-5)
        np.testing.assert_allclose(
            float(result["accuracy"]),
            float((logits.argmax(-1) == data["label"]).mean()), rtol=1e-6)
        self.assertEqual(int(totals.loss.count), 37)
