"""Recurrent character models: multi-layer LSTM/GRU with an explicit carry.

Each layer projects the inputs of all time steps to the gates in one matmul
and leaves only `h @ W_hh` inside the time loop: the loop then runs one
[batch, hidden] x [hidden, gates] matmul a step, as cuDNN and PyTorch do. The
LSTM also takes its recurrent weight gradient out of the backward loop
(`fused_lstm.py`); the GRU runs as an `nn.RNN` cell.
"""
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from research.models import fused_lstm
from research.models import impl as impl_lib

Carry = Any  # per layer: (c, h) for an LSTM, h for a GRU; each [batch, hidden]


class _Kernel(nn.Module):
    """A bare [in, out] kernel, so the LSTM's params read `hidden/kernel`."""
    features: int

    @nn.compact
    def __call__(self, in_features: int) -> jax.Array:
        return self.param("kernel", nn.initializers.orthogonal(),
                          (in_features, self.features))


class FusedLSTM(nn.Module):
    """An LSTM layer over a whole sequence (`fused_lstm.lstm_sequence`).

    Takes the inputs' gate pre-activations `W_x x_t + b` [batch, time,
    4 * features] (gate order i, f, g, o; carry (c, h), as flax's
    `nn.LSTMCell`), returns (carry, hidden states [batch, time, features]).
    """
    features: int
    impl: str = "xla"  # fused_lstm.lstm_sequence's impl

    @nn.compact
    def __call__(self, gates_x: jax.Array, initial_carry: Carry | None = None
                 ) -> tuple[Carry, jax.Array]:
        w_hh = _Kernel(4 * self.features, name="hidden")(self.features)
        if initial_carry is None:
            initial_carry = self.initialize_carry(gates_x.shape[0])
        c, h = initial_carry
        hs, carry = fused_lstm.lstm_sequence(gates_x, w_hh, c, h, self.impl)
        return carry, hs

    def initialize_carry(self, batch_size: int) -> Carry:
        zeros = jnp.zeros((batch_size, self.features))
        return zeros, zeros


class ProjectedGRUCell(nn.RNNCellBase):
    """A GRU step whose input is already `W_x x_t + b`, [..., 3 * features].

    r = s(x_r + W_hr h + b_hr), z = s(x_z + W_hz h + b_hz),
    n = tanh(x_n + r * (W_hn h + b_hn)), h' = (1 - z) n + z h: flax's
    `nn.GRUCell` and PyTorch's `nn.GRU`.
    """
    features: int

    @nn.compact
    def __call__(self, h: Carry, gates_x: jax.Array) -> tuple[Carry, jax.Array]:
        gates_h = nn.Dense(3 * self.features,
                           kernel_init=nn.initializers.orthogonal(),
                           name="hidden")(h)
        xr, xz, xn = jnp.split(gates_x, 3, axis=-1)
        hr, hz, hn = jnp.split(gates_h, 3, axis=-1)
        r = nn.sigmoid(xr + hr)
        z = nn.sigmoid(xz + hz)
        n = jnp.tanh(xn + r * hn)
        h = (1.0 - z) * n + z * h
        return h, h

    def initialize_carry(self, rng: jax.Array, input_shape: tuple[int, ...]) -> Carry:
        return jnp.zeros(input_shape[:-1] + (self.features,))

    @property
    def num_feature_axes(self) -> int:
        return 1


class HashDropout(nn.Module):
    """Inverted dropout whose mask is a hash of the element index and a seed.

    Same distribution as `nn.Dropout` (each element kept with probability
    1 - rate, independently of its neighbours to the quality of a good
    integer hash), but the mask is a few integer ops per element that XLA
    fuses into the multiply, where threefry bits cost ~5 ns each on CPU
    (measured: 11 ms of a 190 ms LSTM step for one [64, 128, 256] mask).
    """
    rate: float
    deterministic: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.deterministic or self.rate == 0.0:
            return x
        seed = jax.random.bits(self.make_rng("dropout"), (2,), jnp.uint32)
        index = jax.lax.iota(jnp.uint32, x.size).reshape(x.shape)
        h = index * jnp.uint32(0x9E3779B9) + seed[0]
        for shift, mult in ((16, 0x7FEB352D), (15, 0x846CA68B)):  # lowbias32
            h = (h ^ (h >> shift)) * jnp.uint32(mult)
        h = h ^ (h >> 16) ^ seed[1]
        h = (h ^ (h >> 16)) * jnp.uint32(0x7FEB352D)  # mix seed[1] in
        h = h ^ (h >> 15)
        threshold = jnp.uint32(min(int(self.rate * 2.0 ** 32), 2 ** 32 - 1))
        keep = h >= threshold
        return jnp.where(keep, x / (1.0 - self.rate), jnp.zeros((), x.dtype))


GATES = {"lstm": 4, "gru": 3}


class CharRNN(nn.Module):
    """Embedding -> `num_layers` x (LSTM or GRU) -> dense over the vocabulary.

    Dropout between layers and before the head. The carry is explicit: pass
    `carry` (from `initialize_carry` or a previous call) and
    `return_carry=True` to process a text in chunks or one token at a time.
    `lstm_impl`: "auto" runs the LSTM's time loops in the C++ CPU kernel where
    it is built and JAX is on the CPU, "xla" in `lax.scan`; same parameters.
    """
    vocab_size: int
    cell: str = "lstm"
    embed_dim: int = 64
    hidden_size: int = 512
    num_layers: int = 2
    dropout_rate: float = 0.0
    lstm_impl: str = "auto"

    def __post_init__(self):
        if self.cell not in GATES:
            raise ValueError(f"cell={self.cell!r}; choose from {sorted(GATES)}.")
        impl_lib.resolve(self.lstm_impl, "lstm_impl")  # a bad value fails here
        super().__post_init__()

    @nn.compact
    def __call__(self, tokens: jax.Array, *, train: bool = False,
                 carry: tuple[Carry, ...] | None = None, return_carry: bool = False):
        """Maps tokens [batch, time] to logits [batch, time, vocab] (and carry)."""
        embed = nn.Embed(self.vocab_size, self.embed_dim, name="embed")
        carries, x = [], None  # x: the previous layer's hidden states
        for layer in range(self.num_layers):
            dense = nn.Dense(GATES[self.cell] * self.hidden_size, name=f"input_{layer}")
            if layer == 0:
                # Token -> gates through one [vocab, gates] table (the embedding
                # projected once), gathered: no [tokens, embed] x [embed, gates]
                # matmul or bias pass over the whole batch.
                gates = jnp.take(dense(embed.embedding), tokens, axis=0)
            else:
                x = HashDropout(self.dropout_rate, deterministic=not train)(x)
                gates = dense(x)
            if self.cell == "lstm":
                rnn = FusedLSTM(self.hidden_size, self.lstm_impl, name=f"cell_{layer}")
            else:
                rnn = nn.RNN(ProjectedGRUCell(self.hidden_size, name=f"cell_{layer}"),
                             return_carry=True, name=f"rnn_{layer}")
            layer_carry, x = rnn(
                gates, initial_carry=None if carry is None else carry[layer])
            carries.append(layer_carry)
        x = HashDropout(self.dropout_rate, deterministic=not train)(x)
        logits = nn.Dense(self.vocab_size, name="head")(x)
        return (logits, tuple(carries)) if return_carry else logits

    def initialize_carry(self, batch_size: int) -> tuple[Carry, ...]:
        """Zero state for every layer."""
        zeros = jnp.zeros((batch_size, self.hidden_size))
        return tuple((zeros, zeros) if self.cell == "lstm" else zeros
                     for _ in range(self.num_layers))
