"""On-device, keyed image augmentation and test-time views.

Training augmentation runs inside the jitted step, after the dataset's
preprocessing. Every example gets its own key, derived from the run's
augmentation key, the step and the example's number in the split, so an
augmented run is a function of (seed, step) and resumes bitwise. Alternating
flip (airbench) flips, from the second epoch on, exactly the images that were
not flipped the epoch before: its bit depends on (seed, example, epoch).

Config (`config.augment`, image datasets): `flip` ("none", "random",
"alternating"), `translate` (pixels of reflect padding, then a random crop
back to size; 0: off), `cutout` (side of a zeroed square; 0: off),
`eval_views` (names in `EVAL_VIEWS`: the logits of these views are averaged).
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from research import errors

Batch = dict[str, jax.Array]
FLIPS = ("none", "random", "alternating")


def _flip(image: jax.Array, flip: jax.Array) -> jax.Array:
    """Mirrors [H, W, C] left-right where `flip` (a scalar bool) is set."""
    return jnp.where(flip, image[:, ::-1], image)


def _translate(image: jax.Array, key: jax.Array, pad: int) -> jax.Array:
    """Reflect-pads [H, W, C] by `pad` and crops a random H x W window."""
    h, w, _ = image.shape
    padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    dy, dx = jax.random.randint(key, (2,), 0, 2 * pad + 1)
    return jax.lax.dynamic_slice(padded, (dy, dx, 0), (h, w, image.shape[2]))


def _cutout(image: jax.Array, key: jax.Array, size: int) -> jax.Array:
    """Zeroes a size x size square at a random centre (clipped at the edges)."""
    h, w, _ = image.shape
    cy, cx = jax.random.randint(key, (2,), 0, jnp.array([h, w]))
    ys, xs = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    inside = ((ys >= cy - size // 2) & (ys < cy - size // 2 + size)
              & (xs >= cx - size // 2) & (xs < cx - size // 2 + size))
    return jnp.where(inside[..., None], jnp.zeros((), image.dtype), image)


def check(options: ml_collections.ConfigDict) -> None:
    """Raises UserError for an unknown flip or view, or negative sizes."""
    if options.flip not in FLIPS:
        raise errors.UserError(f"config.augment.flip={options.flip!r}; choose from "
                               f"{FLIPS}.")
    if options.translate < 0 or options.cutout < 0:
        raise errors.UserError("config.augment.translate and cutout must be >= 0.")
    for view in options.eval_views:
        if view not in EVAL_VIEWS:
            raise errors.UserError(
                f"config.augment.eval_views has {view!r}; choose from "
                f"{sorted(EVAL_VIEWS)}.")


def is_identity(options: ml_collections.ConfigDict | None) -> bool:
    return options is None or (options.flip == "none" and not options.translate
                               and not options.cutout)


def augment_batch(batch: Batch, key: jax.Array, step: jax.Array, epoch: jax.Array,
                  *, options: ml_collections.ConfigDict) -> Batch:
    """Augments `batch["image"]` [batch, H, W, C]; call inside jit.

    Args:
      batch: needs `image` (float) and `index`, the examples' numbers in the
        split (int32 [batch]).
      key: the run's augmentation key.
      step: the step being taken (selects the keys).
      epoch: its epoch (alternating flip).
      options: `config.augment`.
    """
    step_root, run_root = jax.random.split(key)

    def one(image, index):
        example_key = jax.random.fold_in(jax.random.fold_in(step_root, step), index)
        flip_key, crop_key, cut_key = jax.random.split(example_key, 3)
        if options.flip == "random":
            image = _flip(image, jax.random.bernoulli(flip_key))
        elif options.flip == "alternating":
            # One random bit per example for the whole run, toggled each epoch.
            first = jax.random.bernoulli(jax.random.fold_in(run_root, index))
            image = _flip(image, first ^ (epoch % 2 == 1))
        if options.translate:
            image = _translate(image, crop_key, options.translate)
        if options.cutout:
            image = _cutout(image, cut_key, options.cutout)
        return image

    return {**batch, "image": jax.vmap(one)(batch["image"], batch["index"])}


# Test-time views: name -> function of an image batch [batch, H, W, C].
EVAL_VIEWS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "identity": lambda images: images,
    "flip": lambda images: images[:, :, ::-1],
    # One-pixel shifts of the flipped and unflipped images (airbench's
    # multi-view evaluation uses translations beside the flip).
    "shift": lambda images: jnp.pad(images, ((0, 0), (1, 0), (1, 0), (0, 0)),
                                    mode="reflect")[:, :-1, :-1],
    "flip_shift": lambda images: jnp.pad(
        images[:, :, ::-1], ((0, 0), (1, 0), (1, 0), (0, 0)),
        mode="reflect")[:, :-1, :-1],
}


def views(options: ml_collections.ConfigDict | None) -> tuple[Any, ...]:
    """The eval views' functions, identity alone without `config.augment`."""
    names = options.eval_views if options is not None else ("identity",)
    return tuple(EVAL_VIEWS[n] for n in names)
