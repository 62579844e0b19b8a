"""An LSTM over a whole sequence with a hand-written backward pass.

Autodiff of a scan accumulates the recurrent weight gradient one time step at
a time: T small [hidden, batch] x [batch, 4 hidden] matmuls inside the loop.
Here the backward loop only propagates `dz @ W_hh^T`; the weight gradient is
one [hidden, T * batch] x [T * batch, 4 hidden] matmul after it, as cuDNN and
PyTorch do. The forward stores the gate activations for the backward.

`impl="kernel"` runs both time loops in C++ (`research/kernels/
lstm_kernels.cc`): XLA:CPU's per-iteration costs kept the scan at 0.75x
PyTorch. Both compute the same function (tests/rnn_test.py).
"""
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from research import kernels

KERNEL_UNITS = 32  # the kernel needs hidden sizes that are multiples of this


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
    use_kernel = (kernels.resolve(impl, "lstm_impl") == "kernel"
                  and w_hh.shape[0] % KERNEL_UNITS == 0
                  and gates_x.dtype == jnp.float32)
    if not use_kernel:  # lax.scan runs over the leading axis: time-major
        hs, carry = _xla_sequence(gates_x.swapaxes(0, 1), w_hh, c0, h0)
        return hs.swapaxes(0, 1), carry
    devices = kernels.data_parallel_size()
    if devices > 1 and gates_x.shape[0] % devices == 0:
        # Each device runs its own rows of the batch; shard_map's transpose
        # sums the weight gradient over devices.
        batch = P(kernels.DATA_AXIS)
        return jax.shard_map(_kernel_sequence, in_specs=(batch, P(), batch, batch),
                             out_specs=(batch, (batch, batch)),
                             check_vma=False)(gates_x, w_hh, c0, h0)
    return _kernel_sequence(gates_x, w_hh, c0, h0)


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


def _kernel_forward(gates_x, w_hh, c0, h0):
    b, t, _ = gates_x.shape
    h = w_hh.shape[0]
    states = jax.ShapeDtypeStruct((b, t, h), jnp.float32)
    hs, cs, acts = jax.ffi.ffi_call(
        "research_lstm_fwd", (states, states, jax.ShapeDtypeStruct(gates_x.shape,
                                                                   jnp.float32)),
        vmap_method="sequential")(gates_x, w_hh, c0, h0)
    return (hs, (cs[:, -1], hs[:, -1])), (hs, cs, acts, c0, h0, w_hh)


@jax.custom_vjp
def _kernel_sequence(gates_x, w_hh, c0, h0):
    return _kernel_forward(gates_x, w_hh, c0, h0)[0]


def _kernel_backward(residuals, cotangents):
    hs, cs, acts, c0, h0, w_hh = residuals
    d_hs, (d_c, d_h) = cotangents
    carry = jax.ShapeDtypeStruct(c0.shape, jnp.float32)
    dz, dc0, dh0 = jax.ffi.ffi_call(
        "research_lstm_bwd",
        (jax.ShapeDtypeStruct(acts.shape, jnp.float32), carry, carry),
        vmap_method="sequential")(d_hs, d_c, d_h, cs, c0, acts, w_hh)
    h_prev = jnp.concatenate([h0[:, None], hs[:, :-1]], axis=1)
    d_w = jnp.einsum("bth,btg->hg", h_prev, dz)
    return dz, d_w, dc0, dh0


_kernel_sequence.defvjp(_kernel_forward, _kernel_backward)
