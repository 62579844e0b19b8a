"""The dtype names a model's config may give ("float32", "bfloat16")."""
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype(name: str, field: str = "dtype") -> jnp.dtype:
    """The dtype called `name`; a ValueError naming `field` for any other."""
    if name not in DTYPES:
        raise ValueError(f"{field}={name!r}; choose from {sorted(DTYPES)}.")
    return jnp.dtype(DTYPES[name])
