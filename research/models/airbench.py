"""A fast CIFAR-10 CNN after airbench94 (K. Jordan, arXiv:2404.00498).

Normalise -> frozen 2x2 patch-whitening conv (its filters and their negation,
set from the training images' patch covariance) -> GELU -> three blocks of
[conv 3x3 -> max-pool 2 -> BatchNorm -> GELU -> conv 3x3 -> BatchNorm -> GELU]
-> global max-pool -> linear (no bias) -> x `scale`. BatchNorm has no scale
(only a bias), momentum 0.6 and eps 1e-12; convolutions start as identities
on their first input channels (Dirac), the rest PyTorch's default uniform.

`dtype="bfloat16"` computes the convolutions and activations in bf16;
parameters, BatchNorm statistics and the logits stay float32. `conv_impl`
picks bf16 convolutions: "kernel" (oneDNN's, as PyTorch uses on CPUs;
`research/kernels/onednn.py`), "xla" or "auto" (oneDNN where it runs).
BatchNorm+GELU, GELU and max-pooling have hand-written VJPs that XLA:CPU runs
fast (`fast_ops.py`). The first convolution of each block computes only the
rows and columns its floor max-pool keeps (31 -> 30, 15 -> 14, 7 -> 6).
"""
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from research.models import fast_ops
from research.models import impl as impl_lib
from research.models import precision

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
WHITEN_EPS = 5e-4


def _uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def _torch_uniform(fan_in: int):
    return _uniform(1.0 / math.sqrt(fan_in))


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
    """3x3 convolution without bias, HWIO kernel named like nn.Conv's; `crop`
    computes only the rows and columns a following 2x2 floor pool keeps."""
    features: int
    dtype: jnp.dtype
    conv_impl: str
    crop: bool = False

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", _dirac_conv_init,
                            (3, 3, x.shape[-1], self.features))
        h, w = x.shape[1:3]
        padding = ((1, 1 - h % 2), (1, 1 - w % 2)) if self.crop else ((1, 1), (1, 1))
        return _conv(x, kernel, padding, self.dtype, self.conv_impl)


def _conv(x, kernel, padding, dtype, conv_impl):
    """oneDNN's bf16 convolution where it runs and the model computes in bf16,
    else XLA's in `dtype`."""
    onednn = impl_lib.onednn_kernel
    if (dtype == jnp.bfloat16 and onednn is not None
            and impl_lib.resolve(conv_impl, "conv_impl", "onednn") == "kernel"):
        return onednn.conv2d(x, kernel, padding, out_dtype=dtype)
    if kernel.dtype != dtype:  # (qwix's quantized kernels cannot be cast)
        kernel = kernel.astype(dtype)
    return jax.lax.conv_general_dilated(
        x.astype(dtype), kernel, (1, 1), padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class AirbenchNet(nn.Module):
    """airbench94's network; widths of the three blocks in `widths`."""
    widths: tuple[int, ...] = (64, 256, 256)
    num_classes: int = 10
    bn_momentum: float = 0.6
    scale: float = 1.0 / 9.0
    head_std: float = 0.0   # > 0: the head's init rescaled to this std
    #                         (airbench94_muon: 1, with scale 1 / width)
    dtype: str = "float32"
    conv_impl: str = "auto"

    def __post_init__(self):
        impl_lib.resolve(self.conv_impl, "conv_impl", "onednn")  # fails early
        precision.dtype(self.dtype)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Maps images [batch, 32, 32, 3] in [0, 1] to logits [batch, classes]."""
        dtype = precision.dtype(self.dtype)
        x = (x - jnp.array(CIFAR_MEAN)) / jnp.array(CIFAR_STD)
        whiten = self.param("whiten_kernel", nn.initializers.zeros, (2, 2, 3, 24))
        whiten_bias = self.param("whiten_bias", nn.initializers.zeros, (24,))
        x = fast_ops.bias_gelu(_conv(x, whiten, ((0, 0), (0, 0)), dtype,
                                     self.conv_impl), whiten_bias)
        for i, width in enumerate(self.widths):
            x = _Conv(width, dtype, self.conv_impl, crop=True,
                      name=f"block{i}_conv1")(x)
            x = fast_ops.max_pool2(x)
            x = fast_ops.BatchNormGelu(self.bn_momentum, 1e-12,
                                       name=f"block{i}_norm1")(x, train=train)
            x = _Conv(width, dtype, self.conv_impl, name=f"block{i}_conv2")(x)
            x = fast_ops.BatchNormGelu(self.bn_momentum, 1e-12,
                                       name=f"block{i}_norm2")(x, train=train)
        # Global max pool; materialised first, so that the gradient's "which
        # input was the max" compares against exactly the values maxed.
        x = jax.lax.optimization_barrier(x).max(axis=(1, 2)).astype(jnp.float32)
        head_init = (_uniform(math.sqrt(3.0) * self.head_std) if self.head_std
                     else _torch_uniform(x.shape[-1]))
        x = nn.Dense(self.num_classes, use_bias=False, kernel_init=head_init,
                     name="head")(x)
        return x * self.scale

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
