"""A decoder-only Transformer language model (GPT-2 style, pre-norm).

Token and learned position embeddings, `num_layers` blocks of causal
self-attention (`jax.nn.dot_product_attention`) and a GELU MLP, each behind a
LayerNorm and a residual, a final LayerNorm and a head tied to the token
embedding (or its own). Every parameter and the main activations carry
logical axis names ("embed", "heads", "mlp", "vocab", "batch", ...): a
parallel scheme maps them to mesh axes with rules (`parallel/sharded.py`),
without the model knowing the mesh. `dtype` is the compute dtype,
`param_dtype` the parameters' (bf16 compute on float32 master weights), and
`remat` rematerialises each block in the backward pass (a
`jax.checkpoint_policies` name, or "full").

`decode=True` runs one new token at a time against a key-value cache (the
"cache" collection: `init_cache`, then `apply(..., mutable=["cache"])`), so
sampling costs one token's compute per step; greedy decoding with the cache
gives the tokens of decoding without it (tested).
"""
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from research.models import precision

REMAT_POLICIES = ("none", "full", "dots_saveable", "nothing_saveable",
                  "dots_with_no_batch_dims_saveable")


def _constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """`x` pinned to the layout its logical names map to (no rules: as is)."""
    return nn.with_logical_constraint(x, names)


class Dense(nn.Module):
    """x [..., *in] @ kernel [prod(in), prod(features)] without a bias.

    The kernel is stored 2-D, the matmul's own operand: XLA:CPU runs
    multi-axis contractions (and their gradients) much slower, and qwix
    quantizes a kernel only when `jax.lax.dot_general` reads the
    parameter itself.
    Each merged axis takes the logical name of its leading (major) axis
    (`names` are those of the full shape): splitting [heads * head_dim]
    in contiguous blocks over devices is splitting the heads.
    """
    features: tuple[int, ...]
    names: tuple[str | None, ...]
    dtype: Any
    param_dtype: Any
    contract: int = 1  # trailing input axes contracted
    std: float = 0.02

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        lead, fan_in = x.shape[:x.ndim - self.contract], math.prod(
            x.shape[x.ndim - self.contract:])
        names = (self.names[0], self.names[self.contract])
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.normal(self.std), names),
            (fan_in, math.prod(self.features)), self.param_dtype)
        if kernel.dtype != self.dtype:  # bf16 compute on float32 weights
            kernel = kernel.astype(self.dtype)
        y = jax.lax.dot_general(x.astype(self.dtype).reshape(-1, fan_in), kernel,
                                (((1,), (0,)), ((), ())))
        return y.reshape(lead + tuple(self.features))


def _dense(features, names, dtype, param_dtype, name, contract=1, std=0.02):
    features = (features,) if isinstance(features, int) else tuple(features)
    return Dense(features, names, dtype, param_dtype, contract, std, name=name)


def _norm(dtype, param_dtype, name):
    return nn.LayerNorm(
        epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


class Attention(nn.Module):
    """Causal multi-head self-attention, with a key-value cache to decode."""
    num_heads: int
    context: int
    dtype: Any
    param_dtype: Any
    out_std: float

    @nn.compact
    def __call__(self, x: jax.Array, decode: bool) -> jax.Array:
        width = x.shape[-1]
        head_dim = width // self.num_heads
        shape = (self.num_heads, head_dim)
        names = ("embed", "heads", "kv")
        q, k, v = (_dense(shape, names, self.dtype, self.param_dtype, n)(x)
                   for n in ("query", "key", "value"))
        q, k, v = (_constrain(t, ("batch", "length", "act_heads", "kv"))
                   for t in (q, k, v))
        if decode:
            y = self._decode(q, k, v)
        else:
            y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        y = _constrain(y, ("batch", "length", "act_heads", "kv"))
        return _dense(width, ("heads", "kv", "embed"), self.dtype, self.param_dtype,
                      "out", contract=2, std=self.out_std)(y)

    def _decode(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """Appends this call's keys and values to the cache and attends to
        every cached position up to the newest."""
        batch, steps = k.shape[:2]
        cache_shape = (batch, self.context) + k.shape[2:]
        cached_k = self.variable("cache", "cached_key", jnp.zeros, cache_shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, cache_shape,
                                 v.dtype)
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        start = index.value
        cached_k.value = jax.lax.dynamic_update_slice_in_dim(
            cached_k.value, k, start, axis=1)
        cached_v.value = jax.lax.dynamic_update_slice_in_dim(
            cached_v.value, v, start, axis=1)
        index.value = start + steps
        # Query i (absolute position start + i) sees keys 0 .. start + i.
        query_pos = start + jnp.arange(steps)
        mask = jnp.arange(self.context)[None, :] <= query_pos[:, None]
        return jax.nn.dot_product_attention(
            q, cached_k.value, cached_v.value, mask=mask[None, None])


class Block(nn.Module):
    """x + attention(norm(x)), then x + mlp(norm(x))."""
    num_heads: int
    context: int
    mlp_ratio: int
    dropout_rate: float
    dtype: Any
    param_dtype: Any
    out_std: float

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, decode: bool) -> jax.Array:
        width = x.shape[-1]
        drop = nn.Dropout(self.dropout_rate, deterministic=not train)
        h = _norm(self.dtype, self.param_dtype, "norm1")(x)
        h = Attention(self.num_heads, self.context, self.dtype, self.param_dtype,
                      self.out_std, name="attention")(h, decode)
        x = _constrain(x + drop(h), ("batch", "length", "act_embed"))
        h = _norm(self.dtype, self.param_dtype, "norm2")(x)
        h = _dense(self.mlp_ratio * width, ("embed", "mlp"), self.dtype,
                   self.param_dtype, "fc1")(h)
        h = _constrain(nn.gelu(h), ("batch", "length", "act_mlp"))
        h = _dense(width, ("mlp", "embed"), self.dtype, self.param_dtype, "fc2",
                   std=self.out_std)(h)
        return _constrain(x + drop(h), ("batch", "length", "act_embed"))


class GPT(nn.Module):
    """tokens [batch, time] int32 -> logits [batch, time, vocab_size] float32.

    Attributes:
      vocab_size: tokens the model knows (a character set, for text here).
      vocab_multiple: the embedding table's rows are padded to a multiple
        of this (so that they split over devices); logits are cut back.
      num_layers, width, num_heads: the blocks; width divides by num_heads.
      context: the longest sequence (learned positions; the cache's length).
      mlp_ratio: the MLP's hidden width over `width`.
      dropout_rate: after attention, the MLP and the embeddings (training).
      tie_embeddings: the head is the token embedding's transpose.
      dtype, param_dtype: compute and parameter dtypes ("float32",
        "bfloat16"); logits and the loss are float32.
      remat: rematerialise each block in the backward pass: "none", "full",
        or a `jax.checkpoint_policies` name (e.g. "dots_saveable").
    """
    vocab_size: int = 65
    vocab_multiple: int = 64
    num_layers: int = 4
    width: int = 128
    num_heads: int = 4
    context: int = 128
    mlp_ratio: int = 4
    dropout_rate: float = 0.0
    tie_embeddings: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(f"width={self.width} does not split into "
                             f"num_heads={self.num_heads} heads.")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; choose from {REMAT_POLICIES}.")
        precision.dtype(self.dtype)  # a bad name fails here
        precision.dtype(self.param_dtype, "param_dtype")
        super().__post_init__()

    @nn.compact
    def __call__(self, tokens: jax.Array, *, train: bool = False,
                 decode: bool = False) -> jax.Array:
        dtype = precision.dtype(self.dtype)
        param_dtype = precision.dtype(self.param_dtype, "param_dtype")
        tokens = _constrain(tokens, ("batch", "length"))
        rows = -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple
        embed = nn.Embed(rows, self.width, dtype=dtype,
                         param_dtype=param_dtype, name="token_embed",
                         embedding_init=nn.with_logical_partitioning(
                             nn.initializers.normal(0.02), ("vocab", "embed")))
        positions = self.param("position_embed", nn.with_logical_partitioning(
            nn.initializers.normal(0.01), (None, "embed")),
            (self.context, self.width), param_dtype)
        start = 0
        if decode:  # the position of the first new token: the cache's fill
            filled = self.variable("cache", "position",
                                   lambda: jnp.zeros((), jnp.int32))
            start = filled.value
            filled.value = start + tokens.shape[1]
        pos = jax.lax.dynamic_slice_in_dim(positions, start, tokens.shape[1])
        x = embed(tokens) + pos.astype(dtype)[None]
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = _constrain(x, ("batch", "length", "act_embed"))
        block = Block
        if self.remat != "none":
            policy = (None if self.remat == "full"
                      else getattr(jax.checkpoint_policies, self.remat))
            block = nn.remat(Block, static_argnums=(2, 3), policy=policy)
        out_std = 0.02 / (2 * self.num_layers) ** 0.5  # GPT-2's residual scaling
        for i in range(self.num_layers):
            x = block(self.num_heads, self.context, self.mlp_ratio,
                      self.dropout_rate, dtype, param_dtype, out_std,
                      name=f"block{i}")(x, train, decode)
        x = _norm(dtype, param_dtype, "norm")(x)
        if self.tie_embeddings:
            # x @ table^T by dot_general (flax's `attend` calls jnp.dot, whose
            # extra arguments qwix's interception of dot_general rejects).
            table = embed.embedding
            logits = jax.lax.dot_general(
                x, table if table.dtype == dtype else table.astype(dtype),
                (((x.ndim - 1,), (1,)), ((), ())))
        else:
            logits = _dense(rows, ("embed", "vocab"), dtype, param_dtype, "head")(x)
        logits = _constrain(logits.astype(jnp.float32), ("batch", "length", "act_vocab"))
        return logits[..., :self.vocab_size]

    def init_cache(self, batch_size: int) -> dict[str, Any]:
        """An empty key-value cache for `batch_size` sequences (`decode=True`)."""
        tokens = jnp.zeros((batch_size, 1), jnp.int32)
        shapes = jax.eval_shape(functools.partial(self.init, decode=True),
                                jax.random.key(0), tokens)["cache"]
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
