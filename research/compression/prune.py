"""Magnitude pruning: masks, sparsity schedules and an optax wrapper.

A mask is a pytree of bool shaped like the params: True keeps a weight, False
prunes it. Only *prunable* leaves are ever pruned (by default those with two
or more axes: conv and dense kernels, embeddings); the others (biases,
BatchNorm scales, any 1-D parameter) get all-True masks.

`prune(inner, ...)` wraps any optax optimizer. Its state holds the masks, a
step counter and the inner optimizer's state, so the masks are checkpointed,
restored and sharded with the rest of the `TrainState`.
"""
import functools
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research import errors
from research.core import config_lib

PyTree = Any
PrunableFn = Callable[[str, Any], bool]
SparsityFn = Callable[[jax.Array], jax.Array]

SCOPES = ("layer", "global")


def default_prunable(path: str, leaf: Any) -> bool:
    """Prunes leaves with two or more axes; keeps biases, BatchNorm, 1-D params.

    Args:
      path: the leaf's path, keys joined by "/" (e.g. "Conv_0/kernel").
      leaf: the array (only its shape is read, so abstract values work too).
    """
    del path
    return len(np.shape(leaf)) >= 2


def path_str(path: tuple[Any, ...]) -> str:
    """A key path as "Conv_0/kernel" (the names `sparsity` reports)."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise errors.UserError(
            f"Unknown pruning scope {scope!r}; choose from {list(SCOPES)}.")


def _check_sparsity(sparsity: Any) -> None:
    """Range check for concrete sparsities; traced ones are the schedule's job."""
    if isinstance(sparsity, jax.core.Tracer):
        return
    value = float(np.asarray(sparsity))
    if not 0.0 <= value < 1.0:
        raise errors.UserError(f"Sparsity must be in [0, 1); got {value}.")


def _num_pruned(sparsity: Any, n: int) -> jax.Array:
    """round(sparsity * n) as int32, computed in float32, halves to even.

    Computed the same way for Python floats and traced schedule values, so a
    mask does not depend on whether the sparsity came through jit.
    """
    return jnp.round(jnp.asarray(sparsity, jnp.float32) * n).astype(jnp.int32)


def _prune_lowest(scores: jax.Array, k: jax.Array) -> jax.Array:
    """Flat bool mask: False for the k lowest scores, ties to the lower index.

    A stable argsort orders by (score, index); ranking by it instead of
    `top_k` lets k be a traced value.
    """
    order = jnp.argsort(scores, stable=True)
    rank = jnp.zeros(scores.shape, jnp.int32).at[order].set(
        jnp.arange(scores.size, dtype=jnp.int32))
    return rank >= k


def magnitude_masks(params: PyTree, sparsity: Any, *, scope: str = "layer",
                    prunable: PrunableFn = default_prunable,
                    masks: PyTree | None = None) -> PyTree:
    """Masks that prune the smallest-magnitude prunable weights.

    Exactly round(sparsity * n) weights are pruned (round half to even, in
    float32), where n is the size of each prunable leaf (`scope="layer"`) or
    of all prunable leaves together (`scope="global"`). Weights are ranked by
    |w|; ties go to the lower index, i.e. the weight earlier in row-major
    order within a leaf and, for "global", in an earlier leaf in
    `jax.tree.leaves` order (sorted dict keys). Jit-compatible: `sparsity`
    may be a traced scalar.

    Args:
      params: the parameter pytree.
      sparsity: fraction of weights to prune, in [0, 1).
      scope: "layer" or "global".
      prunable: `prunable(path, leaf)` says whether a leaf may be pruned.
      masks: optional previous masks. Weights they prune rank below every
        kept weight, so they stay pruned while the sparsity does not fall
        (even against kept weights that happen to be exactly zero).

    Returns:
      A pytree of bool arrays like `params`; True = kept.

    Raises:
      UserError: unknown scope, or a concrete sparsity outside [0, 1).
    """
    _check_scope(scope)
    _check_sparsity(sparsity)
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [leaf for _, leaf in leaves_with_paths]
    flags = [bool(prunable(path_str(p), x)) for p, x in leaves_with_paths]
    old = treedef.flatten_up_to(masks) if masks is not None else [None] * len(leaves)

    def scores(leaf, old_mask):
        s = jnp.abs(leaf).astype(jnp.float32).ravel()
        if old_mask is None:
            return s
        # |w| >= 0 > -1: previously pruned weights come first.
        return jnp.where(old_mask.ravel(), s, -1.0)

    out = [jnp.ones(jnp.shape(x), jnp.bool_) for x in leaves]
    idx = [i for i, f in enumerate(flags) if f]
    if scope == "layer":
        for i in idx:
            s = scores(leaves[i], old[i])
            keep = _prune_lowest(s, _num_pruned(sparsity, s.size))
            out[i] = keep.reshape(jnp.shape(leaves[i]))
    elif idx:
        s = jnp.concatenate([scores(leaves[i], old[i]) for i in idx])
        keep = _prune_lowest(s, _num_pruned(sparsity, s.size))
        splits = np.cumsum([np.size(leaves[i]) for i in idx])[:-1]
        for i, part in zip(idx, jnp.split(keep, splits)):
            out[i] = part.reshape(jnp.shape(leaves[i]))
    return treedef.unflatten(out)


def cubic_sparsity(step: Any, *, initial: float, final: float,
                   begin_step: int, end_step: int) -> jax.Array:
    """Zhu & Gupta (2017) gradual pruning schedule.

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0))**3 for t in
    [t0, t1] = [begin_step, end_step]; s_i before t0, s_f after t1.

    Args:
      step: the step, a Python int or a (traced) jnp scalar.
      initial: s_i, the sparsity at begin_step.
      final: s_f, the sparsity from end_step on.
      begin_step: t0.
      end_step: t1 > t0 (t0 + n * delta_t in the paper's notation).

    Returns:
      The sparsity, a float32 scalar.
    """
    if end_step <= begin_step:
        raise errors.UserError(
            f"cubic_sparsity needs end_step > begin_step; got {begin_step}, "
            f"{end_step}.")
    for value in (initial, final):
        _check_sparsity(value)
    t = jnp.asarray(step, jnp.float32)
    progress = jnp.clip((t - begin_step) / (end_step - begin_step), 0.0, 1.0)
    return jnp.float32(final) + jnp.float32(initial - final) * (1 - progress) ** 3


def one_shot_sparsity(step: Any, *, final: float, begin_step: int) -> jax.Array:
    """0 before `begin_step`, `final` from it on (a float32 scalar)."""
    _check_sparsity(final)
    return jnp.where(jnp.asarray(step) >= begin_step, jnp.float32(final),
                     jnp.float32(0.0))


class PruneState(NamedTuple):
    """The wrapped optimizer's state."""
    count: jax.Array           # int32 []: updates done; the step of the next one.
    masks: PyTree              # bool, like params; True = kept.
    inner_state: optax.OptState


def prune(inner: optax.GradientTransformation, sparsity_fn: SparsityFn, *,
          scope: str = "layer", update_every: int, begin_step: int = 0,
          prunable: PrunableFn = default_prunable
          ) -> optax.GradientTransformation:
    """Wraps an optimizer so that it trains a magnitude-pruned network.

    At step t (the number of earlier updates) the masks are recomputed when
    t >= begin_step and (t - begin_step) % update_every == 0, from the
    magnitudes of the current params at sparsity `sparsity_fn(t)`. Weights
    pruned before rank below all others, so a weight once pruned stays
    pruned while the schedule does not decrease (both schedules here are
    non-decreasing); at constant sparsity a recomputation is a no-op. Pick
    end_step - begin_step as a multiple of update_every to hit the final
    sparsity at end_step (otherwise it is reached at the next update).

    Every step, gradients of pruned weights are zeroed before `inner`, and
    their updates are replaced by -param: `optax.apply_updates` then computes
    p + (-p), which is exactly +0.0 for any finite p in IEEE arithmetic. So
    pruned weights are exact zeros after each step, whatever the inner state
    holds (momentum or Adam moments from before pruning cannot revive them).
    This needs `prune` outermost: nothing may rescale its updates afterwards.

    Args:
      inner: the optimizer to wrap (its state is kept inside ours).
      sparsity_fn: step -> sparsity in [0, 1), jnp-traceable (e.g. a
        `functools.partial` of `cubic_sparsity` or `one_shot_sparsity`).
      scope: "layer" or "global" (see `magnitude_masks`).
      update_every: steps between mask updates, >= 1.
      begin_step: the first mask update.
      prunable: which leaves may be pruned (see `default_prunable`).

    Returns:
      A GradientTransformation whose state is a `PruneState`. Its `update`
      needs `params`. Deterministic and jit-compatible.
    """
    _check_scope(scope)
    if update_every < 1:
        raise errors.UserError(f"update_every must be >= 1; got {update_every}.")

    def init_fn(params):
        masks = jax.tree.map(lambda p: jnp.ones(jnp.shape(p), jnp.bool_), params)
        return PruneState(count=jnp.zeros([], jnp.int32), masks=masks,
                          inner_state=inner.init(params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("prune needs the params: tx.update(grads, state, params).")
        step = state.count
        due = (step >= begin_step) & ((step - begin_step) % update_every == 0)
        masks = jax.lax.cond(
            due,
            lambda: magnitude_masks(params, sparsity_fn(step), scope=scope,
                                    prunable=prunable, masks=state.masks),
            lambda: state.masks)
        updates = jax.tree.map(lambda g, m: jnp.where(m, g, jnp.zeros_like(g)),
                               updates, masks)
        updates, inner_state = inner.update(updates, state.inner_state, params)
        # jnp.where promotes to the wider of the two dtypes, so -p is never
        # rounded to a narrower update dtype (which would leave p + u != 0).
        updates = jax.tree.map(lambda u, m, p: jnp.where(m, u, -p),
                               updates, masks, params)
        return updates, PruneState(count=optax.safe_increment(step), masks=masks,
                                   inner_state=inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


def sparsity(tree: PyTree, *, prunable: PrunableFn = default_prunable
             ) -> dict[str, float]:
    """Fraction pruned per prunable leaf and in total (host-side, for logging).

    Works on params (zeros count as pruned) and on masks (False = pruned).

    Args:
      tree: params or masks.
      prunable: which leaves to report (see `default_prunable`).

    Returns:
      {"Conv_0/kernel": 0.5, ..., "total": ...}; "total" is over all prunable
      weights (0.0 if there are none).
    """
    result, zeros, size = {}, 0, 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = path_str(path)
        if not prunable(name, leaf):
            continue
        leaf = np.asarray(leaf)
        leaf_zeros = leaf.size - np.count_nonzero(leaf)
        result[name] = float(leaf_zeros / max(leaf.size, 1))
        zeros += leaf_zeros
        size += leaf.size
    result["total"] = float(zeros / max(size, 1))
    return result


def count_nonzero(params: PyTree, *, prunable: PrunableFn | None = None) -> int:
    """Non-zero entries over all leaves, or over the prunable ones if given."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if prunable is None or prunable(path_str(path), leaf):
            total += int(np.count_nonzero(np.asarray(leaf)))
    return total


SCHEDULES = ("cubic", "one_shot")


def check_options(options: Any) -> None:
    """Checks `config.prune` before any compute; raises UserError."""
    if not 0.0 <= options.sparsity < 1.0:
        raise errors.UserError(
            f"config.prune.sparsity must be in [0, 1), got {options.sparsity}.")
    if options.schedule not in SCHEDULES:
        raise errors.UserError(f"config.prune.schedule={options.schedule!r}; "
                               f"choose from {list(SCHEDULES)}.")
    _check_scope(options.scope)
    if options.update_every < 1 or options.begin_step < 0:
        raise errors.UserError("config.prune.update_every must be >= 1 and "
                               "begin_step >= 0.")
    try:
        re.compile(options.exclude)
    except re.error as e:
        raise errors.UserError(f"config.prune.exclude={options.exclude!r} is not "
                               f"a regular expression: {e}.") from None


def _final_update(options: Any, total_steps: int) -> int:
    """The step of the mask update that reaches the final sparsity.

    Mask updates happen every `update_every` steps from `begin_step`. An
    explicit `end_step` is rounded up to the next update; the default (3/4
    of the run) is rounded up, or down where up would fall past the run.
    """
    begin, every = options.begin_step, options.update_every
    if options.schedule == "one_shot":
        end = begin
    else:
        end = options.end_step or max(begin + 1, (3 * total_steps) // 4)
        up = begin + -(-(end - begin) // every) * every
        down = begin + (end - begin) // every * every
        auto = not options.end_step and up >= total_steps and down > begin
        end = down if auto else up
    if end >= total_steps:
        raise errors.UserError(
            f"config.prune: the final sparsity would be reached at step {end}, "
            f"but the run has {total_steps} steps (mask updates every "
            f"{every} from step {begin}); lower prune.update_every, "
            "prune.begin_step or prune.end_step, or train longer.")
    return end


def from_config(inner: optax.GradientTransformation, options: Any,
                total_steps: int) -> optax.GradientTransformation:
    """`prune(inner, ...)` as `config.prune` describes it.

    `options.end_step` 0 reaches the final sparsity at about 3/4 of the run
    (the last quarter fine-tunes the pruned network), at a mask update, so
    the final sparsity is reached exactly. Leaves whose path matches
    `options.exclude` (a regular expression) are never pruned.
    """
    check_options(options)
    begin = options.begin_step
    end = _final_update(options, total_steps)
    if options.schedule == "one_shot":
        schedule = functools.partial(one_shot_sparsity, final=options.sparsity,
                                     begin_step=begin)
    else:
        schedule = functools.partial(cubic_sparsity, initial=0.0,
                                     final=options.sparsity, begin_step=begin,
                                     end_step=end)
    exclude = options.exclude

    def prunable(path: str, leaf: Any) -> bool:
        return default_prunable(path, leaf) and not (
            exclude and re.search(exclude, path))

    return prune(inner, schedule, scope=options.scope,
                 update_every=options.update_every, begin_step=begin,
                 prunable=prunable)


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """`params` with the pruned entries set to exact zeros."""
    return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)),
                        params, masks)


def masks_of(opt_state: Any) -> PyTree | None:
    """The masks kept in an optimizer state (None: it does not prune)."""
    found = [s for s in jax.tree.leaves(
        opt_state, is_leaf=lambda x: isinstance(x, PruneState))
        if isinstance(s, PruneState)]
    return found[0].masks if found else None


def metrics(opt_state: Any) -> dict[str, float]:
    """{"prune/sparsity": total, "prune/sparsity/<layer>": ...} of the masks in
    an optimizer state; {} when it does not prune."""
    masks = masks_of(opt_state)
    if masks is None:
        return {}
    report = sparsity(jax.device_get(masks))
    total = report.pop("total")
    return {"prune/sparsity": total,
            **{f"prune/sparsity/{k}": v for k, v in report.items()}}


def mask_after_update(state: Any) -> Any:
    """A train-state update hook: lookahead and EMA blend in weights from
    before pruning, so mask them and the weights they pull back (zeros stay
    zeros). A state without extras is left as the optimizer made it."""
    masks = masks_of(state.opt_state)
    if masks is None or not state.extra_fns:
        return state
    return state.replace(
        params=apply_masks(state.params, masks),
        extras={k: {**v, "params": apply_masks(v["params"], masks)}
                if isinstance(v, dict) and "params" in v else v
                for k, v in state.extras.items()})


def state_metrics(state: Any) -> dict[str, float]:
    """A train-state metrics hook: `metrics` of the state's optimizer."""
    return metrics(state.opt_state)


def hooks(options: Any) -> dict[str, tuple[Callable[..., Any], ...]]:
    """What `config.prune` plugs into the train state (`state.Hooks`
    fields): the optax wrapper, outermost (it sets the pruned weights'
    updates), the re-masking after the extras, and the sparsity metrics."""
    if not options.sparsity:
        return {}
    return {"optimizer": (functools.partial(_wrap, options=options),),
            "after_update": (mask_after_update,), "metrics": (state_metrics,)}


def _wrap(tx: optax.GradientTransformation, total_steps: int, *, options: Any
          ) -> optax.GradientTransformation:
    return from_config(tx, options, total_steps)


def _run_length(config: Any) -> list[str]:
    on = config.prune.sparsity and not config.prune.end_step
    return ["pruning ramp"] if on else []


# Magnitude pruning wrapped around the optimizer (`hooks`); off by default.
SECTION = config_lib.Section("prune", {"prune": {
    "sparsity": 0.0,              # final fraction of kernel weights pruned; 0: off
    "schedule": "cubic",          # "cubic" (gradual, Zhu & Gupta) or "one_shot"
    "scope": "layer",             # rank magnitudes per "layer" or "global"ly
    "begin_step": 0,              # first mask update
    "end_step": 0,                # cubic: final sparsity reached; 0: 3/4 of the run
    "update_every": 100,          # steps between mask updates
    "exclude": "",                # regex of parameter paths never pruned
}}, check=lambda config: check_options(config.prune), run_length=_run_length)
