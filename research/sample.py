"""`--mode=sample`: continue a prompt with a trained character model.

A recurrent model carries its state from token to token; a Transformer
decodes against its key-value cache (`models/gpt.py`), one token's compute a
step. Sampling: temperature (0: greedy), top-k and top-p (nucleus)."""
import functools

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn
from jax import lax

from research import errors
from research import assembly
from research.data import input_pipeline
from research import timing


def pick_token(logits: jax.Array, key: jax.Array, *, temperature: float,
               top_k: int, top_p: float = 1.0) -> jax.Array:
    """Samples one id from logits [vocab]; temperature 0 is greedy. `top_k`
    keeps the k likeliest (0: all); `top_p` the fewest likeliest whose
    probability reaches p (1: all)."""
    if temperature == 0:
        return jnp.argmax(logits).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = lax.top_k(logits, top_k)[0][-1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits)[::-1]
        before = jnp.cumsum(jax.nn.softmax(ordered)) - jax.nn.softmax(ordered)
        cutoff = jnp.min(jnp.where(before < top_p, ordered, jnp.inf))
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits).astype(jnp.int32)


def generate(model: nn.Module, variables, prompt: jax.Array, key: jax.Array, *,
             length: int, temperature: float, top_k: int, top_p: float = 1.0
             ) -> jax.Array:
    """Reads `prompt` [time] and returns `length` new ids, one step at a time:
    the model's state (a recurrent carry, or a Transformer's key-value
    cache) goes from step to step."""
    if hasattr(model, "init_cache"):
        def apply(state, tokens):
            logits, mutated = model.apply({**variables, "cache": state}, tokens,
                                          decode=True, mutable=["cache"])
            return logits, mutated["cache"]
        state = model.init_cache(1)
    else:
        def apply(state, tokens):
            return model.apply(variables, tokens, carry=state, return_carry=True)
        state = model.initialize_carry(1)
    logits, state = apply(state, prompt[None])

    def step(carried, step_key):
        state, logits = carried
        token = pick_token(logits, step_key, temperature=temperature, top_k=top_k,
                           top_p=top_p)
        logits, state = apply(state, token[None, None])
        return (state, logits[0, -1]), token

    _, tokens = lax.scan(step, (state, logits[0, -1]), jax.random.split(key, length))
    return tokens


def time_positions(model, variables, positions: list[int], batch: int, *,
                   steps: int, repeats: int) -> list[dict]:
    """Milliseconds per new token at each position: decoding against a cache
    filled to it, and a forward pass over the whole prefix (no cache)."""
    vocab = model.vocab_size

    @jax.jit
    def cached(variables, cache, token):
        logits, mutated = model.apply({**variables, "cache": cache}, token,
                                      decode=True, mutable=["cache"])
        return logits[:, -1], mutated["cache"]

    @jax.jit
    def uncached(variables, tokens):
        return model.apply(variables, tokens)[:, -1]

    fill = jax.jit(functools.partial(model.apply, decode=True, mutable=["cache"]))
    rows = []
    for p in positions:
        tokens = jax.random.randint(jax.random.key(p), (batch, p + 1), 0, vocab)
        _, mutated = fill({**variables, "cache": model.init_cache(batch)},
                          tokens[:, :p])
        cache, token = mutated["cache"], tokens[:, p:]
        jax.block_until_ready(cached(variables, cache, token))
        with_cache = timing.median_time(
            lambda: cached(variables, cache, token), steps, repeats)
        jax.block_until_ready(uncached(variables, tokens))
        without = timing.median_time(
            lambda: uncached(variables, tokens), steps, repeats)
        rows.append({"position": p, "batch": batch, "cached_ms": 1e3 * with_cache,
                     "uncached_ms": 1e3 * without})
    return rows


def sample(config: ml_collections.ConfigDict, workdir: str,
           step: int | None = None) -> str:
    """Restores `workdir`'s checkpoint and returns the prompt and its continuation.

    Raises:
      UserError: not a text model, no checkpoint, or prompt characters the
        model does not know.
    """
    objective = (config.objective
                 or input_pipeline.get_dataset(config.dataset).default_objective)
    if "sample" not in config or objective != "language_model":
        raise errors.UserError(
            "--mode=sample needs a language-model config with a `sample` section "
            "(e.g. configs/shakespeare_rnn.py).")
    options = config.sample
    if not options.prompt:
        raise errors.UserError("config.sample.prompt is empty; give a few "
                               "characters to continue, e.g. 'ROMEO:'.")
    top_p = options.get("top_p", 1.0)
    if (options.temperature < 0 or options.top_k < 0 or options.length < 1
            or not 0 < top_p <= 1):
        raise errors.UserError("config.sample needs temperature >= 0, top_k >= 0, "
                               "0 < top_p <= 1 and length >= 1.")
    model, variables, step, vocab, mesh, trace = _restore(config, workdir, step)
    if options.top_k > len(vocab):
        raise errors.UserError(
            f"config.sample.top_k={options.top_k} but the model knows only "
            f"{len(vocab)} characters; use 0 (all) to {len(vocab)}.")
    try:
        prompt = input_pipeline.encode(options.prompt, vocab)
    except errors.UserError as e:
        raise errors.UserError(f"config.sample.prompt={options.prompt!r}: {e} Use "
                               "only those characters.") from None
    context = getattr(model, "context", None)
    if context is not None and len(prompt) + options.length > context:
        raise errors.UserError(
            f"The prompt ({len(prompt)} characters) and config.sample.length="
            f"{options.length} exceed the model's context of {context}; shorten "
            "them.")
    decode = jax.jit(trace(functools.partial(
        generate, model, length=options.length, temperature=options.temperature,
        top_k=options.top_k, top_p=top_p)))
    with jax.set_mesh(mesh):
        tokens = decode(variables, jnp.asarray(prompt), jax.random.key(options.seed))
    text = options.prompt + "".join(vocab[i] for i in jax.device_get(tokens))
    logging.info("Sampled %d characters from the step-%d checkpoint.",
                 options.length, step)
    return text


def _restore(config: ml_collections.ConfigDict, workdir: str, step: int | None):
    """The checkpoint's module, variables, step and vocabulary, and the mesh
    and tracing to decode with: a run whose scheme splits the parameters
    samples with them split the same way and its activations laid out by
    the same rules (`Scheme.trace`); any other on one device."""
    restored = assembly.restore_variables(config, workdir, step, layout=True)
    mesh = jax.tree.leaves(restored.variables)[0].sharding.mesh
    trace = assembly.create_scheme(config).trace if mesh.size > 1 else (lambda f: f)
    return (restored.model, restored.variables, restored.step,
            restored.info["vocab"], mesh, trace)
