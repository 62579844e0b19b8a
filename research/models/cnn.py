"""Convolutional image classifiers (NHWC inputs, logits out)."""
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from research.models import impl as impl_lib
from research.models import precision


def _torch_uniform(fan_in: int) -> nn.initializers.Initializer:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default Conv2d/Linear init.

    The seed's recipe (lr 0.001, batch 4, 10 epochs) was tuned with it; flax's
    lecun_normal would change what 10 epochs reach.
    """
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class LeNet(nn.Module):
    """The seed's CIFAR-10 CNN: 62,006 parameters for 10 classes.

    conv 6@5x5 -> relu -> pool 2 -> conv 16@5x5 -> relu -> pool 2 ->
    dense 120 -> relu -> dense 84 -> relu -> dense num_classes.

    `conv_impl`: "xla" runs flax's NHWC convolutions; "kernel" runs the
    convolutions batch-minor in the C++ CPU kernel (`research/kernels/
    conv.py`); "auto" takes the kernel where it is built and JAX runs on the
    CPU. The parameters are the same in every case, so checkpoints are
    interchangeable. `dtype="bfloat16"` computes in bf16 on float32
    parameters (the kernel is float32, so "auto" then takes XLA's
    convolutions); the logits are float32.
    """
    num_classes: int = 10
    conv_impl: str = "auto"
    dtype: str = "float32"

    def __post_init__(self):
        impl_lib.resolve(self.conv_impl, "conv_impl")  # a bad value fails here
        if precision.dtype(self.dtype) != jnp.float32 and self.conv_impl == "kernel":
            raise ValueError("conv_impl='kernel' computes in float32; use 'auto' "
                             "or 'xla' with dtype='bfloat16'.")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Maps images [batch, 32, 32, 3] in [0, 1] to logits [batch, classes]."""
        del train  # No dropout or batch norm in the seed's model.
        dtype = precision.dtype(self.dtype)
        if (dtype == jnp.float32
                and impl_lib.resolve(self.conv_impl, "conv_impl") == "kernel"):
            x = self._batch_minor_features(x)
        else:
            for features in (6, 16):
                fan_in = 5 * 5 * x.shape[-1]
                x = nn.Conv(features, (5, 5), padding="VALID", dtype=dtype,
                            kernel_init=_torch_uniform(fan_in),
                            bias_init=_torch_uniform(fan_in))(x)
                x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        for i, features in enumerate((120, 84, self.num_classes)):
            if i:
                x = nn.relu(x)
            fan_in = x.shape[-1]
            x = nn.Dense(features, dtype=dtype, kernel_init=_torch_uniform(fan_in),
                         bias_init=_torch_uniform(fan_in))(x)
        return x.astype(jnp.float32)

    def _batch_minor_features(self, x: jax.Array) -> jax.Array:
        """The two conv blocks, batch-minor; returns NHWC features."""
        bmc = impl_lib.conv_kernel
        n = x.shape[0]
        lanes = bmc.lanes_for(n // impl_lib.kernels().data_parallel_size())
        x = bmc.to_blocks(x, lanes)
        for i, features in enumerate((6, 16)):
            # Named as nn.Conv names itself: the same parameter tree.
            x = _BatchMinorConv(features, 5, self.conv_impl, name=f"Conv_{i}")(x)
        return bmc.from_blocks(x, n)


class _BatchMinorConv(nn.Module):
    """nn.Conv's parameters (kernel HWIO, bias) on [N/L, C, H, W, L], then
    ReLU and 2x2 max pooling."""
    features: int
    kernel_size: int
    impl: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, channels = self.kernel_size, x.shape[1]
        init = _torch_uniform(k * k * channels)
        kernel = self.param("kernel", init, (k, k, channels, self.features))
        bias = self.param("bias", init, (self.features,))
        bmc = impl_lib.conv_kernel
        return bmc.bias_relu_pool(bmc.conv(x, kernel, self.impl), bias, self.impl)


class ConvNet(nn.Module):
    """Conv-BatchNorm-ReLU-pool blocks, global average pool, dropout, dense.

    BatchNorm statistics live in the `batch_stats` collection: updated in
    training (over the global batch, whatever the device count), frozen in
    evaluation, checkpointed with the params.
    """
    features: tuple[int, ...] = (32, 64, 128)
    num_classes: int = 10
    dropout_rate: float = 0.1
    dtype: str = "float32"  # compute; parameters and statistics stay float32

    def __post_init__(self):
        precision.dtype(self.dtype)  # a bad name fails here
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Maps images [batch, height, width, channels] to logits [batch, classes]."""
        dtype = precision.dtype(self.dtype)
        for features in self.features:
            x = nn.Conv(features, (3, 3), use_bias=False, dtype=dtype)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                             dtype=dtype)(x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = x.mean(axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=dtype)(x).astype(jnp.float32)
