"""Character RNNs: shapes, the explicit carry, training, sampling, end to end."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from research.core import config_lib
from research import errors
from research.data import input_pipeline
from research import kernels
from research import models
from research import sample
from research.core import state as state_lib
from research.core import steps
from research.core import objectives
from research import train
from research.core import writers
from research.models import fused_lstm
from research.models import rnn
from tests import helpers

CONFIG = os.path.join(helpers.CONFIGS, "shakespeare_rnn.py")
OBJECTIVE = objectives.LanguageModel()


def _model(cell="lstm", **kwargs):
    values = {"vocab_size": 11, "cell": cell, "embed_dim": 4, "hidden_size": 8,
              "num_layers": 2, "dropout_rate": 0.0}
    values.update(kwargs)
    return models.create_model("char_rnn", **values)


def _expected_params(cell, vocab, embed, hidden, layers):
    gates = 4 if cell == "lstm" else 3
    total = vocab * embed + hidden * vocab + vocab  # embedding, head
    for layer in range(layers):
        inputs = embed if layer == 0 else hidden
        total += inputs * gates * hidden + gates * hidden  # input projection
        total += hidden * gates * hidden  # recurrent kernel
        total += gates * hidden if cell == "gru" else 0  # GRU's b_h
    return total


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_shapes_and_parameter_counts(cell):
    model = _model(cell)
    variables = state_lib.init_variables(jax.random.key(0), model, (2, 5), jnp.int32)
    assert state_lib.count_params(variables["params"]) == _expected_params(
        cell, 11, 4, 8, 2)
    logits = model.apply(variables, jnp.zeros((3, 7), jnp.int32))
    assert logits.shape == (3, 7, 11)
    # The cpu preset's LSTM: 2 x 512, embedding 64, 65 characters.
    config = config_lib.load_config(CONFIG + ":cpu")
    big = models.create_model(config.model, **config.model_kwargs)
    shapes = jax.eval_shape(functools.partial(
        state_lib.init_variables, model=big, input_shape=(1, 4),
        input_dtype=jnp.int32), jax.random.key(0))
    assert state_lib.count_params(shapes["params"]) == _expected_params(
        "lstm", 65, 64, 512, 2) == 3_318_401


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_token_by_token_and_chunks_equal_one_pass(cell):
    model = _model(cell)
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 11)
    variables = state_lib.init_variables(jax.random.key(0), model, (2, 12), jnp.int32)
    whole = model.apply(variables, tokens)
    carry, pieces = model.initialize_carry(2), []
    for t in range(12):
        logits, carry = model.apply(variables, tokens[:, t:t + 1], carry=carry,
                                    return_carry=True)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), whole, atol=1e-5)
    first, carry = model.apply(variables, tokens[:, :5],
                               carry=model.initialize_carry(2), return_carry=True)
    second = model.apply(variables, tokens[:, 5:], carry=carry)
    np.testing.assert_allclose(jnp.concatenate([first, second], 1), whole, atol=1e-6)


def _flax_lstm_as_ours(params):
    """flax nn.LSTMCell params -> (W_x, b, W_hh) in gate order i, f, g, o."""
    gates = ("i", "f", "g", "o")
    return (jnp.concatenate([params[f"i{g}"]["kernel"] for g in gates], -1),
            jnp.concatenate([params[f"h{g}"]["bias"] for g in gates]),
            jnp.concatenate([params[f"h{g}"]["kernel"] for g in gates], -1))


def test_fused_lstm_equals_flax_lstm_values_and_gradients():
    """The hoisted projection and the hand-written backward are flax's LSTM."""
    x = jax.random.normal(jax.random.key(0), (3, 6, 5))
    ref = nn.RNN(nn.LSTMCell(7), return_carry=True)
    ref_vars = ref.init(jax.random.key(1), x)
    w_x, b, w_hh = _flax_lstm_as_ours(ref_vars["params"]["cell"])
    cell = rnn.FusedLSTM(7)
    carry0 = (0.1 * jnp.ones((3, 7)), -0.2 * jnp.ones((3, 7)))

    def ours(x, w_x, w_hh):
        carry, hs = cell.apply({"params": {"hidden": {"kernel": w_hh}}}, x @ w_x + b,
                               initial_carry=carry0)
        return hs, carry

    def theirs(x, params):
        carry, hs = ref.apply({"params": {"cell": params}}, x, initial_carry=carry0)
        return hs, carry

    hs, carry = ours(x, w_x, w_hh)
    ref_hs, ref_carry = theirs(x, ref_vars["params"]["cell"])
    np.testing.assert_allclose(hs, ref_hs, atol=1e-5)
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-5),
                 carry, ref_carry)

    def scalar(out):  # weights every output and the final carry differently
        hs, (c, h) = out
        return (jnp.sin(hs) * jnp.arange(7)).sum() + (c ** 2).sum() + h.sum()

    g_x, g_wx, g_wh = jax.grad(lambda *a: scalar(ours(*a)), argnums=(0, 1, 2))(
        x, w_x, w_hh)
    r_x, r_params = jax.grad(lambda *a: scalar(theirs(*a)), argnums=(0, 1))(
        x, ref_vars["params"]["cell"])
    r_wx, _, r_wh = _flax_lstm_as_ours(r_params)
    for ours_g, ref_g in ((g_x, r_x), (g_wx, r_wx), (g_wh, r_wh)):
        np.testing.assert_allclose(ours_g, ref_g, atol=1e-4, rtol=1e-4)


def test_projected_gru_cell_equals_flax_gru():
    x = jax.random.normal(jax.random.key(0), (3, 6, 5))
    ref = nn.RNN(nn.GRUCell(7))
    ref_vars = ref.init(jax.random.key(1), x)
    p = ref_vars["params"]["cell"]
    gates = ("r", "z", "n")
    w_x = jnp.concatenate([p[f"i{g}"]["kernel"] for g in gates], -1)
    b_x = jnp.concatenate([p[f"i{g}"]["bias"] for g in gates])
    hidden = {"kernel": jnp.concatenate([p[f"h{g}"]["kernel"] for g in gates], -1),
              "bias": jnp.concatenate([jnp.zeros(14), p["hn"]["bias"]])}
    out = nn.RNN(rnn.ProjectedGRUCell(7)).apply(
        {"params": {"cell": {"hidden": hidden}}}, x @ w_x + b_x)
    np.testing.assert_allclose(out, ref.apply(ref_vars, x), atol=1e-5)


def test_loss_falls_on_a_tiny_text():
    config = config_lib.load_config(
        CONFIG + ":smoke", {"learning_rate": 1e-2, "warmup_steps": 0})
    model = _model()
    state = state_lib.create_train_state(jax.random.key(0), config, model, (1, 16),
                                         jnp.int32, 100)
    text = jnp.asarray(np.tile(np.arange(11), 20)[None, :17].repeat(4, 0))
    batch = {"tokens": text}
    step = jax.jit(lambda state, batch, key: steps.train_step(
        state, batch, key, {}, objective=OBJECTIVE)[:2])
    losses = []
    for _ in range(40):
        state, metrics = step(state, batch, jax.random.key(1))
        losses.append(float(metrics.compute()["loss"]))
    assert losses[-1] < 0.6 * losses[0], losses  # measured: 2.41 -> 1.21


def test_language_model_metrics():
    # Logits whose per-token cross-entropies are 1, 2, 3 and 10 against token 0.
    nll = jnp.array([[1.0, 2.0], [3.0, 10.0]])
    logits = jnp.stack([jnp.zeros_like(nll), jnp.log(jnp.exp(nll) - 1.0)], -1)
    batch = {"tokens": jnp.zeros((2, 3), jnp.int32),
             "mask": jnp.array([[1, 1], [1, 0]], bool)}
    loss, metrics = OBJECTIVE(logits, batch, params={}, aux={}, train=False)
    assert float(loss) == pytest.approx(2.0, rel=1e-5)
    result = metrics.compute()
    assert float(result["loss"]) == pytest.approx(2.0, rel=1e-5)
    assert float(result["bits_per_char"]) == pytest.approx(2.0 / np.log(2), rel=1e-5)
    assert float(result["perplexity"]) == pytest.approx(np.exp(2.0), rel=1e-5)


def test_windows_and_streams_cover_the_text():
    dataset = input_pipeline.get_dataset("tiny_shakespeare")
    config = config_lib.load_config(CONFIG, {"seq_len": 4, "eval_batch_size": 3})
    text = np.arange(14, dtype=np.int32)
    windows = dataset.streams(text, config.eval_batch_size)
    # 13 targets over 3 streams of 5; every target exactly once.
    targets = windows["tokens"][:, 1:][windows["mask"]]
    assert sorted(targets.tolist()) == list(range(1, 14))
    assert windows["tokens"].shape == (3, 6)


def test_window_jitter_cuts_each_row_at_a_keyed_random_place():
    """Rows of seq_len + 1 + jitter characters; each step cuts a contiguous
    window of seq_len + 1 from each, the same for the same (key, step,
    example) and elsewhere on other steps."""
    from research.core import augment  # pylint: disable=g-import-not-at-top
    dataset = input_pipeline.get_dataset("tiny_shakespeare")
    config = config_lib.load_config(CONFIG, {"seq_len": 4, "window_jitter": 3})
    rows = np.arange(40, dtype=np.int32)[np.arange(6)[:, None] * 4 + np.arange(8)]
    batch = {"tokens": jnp.asarray(rows), "index": jnp.arange(6, dtype=jnp.int32)}
    key = jax.random.key(0)
    cut = [np.asarray(augment.crop_windows(batch, key, jnp.int32(step), 0,
                                           length=5)["tokens"]) for step in range(8)]
    starts = np.stack([c[:, 0] - rows[:, 0] for c in cut])  # [step, example]
    assert all((c == c[:, :1] + np.arange(5)).all() for c in cut)  # contiguous
    assert starts.min() == 0 and starts.max() == 3  # every start in [0, jitter]
    assert len(set(starts.ravel().tolist())) == 4
    np.testing.assert_array_equal(cut[2], augment.crop_windows(
        batch, key, jnp.int32(2), 0, length=5)["tokens"])
    from research import assembly  # pylint: disable=g-import-not-at-top
    with pytest.raises(errors.UserError, match="window_jitter=-1"):
        assembly.validate(config_lib.load_config(CONFIG, {"window_jitter": -1}))
    assert dataset.input_shape(config) == (4,)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("rnn"))
    config = helpers.rnn_tiny_config()
    return config, workdir, helpers.rnn_mocked(train.train_and_evaluate, config,
                                               workdir)


def test_end_to_end_and_metrics(trained):
    config, workdir, result = trained
    assert result["step"] > 0
    assert result["eval/bits_per_char"] == pytest.approx(
        result["eval/loss"] / np.log(2), rel=1e-5)
    assert any("train/loss" in r for r in writers.read_metrics(workdir))


def test_sampling_is_deterministic_and_greedy_at_zero(trained):
    config, workdir, _ = trained
    config.sample.length = 30
    first = helpers.rnn_mocked(sample.sample, config, workdir)
    assert first.startswith(config.sample.prompt) and len(first) == 30 + len(
        config.sample.prompt)
    assert helpers.rnn_mocked(sample.sample, config, workdir) == first
    config.sample.seed = 1
    config.sample.temperature = 0.0
    greedy = helpers.rnn_mocked(sample.sample, config, workdir)
    config.sample.seed = 2
    assert helpers.rnn_mocked(sample.sample, config, workdir) == greedy


def test_sampling_errors_say_what_to_do(trained, tmp_path):
    config, workdir, _ = trained
    config.sample.prompt = "ROMEO: Zebra"
    with pytest.raises(errors.UserError, match="not in the vocabulary.*Use only"):
        helpers.rnn_mocked(sample.sample, config, workdir)
    with pytest.raises(errors.UserError, match="train first"):
        helpers.rnn_mocked(sample.sample, helpers.rnn_tiny_config(), str(tmp_path))
    cifar = config_lib.load_config(os.path.join(helpers.CONFIGS, "cifar_cnn.py"))
    with pytest.raises(errors.UserError, match="language-model config"):
        sample.sample(cifar, workdir)


def test_vocab_size_mismatch_is_reported(tmp_path):
    with pytest.raises(errors.UserError, match="vocab_size=65 but the training text"):
        helpers.rnn_mocked(train.train_and_evaluate,
                           helpers.rnn_tiny_config(**{"model_kwargs.vocab_size": 65}),
                           str(tmp_path))


_NEED_KERNELS = pytest.mark.skipif(
    not kernels.available() and not os.environ.get("RESEARCH_REQUIRE_KERNELS"),
    reason=f"C++ kernels unavailable: {kernels.load_error()}")


@_NEED_KERNELS
@pytest.mark.parametrize("batch,time,hidden", [(3, 5, 32), (8, 7, 64), (13, 4, 96),
                                               (2, 1, 32), (64, 6, 128)])
def test_lstm_kernel_equals_the_scan(batch, time, hidden):
    """The C++ time loops (inference, forward and backward) against lax.scan: outputs,
    final carry and all four gradients, with row remainders (3, 13), an odd
    number of 32-unit panels (96) and a single step."""
    rng = np.random.default_rng(batch * 100 + hidden)
    gates_x = jnp.asarray(rng.standard_normal((batch, time, 4 * hidden)), jnp.float32)
    w_hh = jnp.asarray(0.1 * rng.standard_normal((hidden, 4 * hidden)), jnp.float32)
    c0, h0 = (jnp.asarray(rng.standard_normal((batch, hidden)), jnp.float32)
              for _ in range(2))

    def scalar(out):
        hs, (c, h) = out
        return (jnp.sin(hs) * jnp.arange(hidden)).sum() + (c ** 2).sum() + h.sum()

    results = {}
    for impl in ("kernel", "xla"):
        run = functools.partial(fused_lstm.lstm_sequence, impl=impl)  # noqa: B023
        results[impl] = (jax.jit(run)(gates_x, w_hh, c0, h0),
                         jax.jit(jax.grad(lambda *a, run=run: scalar(run(*a)),
                                          (0, 1, 2, 3)))(gates_x, w_hh, c0, h0))
    for got, want in zip(jax.tree.leaves(results["kernel"]),
                         jax.tree.leaves(results["xla"])):
        scale = float(jnp.max(jnp.abs(want)))
        assert float(jnp.max(jnp.abs(got - want))) <= 2e-6 * scale
    # Evaluation runs the inference kernel, training the forward that keeps
    # activations: the same arithmetic, so the same bits.
    run = functools.partial(fused_lstm.lstm_sequence, impl="kernel")
    trained = jax.jit(lambda *a: jax.vjp(run, *a)[0])(gates_x, w_hh, c0, h0)
    for got, want in zip(jax.tree.leaves(results["kernel"][0]),
                         jax.tree.leaves(trained)):
        np.testing.assert_array_equal(got, want)


def test_hash_dropout_keeps_the_right_fraction_and_is_seeded():
    x = jnp.ones((64, 128, 96))
    layer = rnn.HashDropout(0.2, deterministic=False)
    out = layer.apply({}, x, rngs={"dropout": jax.random.key(0)})
    kept = np.asarray(out != 0)
    assert abs(kept.mean() - 0.8) < 0.002  # 786k draws: std 0.00045
    np.testing.assert_allclose(np.asarray(out)[kept], 1 / 0.8, rtol=1e-6)
    # Neighbours are independent: P(keep both) = 0.64 along every axis.
    for axis in range(3):
        both = (kept & np.roll(kept, 1, axis=axis)).mean()
        assert abs(both - 0.64) < 0.003, (axis, both)
    again = layer.apply({}, x, rngs={"dropout": jax.random.key(0)})
    other = layer.apply({}, x, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(out, again)
    assert 0.6 < float((np.asarray(other) != 0).astype(float).mean()) < 1.0
    assert float(((np.asarray(other) != 0) == kept).mean()) < 0.7  # new mask
    np.testing.assert_array_equal(
        rnn.HashDropout(0.2, deterministic=True).apply({}, x), x)


def test_bad_lstm_impl_is_refused():
    config = config_lib.load_config(CONFIG, {"model_kwargs.lstm_impl": "fast"})
    with pytest.raises(errors.UserError, match="lstm_impl='fast'; choose from"):
        models.create_model(config.model, **config.model_kwargs)
