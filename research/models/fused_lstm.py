"""An LSTM over a whole sequence with a hand-written backward pass.

Autodiff of a scan accumulates the recurrent weight gradient one time step at
a time: T small [hidden, batch] x [batch, 4 hidden] matmuls inside the loop.
Here the backward loop only propagates `dz @ W_hh^T`; the weight gradient is
one [hidden, T * batch] x [T * batch, 4 hidden] matmul after it, as cuDNN and
PyTorch do. The forward stores the gate activations for the backward.

`impl="kernel"` runs both time loops in C++ (`research/kernels/lstm.py`).
Both compute the same function (tests/rnn_test.py).
"""
import jax
import jax.numpy as jnp
from jax import lax

from research.models import impl as impl_lib


def _forward(gates_x, w_hh, c0, h0):
    def step(carry, gx):
        c, h = carry
        z = gx + h @ w_hh
        i, f, g, o = jnp.split(z, 4, axis=-1)
        i, f, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jax.nn.sigmoid(o)
        g = jnp.tanh(g)
        c = f * c + i * g
        h = o * jnp.tanh(c)
        return (c, h), (h, c, i, f, g, o)

    (c, h), (hs, cs, i, f, g, o) = lax.scan(step, (c0, h0), gates_x)
    return (hs, (c, h)), (hs, cs, i, f, g, o, c0, h0, w_hh)


def lstm_sequence(gates_x: jax.Array, w_hh: jax.Array, c0: jax.Array, h0: jax.Array,
                  impl: str = "xla"):
    """Runs an LSTM over time.

    Args:
      gates_x: the inputs' gate pre-activations, `x_t @ W_x + b`, batch-major
        [batch, time, 4 * hidden], gate order i, f, g, o.
      w_hh: the recurrent kernel [hidden, 4 * hidden].
      c0: the initial cell state [batch, hidden].
      h0: the initial hidden state [batch, hidden].
      impl: "xla", "kernel" or "auto" (the kernel where it runs; hidden
        sizes that are not multiples of 32 always run in XLA).

    Returns:
      The hidden states [batch, time, hidden] and the final carry (c, h).
    """
    if (impl_lib.resolve(impl, "lstm_impl") == "kernel"
            and impl_lib.lstm_kernel.supports(gates_x, w_hh)):
        return impl_lib.lstm_kernel.sequence(gates_x, w_hh, c0, h0)
    # lax.scan runs over the leading axis: time-major.
    hs, carry = _xla_sequence(gates_x.swapaxes(0, 1), w_hh, c0, h0)
    return hs.swapaxes(0, 1), carry


@jax.custom_vjp
def _xla_sequence(gates_x, w_hh, c0, h0):
    return _forward(gates_x, w_hh, c0, h0)[0]


def _backward(residuals, cotangents):
    hs, cs, i, f, g, o, c0, h0, w_hh = residuals
    d_hs, (d_c, d_h) = cotangents
    c_prev = jnp.concatenate([c0[None], cs[:-1]])
    h_prev = jnp.concatenate([h0[None], hs[:-1]])

    def step(carry, xs):
        dc, dh_next = carry
        dh_out, c, cp, i_, f_, g_, o_ = xs
        dh = dh_out + dh_next
        tc = jnp.tanh(c)
        dc = dc + dh * o_ * (1 - tc * tc)
        dz = jnp.concatenate([dc * g_ * i_ * (1 - i_), dc * cp * f_ * (1 - f_),
                              dc * i_ * (1 - g_ * g_), dh * tc * o_ * (1 - o_)], -1)
        return (dc * f_, dz @ w_hh.T), dz

    (dc0, dh0), dz = lax.scan(step, (d_c, d_h), (d_hs, cs, c_prev, i, f, g, o),
                              reverse=True)
    d_w = jnp.einsum("tbh,tbg->hg", h_prev, dz)
    return dz, d_w, dc0, dh0


_xla_sequence.defvjp(lambda *args: _forward(*args), _backward)
