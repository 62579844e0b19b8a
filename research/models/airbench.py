"""A fast CIFAR-10 CNN after airbench94 (K. Jordan, arXiv:2404.00498).

Normalise -> frozen 2x2 patch-whitening conv (its filters and their negation,
set from the training images' patch covariance) -> GELU -> three blocks of
[conv 3x3 -> max-pool 2 -> BatchNorm -> GELU -> conv 3x3 -> BatchNorm -> GELU]
-> global max-pool -> linear (no bias) -> x `scale`. BatchNorm has no scale
(only a bias), momentum 0.6 and eps 1e-12; convolutions start as identities
on their first input channels (Dirac), the rest PyTorch's default uniform.

`conv_impl` picks the convolutions: "xla" (flax's `nn.Conv`), "kernel" (the
C++ CPU kernel in bf16 when built) or "auto". `dtype="bfloat16"` computes
the convolutions and activations in bf16; parameters, BatchNorm statistics
and the logits stay float32.
"""
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from research.models import impl as impl_lib

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
WHITEN_EPS = 5e-4


def _torch_uniform(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def _dirac_conv_init(key, shape, dtype=jnp.float32):
    """PyTorch's default conv init, then identity filters for the first
    min(in, out) output channels (airbench's `dirac_` on w[:in])."""
    kh, kw, cin, cout = shape
    w = _torch_uniform(kh * kw * cin)(key, shape, dtype)
    n = min(cin, cout)
    identity = jnp.zeros((kh, kw, cin, n), dtype).at[kh // 2, kw // 2].set(
        jnp.eye(cin, n, dtype=dtype))
    return w.at[..., :n].set(identity)


class _Conv(nn.Module):
    """3x3 'same' convolution without bias, HWIO kernel named like nn.Conv's."""
    features: int
    dtype: jnp.dtype
    conv_impl: str

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", _dirac_conv_init,
                            (3, 3, x.shape[-1], self.features))
        kernels = impl_lib.conv_kernel
        if (kernels is not None and hasattr(kernels, "conv2d_same")
                and impl_lib.resolve(self.conv_impl, "conv_impl") == "kernel"):
            return kernels.conv2d_same(x.astype(self.dtype), kernel)
        return jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel.astype(self.dtype), (1, 1), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"))


class AirbenchNet(nn.Module):
    """airbench94's network; widths of the three blocks in `widths`."""
    widths: tuple[int, ...] = (64, 256, 256)
    num_classes: int = 10
    bn_momentum: float = 0.6
    scale: float = 1.0 / 9.0
    dtype: str = "float32"
    conv_impl: str = "auto"

    def __post_init__(self):
        impl_lib.resolve(self.conv_impl, "conv_impl")  # a bad value fails here
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Maps images [batch, 32, 32, 3] in [0, 1] to logits [batch, classes]."""
        dtype = jnp.dtype(self.dtype)
        x = (x - jnp.array(CIFAR_MEAN)) / jnp.array(CIFAR_STD)
        whiten = self.param("whiten_kernel", nn.initializers.zeros, (2, 2, 3, 24))
        whiten_bias = self.param("whiten_bias", nn.initializers.zeros, (24,))
        x = jax.lax.conv_general_dilated(
            x.astype(dtype), whiten.astype(dtype), (1, 1), "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC")) + whiten_bias.astype(dtype)
        x = nn.gelu(x, approximate=False)
        for i, width in enumerate(self.widths):
            x = _Conv(width, dtype, self.conv_impl, name=f"block{i}_conv1")(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = self._norm(x, train, f"block{i}_norm1")
            x = _Conv(width, dtype, self.conv_impl, name=f"block{i}_conv2")(x)
            x = self._norm(x, train, f"block{i}_norm2")
        x = x.max(axis=(1, 2)).astype(jnp.float32)
        x = nn.Dense(self.num_classes, use_bias=False,
                     kernel_init=_torch_uniform(x.shape[-1]), name="head")(x)
        return x * self.scale

    def _norm(self, x, train, name):
        """BatchNorm (bias only; statistics in float32) then GELU."""
        y = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                         epsilon=1e-12, use_scale=False, dtype=x.dtype,
                         param_dtype=jnp.float32, name=name)(x)
        return nn.gelu(y, approximate=False)

    def init_from_data(self, variables, images: jax.Array):
        """Sets the whitening filters from images [n, 32, 32, 3] in [0, 1]
        (airbench uses the first 5,000 training images): the eigenvectors of
        the 2x2 patches' covariance scaled by 1/sqrt(eigenvalue + eps), and
        their negation."""
        x = (images.astype(jnp.float32) - jnp.array(CIFAR_MEAN)) / jnp.array(
            CIFAR_STD)
        patches = jnp.concatenate(
            [x[:, i:i + 31, j:j + 31, :] for i in (0, 1) for j in (0, 1)], -1)
        # Feature order (i, j, channel) matches the HWIO kernel's (h, w, c).
        flat = patches.reshape(-1, 12)
        covariance = flat.T @ flat / flat.shape[0]
        eigenvalues, eigenvectors = jnp.linalg.eigh(covariance)
        eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]
        filters = eigenvectors / jnp.sqrt(eigenvalues + WHITEN_EPS)  # [12, 12]
        kernel = jnp.concatenate([filters, -filters], axis=1).reshape(2, 2, 3, 24)
        params = dict(variables["params"])
        params["whiten_kernel"] = kernel
        return {**variables, "params": params}
