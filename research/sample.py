"""`--mode=sample`: continue a prompt with a trained character model."""
import functools

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn
from jax import lax

from research import errors
from research import experiment
from research import input_pipeline
from research import models
from research import parallel


def pick_token(logits: jax.Array, key: jax.Array, *, temperature: float,
               top_k: int) -> jax.Array:
    """Samples one id from logits [vocab]; temperature 0 is greedy."""
    if temperature == 0:
        return jnp.argmax(logits).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = lax.top_k(logits, top_k)[0][-1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits).astype(jnp.int32)


def generate(model: nn.Module, variables, prompt: jax.Array, key: jax.Array, *,
             length: int, temperature: float, top_k: int) -> jax.Array:
    """Reads `prompt` [time] and returns `length` new ids, one step at a time."""
    carry = model.initialize_carry(1)
    logits, carry = model.apply(variables, prompt[None], carry=carry,
                                return_carry=True)

    def step(state, step_key):
        carry, logits = state
        token = pick_token(logits, step_key, temperature=temperature, top_k=top_k)
        logits, carry = model.apply(variables, token[None, None], carry=carry,
                                    return_carry=True)
        return (carry, logits[0, -1]), token

    _, tokens = lax.scan(step, (carry, logits[0, -1]), jax.random.split(key, length))
    return tokens


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
    if options.temperature < 0 or options.top_k < 0 or options.length < 1:
        raise errors.UserError("config.sample needs temperature >= 0, top_k >= 0 "
                               "and length >= 1.")
    model = models.create_model(config.model, **config.model_kwargs)
    variables, step, info = experiment.restore_variables(
        config, workdir, step, parallel.create_mesh(1))
    vocab = info["vocab"]
    if options.top_k > len(vocab):
        raise errors.UserError(
            f"config.sample.top_k={options.top_k} but the model knows only "
            f"{len(vocab)} characters; use 0 (all) to {len(vocab)}.")
    try:
        prompt = input_pipeline.encode(options.prompt, vocab)
    except errors.UserError as e:
        raise errors.UserError(f"config.sample.prompt={options.prompt!r}: {e} Use "
                               "only those characters.") from None
    tokens = jax.jit(functools.partial(
        generate, model, length=options.length, temperature=options.temperature,
        top_k=options.top_k))(variables, jnp.asarray(prompt),
                              jax.random.key(options.seed))
    text = options.prompt + "".join(vocab[i] for i in jax.device_get(tokens))
    logging.info("Sampled %d characters from the step-%d checkpoint.",
                 options.length, step)
    return text
