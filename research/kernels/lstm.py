"""The LSTM's time loops in C++ (`lstm_kernels.cc`), behind `jax.ffi`.

XLA:CPU's per-iteration costs kept `lax.scan` at 0.75x PyTorch: the forward
kernel runs `z_t = gates_x[t] + h_{t-1} W_hh`, the gates, c and h for every
step in one call, the backward kernel `dz_t` and `dh_{t-1} = dz_t W_hh^T`;
evaluation and sampling run an inference kernel that keeps no activations.
The recurrent weight gradient stays one large matmul in XLA. Batch-major, so
no transposes around the calls; each device runs its own rows.
"""
import jax
import jax.numpy as jnp

from research import kernels

UNITS = 32  # hidden sizes must be multiples of this (the kernel's panel width)


def supports(gates_x: jax.Array, w_hh: jax.Array) -> bool:
    """Whether the kernel takes these operands (float32, hidden % 32 == 0)."""
    return w_hh.shape[0] % UNITS == 0 and gates_x.dtype == jnp.float32


def sequence(gates_x: jax.Array, w_hh: jax.Array, c0: jax.Array, h0: jax.Array):
    """`research.models.fused_lstm.lstm_sequence` in the kernel: hidden states
    [batch, time, hidden] and the final carry (c, h)."""
    return kernels.per_device(_kernel_sequence, (True, False, True, True),
                              gates_x, w_hh, c0, h0)


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
    # Without differentiation (evaluation, sampling) JAX runs this, not the
    # forward rule: the inference kernel keeps nothing for a backward pass.
    b, t, _ = gates_x.shape
    states = jax.ShapeDtypeStruct((b, t, w_hh.shape[0]), jnp.float32)
    hs, c = jax.ffi.ffi_call(
        "research_lstm_infer", (states, jax.ShapeDtypeStruct(c0.shape, jnp.float32)),
        vmap_method="sequential")(gates_x, w_hh, c0, h0)
    return hs, (c, hs[:, -1])


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
