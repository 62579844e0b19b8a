"""On-device, keyed augmentation (images; text windows) and test-time views.

Training augmentation runs inside the jitted step, after the dataset's
preprocessing. Every example gets its own key, derived from the run's
augmentation key, the step and the example's number in the split, so an
augmented run is a function of (seed, step) and resumes bitwise. Alternating
flip (airbench) flips, from the second epoch on, exactly the images that were
not flipped the epoch before: its bit depends on (seed, example, epoch).

Config (`config.augment`, image datasets): `flip` ("none", "random",
"alternating"), `translate` (pixels of reflect padding, then a random crop
back to size; 0: off), `cutout` (side of a zeroed square; 0: off),
`eval_views` (a test-time augmentation in `EVAL_VIEWS`: the weighted mean of
its views' logits is scored) and `final_eval_views` (the same for the last
evaluation of a run; "": as `eval_views`), so that a costly one need not run
after every epoch.
"""
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from research import errors
from research.core import config_lib

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
    for field in ("eval_views", "final_eval_views"):
        name = options[field]
        if name not in EVAL_VIEWS and (name or field == "eval_views"):
            raise errors.UserError(f"config.augment.{field}={name!r}; choose from "
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


def crop_windows(batch: Batch, key: jax.Array, step: jax.Array, epoch: jax.Array,
                 *, length: int) -> Batch:
    """Cuts `length` tokens at a random start out of each row of
    `batch["tokens"]` [batch, length + jitter] (text rows are stored with
    `jitter` characters more than a window): every epoch sees the text cut
    at other places. Keyed by (run, step, example) like the images."""
    del epoch
    step_root = jax.random.fold_in(jax.random.split(key)[0], step)

    def one(tokens, index):
        start = jax.random.randint(jax.random.fold_in(step_root, index), (), 0,
                                   tokens.shape[0] - length + 1)
        return jax.lax.dynamic_slice(tokens, (start,), (length,))

    return {**batch, "tokens": jax.vmap(one)(batch["tokens"], batch["index"])}


def _shift(images: jax.Array, dy: int, dx: int) -> jax.Array:
    """Images [batch, H, W, C] translated by one pixel (reflect padding):
    the crop at (1 + dy, 1 + dx) of the 1-pixel padded image."""
    _, h, w, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    return padded[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]


def _mirror(images: jax.Array) -> jax.Array:
    return images[:, :, ::-1]


View = tuple[Callable[[jax.Array], jax.Array], float]
# Test-time augmentations: name -> (view of an image batch, weight) pairs;
# evaluation scores the weighted mean of the views' logits.
EVAL_VIEWS: dict[str, tuple[View, ...]] = {
    "identity": ((lambda images: images, 1.0),),
    "flip": ((lambda images: images, 0.5), (_mirror, 0.5)),
    # airbench's level 2: the mirror average (1/2), and its average over the
    # image shifted up-left and down-right by a pixel (1/4 each).
    "flip_translate": (
        (lambda images: images, 0.25), (_mirror, 0.25),
        (lambda images: _shift(images, -1, -1), 0.125),
        (lambda images: _mirror(_shift(images, -1, -1)), 0.125),
        (lambda images: _shift(images, 1, 1), 0.125),
        (lambda images: _mirror(_shift(images, 1, 1)), 0.125)),
}


def views(options: ml_collections.ConfigDict | None, final: bool = False
          ) -> tuple[View, ...]:
    """The views of `config.augment`'s test-time augmentation (identity
    alone without the section); `final`: of the run's last evaluation."""
    if options is None:
        return EVAL_VIEWS["identity"]
    name = options.final_eval_views if final and options.final_eval_views else (
        options.eval_views)
    return EVAL_VIEWS[name]


# Image augmentation, on device and keyed by (seed, step, example); only image
# configs have the section (`config_lib.base_config("augment")`).
SECTION = config_lib.Section("augment", {"augment": {
    "flip": "none",               # "none", "random" or "alternating"
    "translate": 0,               # pixels of reflect padding + random crop
    "cutout": 0,                  # side of a zeroed square; 0: off
    "eval_views": "identity",     # test-time augmentation: "identity", "flip",
    #                               "flip_translate" (EVAL_VIEWS)
    "final_eval_views": "",       # for the run's last evaluation; "": the same
}}, check=lambda config: check(config.augment),
    free=("augment.eval_views", "augment.final_eval_views"), optional=True)
