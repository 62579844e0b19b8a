"""Loading, checking and saving experiment configs outside absl.

Notebooks and `--mode=eval` need configs without flags: `load_config` reads a
config file (with an optional `:preset`), `load_workdir_config` reads the one a
run saved. `validate` runs before any data is read or anything compiled.
"""
import ast
import importlib.util
import json
import math
import os
from typing import Any

import ml_collections

from research import errors

CONFIG_JSON = "config.json"
# The fields every run's config has (each config in configs/ has them all).
CORE_FIELDS = (
    "batch_size", "checkpoint_every_steps", "data_dir", "data_parallel", "dataset",
    "download", "ema_decay", "end_learning_rate", "eval_batch_size", "eval_split",
    "grad_accum_steps", "grad_clip_norm", "init_from", "input", "keep_checkpoints",
    "learning_rate", "log_every_steps", "lookahead", "lr_schedule", "model",
    "model_kwargs", "momentum", "nesterov", "num_devices", "num_epochs",
    "objective", "objective_kwargs", "optimizer", "param_groups", "prune", "quant",
    "seed", "steps_per_call", "stream", "train_split", "warmup_fraction",
    "warmup_start_factor", "warmup_steps", "weight_decay")
MAX_STEPS_PER_CALL = 64


def load_config(spec: str, overrides: dict[str, Any] | None = None
                ) -> ml_collections.ConfigDict:
    """Loads `path/to/config.py[:preset]` and applies dotted-key overrides.

    Args:
      spec: a config file path, optionally followed by `:preset`.
      overrides: e.g. {"batch_size": 128, "model_kwargs.num_classes": 5}; keys
        must exist and values must keep the field's type.

    Returns:
      The locked config.
    """
    path, _, preset = spec.partition(":")
    if not os.path.isfile(path):
        raise errors.UserError(f"Config file {path!r} does not exist.")
    module_spec = importlib.util.spec_from_file_location("_research_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    try:
        config = module.get_config(preset or None) if preset else module.get_config()
    except ValueError as e:  # configs raise it for unknown presets
        raise errors.UserError(f"{path}: {e}") from None
    config.lock()
    for key, value in (overrides or {}).items():
        override(config, key, value)
    return config


def dotted_items(tree: dict[str, Any], prefix: str = ""):
    """(dotted key, value) of every leaf of a nested dict: overrides as
    `load_config` takes them."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from dotted_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def override(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """Sets a dotted key, refusing unknown keys and type changes."""
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        node = node[name] if name in node else None
        if not isinstance(node, ml_collections.ConfigDict):
            raise errors.UserError(f"Unknown config field {key!r}.")
    if leaf not in node:
        raise errors.UserError(
            f"Unknown config field {key!r}; fields here: {sorted(node.keys())}.")
    try:
        setattr(node, leaf, value)
    except TypeError as e:
        raise errors.UserError(f"Config field {key!r}: {e}") from None


# Free-form sections: the keyword arguments of the chosen model or objective,
# whose fields a config file cannot know in advance.
KWARGS_SECTIONS = ("model_kwargs", "objective_kwargs")


def override_from_text(config: ml_collections.ConfigDict, key: str, text: str
                       ) -> None:
    """Sets a dotted key from command-line text, parsed as the field's type.
    A new key in a kwargs section (`objective_kwargs.teacher_workdir`) is
    added, its value read as a Python literal, else as a string."""
    *parents, leaf = key.split(".")
    if (len(parents) == 1 and parents[0] in KWARGS_SECTIONS
            and isinstance(config.get(parents[0]), ml_collections.ConfigDict)
            and leaf not in config[parents[0]]):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        with config[parents[0]].unlocked():
            config[parents[0]][leaf] = value
        return
    node = config
    for name in parents:
        node = node[name] if name in node else None
        if not isinstance(node, ml_collections.ConfigDict):
            raise errors.UserError(f"Unknown config field {key!r}.")
    if leaf not in node:
        raise errors.UserError(
            f"Unknown config field {key!r}; fields here: {sorted(node.keys())}.")
    current = node[leaf]
    try:
        if isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError("expected true or false")
            value = text.lower() in ("true", "1")
        elif isinstance(current, (int, float)):
            value = type(current)(text)
        elif isinstance(current, (tuple, list)):
            value = tuple(ast.literal_eval(text))
        else:
            value = text
    except (ValueError, SyntaxError) as e:
        raise errors.UserError(f"--config.{key}={text}: {e}") from None
    override(config, key, value)


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks names and ranges before any compute; raises UserError."""
    # Imported here: the registries pull in flax/optax, configs should not.
    from research import augment, input_pipeline, models, optimizers  # noqa: E402
    from research import diloco, state, streaming  # noqa: E402
    from research.compression import prune  # noqa: E402

    missing = [f for f in CORE_FIELDS if f not in config]
    if missing:
        raise errors.UserError(
            f"The config lacks the field{'s' * (len(missing) > 1)} "
            f"{', '.join(missing)}, which every run needs; start the config file "
            "from one in configs/ (e.g. call configs/cifar_cnn.py's get_config() "
            "and change what differs).")
    _check_choice("model", config.model, models.MODELS)
    _check_choice("dataset", config.dataset, input_pipeline.DATASETS)
    _check_choice("optimizer", config.optimizer, optimizers.OPTIMIZERS)
    _check_choice("lr_schedule", config.lr_schedule, optimizers.LR_SCHEDULES)
    optimizers.check(config)
    if config.warmup_steps < 0 or config.grad_clip_norm < 0:
        raise errors.UserError("config.warmup_steps and config.grad_clip_norm must "
                               "be >= 0 (0 turns them off).")
    for key in ("batch_size", "grad_accum_steps", "eval_batch_size", "num_epochs",
                "steps_per_call", "log_every_steps", "checkpoint_every_steps",
                "keep_checkpoints"):
        if config[key] < 1:
            raise errors.UserError(
                f"config.{key} must be a positive integer, got {config[key]}.")
    if config.num_devices < 0:
        raise errors.UserError(
            f"config.num_devices must be >= 0 (0: all), got {config.num_devices}.")
    if config.steps_per_call > MAX_STEPS_PER_CALL:
        raise errors.UserError(
            f"config.steps_per_call={config.steps_per_call} is over "
            f"{MAX_STEPS_PER_CALL}: the steps are unrolled, so compile time grows "
            "with it while dispatch is already a few percent of a step.")
    if not (config.learning_rate > 0 and math.isfinite(config.learning_rate)):
        raise errors.UserError(
            f"config.learning_rate must be positive, got {config.learning_rate}.")
    if not 0 <= config.momentum < 1:
        raise errors.UserError(
            f"config.momentum must be in [0, 1), got {config.momentum}.")
    if "augment" in config:
        augment.check(config.augment)
    streaming.check(config)
    state.create_extras(config)  # checks their fields
    diloco.options(config)  # checks the data-parallel scheme
    prune.check_options(config.prune)


def check_schedule(config: ml_collections.ConfigDict, total_steps: int) -> None:
    """Checks the learning-rate schedule against the run's length."""
    from research import optimizers  # noqa: E402
    if (optimizers.warmup_steps(config, total_steps) >= total_steps
            and config.lr_schedule != "constant"):
        raise errors.UserError(
            f"config.warmup_steps={config.warmup_steps} is not below the run's "
            f"{total_steps} steps, so the {config.lr_schedule} decay never starts; "
            "lower warmup_steps or train longer.")


def _check_choice(field: str, name: str, registry: dict[str, Any]) -> None:
    if name not in registry:
        raise errors.UserError(
            f"Unknown {field} {name!r} (config.{field}); choose from "
            f"{sorted(registry)}.")


def save_config(config: ml_collections.ConfigDict, workdir: str,
                history: list[dict[str, Any]] | None = None) -> None:
    """Writes the resolved config to `workdir/config.json` (atomically), with
    the history of changes made on resume under `_history`."""
    content = config.to_dict()
    if history:
        content["_history"] = history
    path = os.path.join(workdir, CONFIG_JSON)
    with open(path + ".tmp", "w") as f:
        json.dump(content, f, indent=2, sort_keys=True, default=list)
    os.replace(path + ".tmp", path)


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
    """Reads the config a run saved in `workdir`; lists become tuples again."""
    path = os.path.join(workdir, CONFIG_JSON)
    if not os.path.isfile(path):
        raise errors.UserError(
            f"No {CONFIG_JSON} in workdir {workdir!r}: it holds no run. Pass "
            "--config=configs/<name>.py, or point --workdir at a trained run.")
    with open(path) as f:
        content = json.load(f)
    content.pop("_history", None)
    config = ml_collections.ConfigDict(_tuples(content))
    config.lock()
    return config


def _tuples(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _tuples(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return tuple(_tuples(v) for v in tree)
    return tree
