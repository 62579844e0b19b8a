"""Optimizers, learning-rate schedules and parameter groups, from the config.

`create_optimizer(config, total_steps, steps_per_epoch)` builds: the named
optimizer (`OPTIMIZERS`) on the named schedule (`LR_SCHEDULES`), with weight
decay, per-group learning-rate multipliers (`config.param_groups`: a regex
on parameter paths such as "Conv_0/kernel"; multiplier 0 freezes a group,
`train_epochs` freezes it after that many epochs), gradient clipping, and
what features wrap around all of it (e.g. magnitude pruning).

Weight decay follows airbench's parametrization: `weight_decay` is the decay
per step at the peak learning rate, whatever a group's multiplier. It enters
the gradient as `weight_decay / (learning_rate * multiplier) * w`, so it goes
through momentum as in PyTorch's SGD and follows the schedule.

`config.muon.pattern` hands the parameters it matches (e.g. the convolution
filters, as airbench94_muon does) to Muon instead: PyTorch-style Nesterov
momentum whose update is orthogonalized by Newton-Schulz iterations (as
optax.contrib's muon; a kernel [..., in, out] is the matrix [prod(...) * in,
out]), at `muon.learning_rate` on the run's schedule, without weight decay;
with `normalize_weights` each such kernel is first rescaled to norm
sqrt(out), as airbench does (a decay would be undone by it).
"""
import math
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from research import errors
from research.core import config_lib

PyTree = Any
# (tx, total_steps) -> tx: a feature's optimizer wrapper (e.g. pruning).
Wrapper = Callable[[optax.GradientTransformation, int], optax.GradientTransformation]


def warmup_steps(config: ml_collections.ConfigDict, total_steps: int) -> int:
    """`warmup_fraction` of the run if set, else `warmup_steps`."""
    if config.warmup_fraction:
        return int(round(config.warmup_fraction * total_steps))
    return config.warmup_steps


def create_learning_rate_fn(config: ml_collections.ConfigDict, total_steps: int
                            ) -> optax.Schedule:
    """Linear warmup from `warmup_start_factor * learning_rate`, then
    constant, cosine or linear decay to `end_learning_rate` at the last step."""
    if config.lr_schedule not in LR_SCHEDULES:
        raise errors.UserError(f"Unknown lr_schedule {config.lr_schedule!r}; choose "
                               f"from {sorted(LR_SCHEDULES)}.")
    return LR_SCHEDULES[config.lr_schedule](config, total_steps)


def _warmup(config, total_steps, then: optax.Schedule) -> optax.Schedule:
    steps = warmup_steps(config, total_steps)
    if not steps:
        return then
    start = config.warmup_start_factor * config.learning_rate
    return optax.join_schedules(
        [optax.linear_schedule(start, config.learning_rate, steps), then], [steps])


def _constant(config, total_steps):
    return _warmup(config, total_steps, optax.constant_schedule(config.learning_rate))


def _cosine(config, total_steps):
    decay = max(total_steps - warmup_steps(config, total_steps), 1)
    return _warmup(config, total_steps, optax.cosine_decay_schedule(
        config.learning_rate, decay, alpha=config.end_learning_rate
        / config.learning_rate))


def _linear(config, total_steps):
    decay = max(total_steps - warmup_steps(config, total_steps), 1)
    return _warmup(config, total_steps, optax.linear_schedule(
        config.learning_rate, config.end_learning_rate, decay))


LR_SCHEDULES = {"constant": _constant, "cosine": _cosine, "linear": _linear}

# name -> fn(config, learning-rate schedule) -> the optax transformation.
OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": lambda config, lr: optax.sgd(lr, momentum=config.momentum or None,
                                        nesterov=config.nesterov),
    "adam": lambda config, lr: optax.adam(lr, b2=config.adam_b2),
}


def _group_of(path: tuple[Any, ...], config: ml_collections.ConfigDict) -> str:
    """Which transform trains the parameter at `path` (e.g. "Conv_0/kernel"):
    "muon", a param_groups name or "default"."""
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if config.muon.pattern and re.fullmatch(config.muon.pattern, name):
        return "muon"
    for group, options in config.param_groups.items():
        if re.fullmatch(options.pattern, name):
            return group
    return "default"


def _group_transform(config: ml_collections.ConfigDict, schedule: optax.Schedule,
                     scale: float, train_steps: int) -> optax.GradientTransformation:
    """The optimizer of one group: multiplier `scale`, trained for
    `train_steps` steps (0: all)."""
    if scale == 0.0:
        return optax.set_to_zero()

    def group_schedule(step):
        lr = schedule(step) * scale
        return lr if not train_steps else jnp.where(step < train_steps, lr, 0.0)

    tx = OPTIMIZERS[config.optimizer](config, group_schedule)
    if config.weight_decay:
        tx = optax.chain(optax.add_decayed_weights(
            config.weight_decay / (config.learning_rate * scale)), tx)
    return tx


NS_COEFFS = (3.4445, -4.7750, 2.0315)  # airbench94_muon's, optax's default


def _newton_schulz(x: jax.Array, steps: int, eps: float = 1e-7) -> jax.Array:
    """An approximately orthogonal matrix with x's singular vectors (airbench's
    and optax's quintic iteration; its singular values land in ~[0.7, 1.2])."""
    a, b, c = NS_COEFFS
    wide = x.T if x.shape[0] > x.shape[1] else x   # iterate on the small Gram
    wide = wide / (jnp.linalg.norm(wide) + eps)
    for _ in range(steps):
        gram = wide @ wide.T
        wide = a * wide + (b * gram + c * gram @ gram) @ wide
    return wide.T if x.shape[0] > x.shape[1] else wide


def _orthogonalize(ns_steps: int) -> optax.GradientTransformation:
    """Each update orthogonalized: a kernel [..., in, out] as the matrix
    [prod(...) * in, out] (flax's layouts: Dense [in, out], Conv HWIO)."""
    def one(path, u):
        if u.ndim < 2:
            raise errors.UserError(
                f"config.muon.pattern matches {jax.tree_util.keystr(path)} of shape "
                f"{u.shape}; Muon trains matrices and kernels (2 or more axes): "
                "narrow the pattern (e.g. r'.*conv\\d/kernel').")
        return _newton_schulz(u.reshape(-1, u.shape[-1]), ns_steps).reshape(u.shape)
    return optax.stateless(
        lambda updates, params: jax.tree_util.tree_map_with_path(one, updates))


def _normalize_weights() -> optax.GradientTransformation:
    """Adds to the update what rescales each weight to norm sqrt(out) first
    (airbench94_muon: `p *= len(p) ** 0.5 / p.norm()`, out = len(p))."""
    return optax.stateless(lambda updates, params: jax.tree.map(
        lambda u, p: u + p * (jnp.sqrt(float(p.shape[-1])) / jnp.linalg.norm(p)
                              - 1.0), updates, params))


def _muon_transform(config: ml_collections.ConfigDict, schedule: optax.Schedule
                    ) -> optax.GradientTransformation:
    """airbench94_muon's Muon: PyTorch-style (Nesterov) momentum, then the
    orthogonalized step at the scheduled rate, after renormalizing."""
    options = config.muon
    scale = options.learning_rate / config.learning_rate
    tx = optax.chain(
        optax.trace(decay=options.momentum, nesterov=options.nesterov),
        _orthogonalize(options.ns_steps),
        optax.scale_by_learning_rate(lambda step: schedule(step) * scale))
    if options.normalize_weights:
        tx = optax.chain(tx, _normalize_weights())
    return tx


def create_optimizer(config: ml_collections.ConfigDict, total_steps: int,
                     steps_per_epoch: int = 0, wrappers: Sequence[Wrapper] = ()
                     ) -> optax.GradientTransformation:
    """The config's optimizer, schedule, groups and clipping, then each of
    `wrappers` around it, the last outermost (features such as pruning
    plug in here: `wrapper(tx, total_steps) -> tx`)."""
    if config.optimizer not in OPTIMIZERS:
        raise errors.UserError(f"Unknown optimizer {config.optimizer!r}; choose "
                               f"from {sorted(OPTIMIZERS)}.")
    schedule = create_learning_rate_fn(config, total_steps)
    groups = config.param_groups
    transforms = {"default": _group_transform(config, schedule, 1.0, 0)}
    for name, options in groups.items():
        transforms[name] = _group_transform(
            config, schedule, options.lr_scale,
            int(round(options.train_epochs * steps_per_epoch)))
    if config.muon.pattern:
        transforms["muon"] = _muon_transform(config, schedule)
    if len(transforms) > 1:
        tx = optax.multi_transform(transforms, lambda params: jax.tree_util.
                                   tree_map_with_path(lambda p, _: _group_of(
                                       p, config), params))
    else:
        tx = transforms["default"]
    if config.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    for wrap in wrappers:
        tx = wrap(tx, total_steps)
    return tx


def check(config: ml_collections.ConfigDict) -> None:
    """Checks the optimizer's fields before any compute; raises UserError."""
    for field, registry in (("optimizer", OPTIMIZERS), ("lr_schedule", LR_SCHEDULES)):
        if config[field] not in registry:
            raise errors.UserError(
                f"Unknown {field} {config[field]!r} (config.{field}); choose from "
                f"{sorted(registry)}.")
    if not (config.learning_rate > 0 and math.isfinite(config.learning_rate)):
        raise errors.UserError(
            f"config.learning_rate must be positive, got {config.learning_rate}.")
    if not 0 <= config.momentum < 1:
        raise errors.UserError(
            f"config.momentum must be in [0, 1), got {config.momentum}.")
    if config.warmup_steps < 0 or config.grad_clip_norm < 0:
        raise errors.UserError("config.warmup_steps and config.grad_clip_norm must "
                               "be >= 0 (0 turns them off).")
    if config.grad_accum_steps < 1:
        raise errors.UserError("config.grad_accum_steps must be a positive integer, "
                               f"got {config.grad_accum_steps}.")
    if config.weight_decay < 0 or config.warmup_fraction < 0 or (
            config.warmup_fraction >= 1):
        raise errors.UserError("config.weight_decay must be >= 0 and "
                               "config.warmup_fraction in [0, 1).")
    muon = config.muon
    if muon.pattern:
        try:
            re.compile(muon.pattern)
        except re.error as e:
            raise errors.UserError(f"config.muon.pattern: {e}") from None
        if not (muon.learning_rate > 0 and 0 <= muon.momentum < 1
                and muon.ns_steps >= 1):
            raise errors.UserError(
                "config.muon (pattern set) needs learning_rate > 0, momentum in "
                f"[0, 1) and ns_steps >= 1; got learning_rate={muon.learning_rate}, "
                f"momentum={muon.momentum}, ns_steps={muon.ns_steps} (airbench94_muon: "
                "0.24, 0.6, 3).")
    for name, options in config.param_groups.items():
        try:
            re.compile(options.pattern)
        except re.error as e:
            raise errors.UserError(f"config.param_groups.{name}.pattern: {e}"
                                   ) from None
        if options.lr_scale < 0 or options.train_epochs < 0:
            raise errors.UserError(f"config.param_groups.{name} needs lr_scale >= 0 "
                                   "and train_epochs >= 0 (0: the whole run).")


def check_schedule(config: ml_collections.ConfigDict, total_steps: int) -> None:
    """Checks the learning-rate schedule against the run's length."""
    if (warmup_steps(config, total_steps) >= total_steps
            and config.lr_schedule != "constant"):
        raise errors.UserError(
            f"config.warmup_steps={config.warmup_steps} is not below the run's "
            f"{total_steps} steps, so the {config.lr_schedule} decay never starts; "
            "lower warmup_steps or train longer.")


def _run_length(config: ml_collections.ConfigDict) -> list[str]:
    out = []
    if config.lr_schedule != "constant":
        out.append(f"{config.lr_schedule} learning rate")
    if config.get("warmup_fraction"):
        out.append("warmup (warmup_fraction)")
    return out


SECTION = config_lib.Section("optimizer", {
    "optimizer": "sgd",           # key of OPTIMIZERS
    "learning_rate": 0.001,       # peak, after any warmup
    "momentum": 0.9,              # SGD momentum; 0 for plain SGD
    "nesterov": False,            # Nesterov momentum (SGD)
    "adam_b2": 0.999,             # Adam's second-moment decay (0.99 or 0.95 for
    #                               short Transformer runs)
    "lr_schedule": "constant",    # key of LR_SCHEDULES: constant, cosine or linear
    #                               (decay to end_learning_rate)
    "warmup_steps": 0,            # linear warmup ...
    "warmup_fraction": 0.0,       # ... or over this fraction of the run (if > 0)
    "warmup_start_factor": 0.0,   # the warmup starts at this x learning_rate
    "end_learning_rate": 0.0,     # where "cosine" and "linear" end
    "weight_decay": 0.0,          # decay per step at the peak lr (module doc)
    # Per-group learning-rate multipliers: name -> {pattern (regex on paths like
    # "Conv_0/kernel"), lr_scale (0: frozen), train_epochs (frozen after; 0: all)}.
    "param_groups": {},
    "grad_clip_norm": 0.0,        # clip gradients to this global norm; 0: off
    # Muon for the parameters `pattern` matches (a regex on paths; "": off),
    # before param_groups; its rate follows the run's schedule (module doc).
    # Off by default (zeros), so older runs' configs resume unchanged.
    "muon": {"pattern": "", "learning_rate": 0.0, "momentum": 0.0,
             "nesterov": False, "ns_steps": 0, "normalize_weights": False},
    "grad_accum_steps": 1,        # micro-batches per step: same update, less memory
}, check=check, run_length=_run_length)
