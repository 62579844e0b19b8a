"""The step functions: learning, fused chunks, non-finite detection, masking."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest

from research.data import input_pipeline
from research.core import objectives
from research.core import steps
from research.parallel import sync
from tests import helpers

OBJECTIVE = objectives.Classification()
IDENTITY = lambda batch: batch  # noqa: E731  (float inputs need no preprocessing)
PIPELINE = steps.Pipeline(objective=OBJECTIVE, preprocess_fn=IDENTITY)
KEYS = {"dropout": jax.random.key(3), "augment": jax.random.key(4)}


def _chunk_fn(num_steps, batch_size=4):
    """`steps.train_chunk` on replicated rows: step s takes the s-th batch of
    `order` (cycling), one device, synchronous steps."""
    def batch_fn(inputs, i, step, pipeline):
        del i
        order = inputs["order"]
        offset = (step % (order.shape[0] // batch_size)) * batch_size
        examples = jax.lax.dynamic_slice_in_dim(order, offset, batch_size)
        rows = jax.tree.map(lambda a: jnp.take(a, examples, axis=0), inputs["rows"])
        return {**pipeline.preprocess_fn(rows), "index": examples}

    step_fn = functools.partial(
        sync.Sync().train_step, mesh=None,
        inner_step=functools.partial(steps.train_step, objective=OBJECTIVE))
    chunk = jax.jit(functools.partial(
        steps.train_chunk, num_steps=num_steps, steps_per_epoch=1,  # no augment
        batch_fn=batch_fn, step_fn=step_fn, pipeline=PIPELINE))

    def run(state, totals, bad, data, order):
        return chunk(steps.Carry(state, totals, bad), {"rows": data, "order": order},
                     KEYS, {})
    return run


class TrainStepTest(absltest.TestCase):

    def test_loss_falls_on_a_fixed_batch_and_params_change(self):
        state, data = helpers.lenet_setup(learning_rate=0.03)
        batch = jax.tree.map(lambda a: a[:8], data)
        step = helpers.jit_train_step()
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
        state, data = helpers.lenet_setup(learning_rate=0.1)
        batch = jax.tree.map(lambda a: a[:4], data)

        def loss_fn(params):
            logits = state.apply_fn({"params": params}, batch["image"])
            return optax.softmax_cross_entropy_with_integer_labels(
                logits, batch["label"]).mean()

        grads = jax.grad(loss_fn)(state.params)
        new_state, _ = helpers.jit_train_step()(state, batch, jax.random.key(0))
        # First momentum step: trace = grad, params -= lr * grad.
        expected = jax.tree.map(lambda p, g: p - 0.1 * g, state.params, grads)
        jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5,
                                       atol=1e-6), new_state.params, expected)

    def test_fused_chunk_equals_single_steps_bitwise(self):
        state, data = helpers.lenet_setup()
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
        state, data = helpers.lenet_setup(learning_rate=1e-9)
        perm = jnp.arange(32, dtype=jnp.int32)[::-1]
        _, totals, _ = _chunk_fn(8)(state, OBJECTIVE.metrics_cls.empty(),
                                    jnp.int32(-1), data, perm)
        # 8 steps x 4 = every example exactly once: the epoch's mean loss.
        logits = state.apply_fn({"params": state.params}, data["image"])
        expected = OBJECTIVE.losses(logits, data["label"], False).mean()
        np.testing.assert_allclose(float(totals.compute()["loss"]), float(expected),
                                   rtol=1e-5)

    def test_first_non_finite_step_is_reported(self):
        state, data = helpers.lenet_setup()
        perm = jnp.arange(32, dtype=jnp.int32)
        data["image"] = data["image"].at[9].set(jnp.nan)  # read by step 2 (8..11)
        _, _, bad = _chunk_fn(4)(state, OBJECTIVE.metrics_cls.empty(), jnp.int32(-1),
                                 data, perm)
        self.assertEqual(int(bad), 2)


class EvaluateTest(absltest.TestCase):

    def test_padded_batches_count_every_example_once(self):
        state, data = helpers.lenet_setup(n=37)
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
