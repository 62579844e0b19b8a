"""The config schema, and loading, checking and saving configs outside absl.

A config is made of sections (`Section`), each owned by the module that
reads it: its fields and their defaults, its checks, and whether its fields
may change when a run resumes. The core owns the run's own fields (`RUN`);
the optimizer, the extras, the input paths, compression and the parallel
schemes declare theirs beside their code, and `research/assembly.py`
registers them all. `base_config()` is every section's defaults: an
experiment file states only what differs (configs/).

Notebooks and `--mode=eval` need configs without flags: `load_config` reads a
config file (with an optional `:preset`), `load_workdir_config` reads the one a
run saved. `validate` runs before any data is read or anything compiled.
"""
import ast
import dataclasses
import importlib.util
import json
import os
from typing import Any, Callable, Mapping

import ml_collections

from research import errors

CONFIG_JSON = "config.json"
MAX_STEPS_PER_CALL = 64


@dataclasses.dataclass(frozen=True)
class Section:
    """A part of the config and its owner's rules.

    Attributes:
      name: what the section is called (messages, `base_config(name)`).
      defaults: its fields and their default values (dicts become nested
        sections of the config).
      check: `config -> None`, raising UserError for a bad value.
      free: fields that may change when a run resumes (a trailing "." frees
        a whole sub-dict): they do not change what is trained.
      fixed: fields that may never change on resume, with why.
      run_length: `config -> [what]`: what is laid out over the run's whole
        length, so that a changed num_epochs would reshape it mid-course.
      optional: a section only some configs have (e.g. image augmentation).
    """
    name: str
    defaults: Mapping[str, Any]
    check: Callable[[ml_collections.ConfigDict], None] = lambda config: None
    free: tuple[str, ...] = ()
    fixed: Mapping[str, str] = dataclasses.field(default_factory=dict)
    run_length: Callable[[ml_collections.ConfigDict], list[str]] = (
        lambda config: [])
    optional: bool = False


# name -> Section, in the order a config lists them; `register` adds one.
SECTIONS: dict[str, Section] = {}


def register(*sections: Section) -> None:
    for section in sections:
        SECTIONS.setdefault(section.name, section)


def base_config(*optional: str) -> ml_collections.ConfigDict:
    """Every required section's defaults, and those of the `optional`
    sections named (e.g. "augment"); unlocked, for a config file to change."""
    unknown = [n for n in optional if n not in SECTIONS]
    if unknown:
        raise ValueError(f"Unknown config sections {unknown}; registered: "
                         f"{list(SECTIONS)}.")
    config = ml_collections.ConfigDict()
    for section in SECTIONS.values():
        if not section.optional or section.name in optional:
            for key, value in section.defaults.items():
                config[key] = ml_collections.ConfigDict(value) if isinstance(
                    value, dict) else value
    return config


def free_fields() -> tuple[str, ...]:
    """The fields that may change on resume, from every section."""
    return tuple(f for s in SECTIONS.values() for f in s.free)


def fixed_fields() -> dict[str, str]:
    """The fields that may never change on resume, with why."""
    return {k: why for s in SECTIONS.values() for k, why in s.fixed.items()}


def run_length_dependents(config: ml_collections.ConfigDict) -> list[str]:
    """What in `config` is laid out over the whole run's steps (so that a
    changed num_epochs reshapes it), from every section present."""
    return [what for s in SECTIONS.values() if _present(s, config)
            for what in s.run_length(config)]


def _present(section: Section, config: ml_collections.ConfigDict) -> bool:
    return all(k in config for k in section.defaults)


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


def _field(config: ml_collections.ConfigDict, key: str
           ) -> tuple[ml_collections.ConfigDict, str]:
    """The section holding dotted `key` and the field's name in it; refuses
    unknown keys."""
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        node = node[name] if name in node else None
        if not isinstance(node, ml_collections.ConfigDict):
            raise errors.UserError(f"Unknown config field {key!r}.")
    if leaf not in node:
        raise errors.UserError(
            f"Unknown config field {key!r}; fields here: {sorted(node.keys())}.")
    return node, leaf


def override(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """Sets a dotted key, refusing unknown keys and type changes."""
    node, leaf = _field(config, key)
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
    node, leaf = _field(config, key)
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
    """Checks every registered section of `config` before any compute
    (`assembly.validate` adds the registries' names); raises UserError."""
    missing = sorted(k for s in SECTIONS.values() if not s.optional
                     for k in s.defaults if k not in config)
    if missing:
        raise errors.UserError(
            f"The config lacks the field{'s' * (len(missing) > 1)} "
            f"{', '.join(missing)}, which every run needs; start the config file "
            "from `assembly.base_config()` (as configs/cifar_cnn.py does) and "
            "change what differs.")
    for section in SECTIONS.values():
        if _present(section, config):
            section.check(config)


def _check_run(config: ml_collections.ConfigDict) -> None:
    for key in ("batch_size", "eval_batch_size", "steps_per_call",
                "log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        if config[key] < 1:
            raise errors.UserError(
                f"config.{key} must be a positive integer, got {config[key]}.")
    if not config.num_epochs > 0:  # a fraction of an epoch is a run too
        raise errors.UserError(
            f"config.num_epochs must be > 0, got {config.num_epochs}.")
    if config.num_devices < 0:
        raise errors.UserError(
            f"config.num_devices must be >= 0 (0: all), got {config.num_devices}.")
    if config.device_memory_mib < 0:
        raise errors.UserError(
            f"config.device_memory_mib must be >= 0 (0: no limit), got "
            f"{config.device_memory_mib}.")
    if config.steps_per_call > MAX_STEPS_PER_CALL:
        raise errors.UserError(
            f"config.steps_per_call={config.steps_per_call} is over "
            f"{MAX_STEPS_PER_CALL}: the steps are unrolled, so compile time grows "
            "with it while dispatch is already a few percent of a step.")


# The run's own fields: what it trains on, for how long, and its loop.
RUN = Section("run", {
    "seed": 0,                    # the init, dropout and data-order keys
    "dataset": "",                # key of data/input_pipeline.DATASETS
    "data_dir": "",               # TFDS data_dir; "": $TFDS_DATA_DIR or the default
    "download": False,            # let TFDS download when the data is not prepared
    "train_split": "train",       # TFDS split (slicing allowed, e.g. "train[:10%]")
    "eval_split": "test",         # evaluated whole after every epoch
    "model": "",                  # key of models.MODELS
    "model_kwargs": {},           # the model's arguments (replaced whole)
    "objective": "",              # key of core/objectives.OBJECTIVES; "": the dataset's
    "objective_kwargs": {},       # the objective's arguments (replaced whole)
    "batch_size": 4,              # global batch size, over all devices
    "num_epochs": 10.0,           # may be fractional (a float field)
    "init_from": "",              # start from this workdir's model (fine-tune)
    "num_devices": 0,             # devices on the mesh; 0: all
    "eval_batch_size": 1000,      # the last eval batch is padded and masked
    "steps_per_call": 4,          # steps unrolled per jitted call (1-64)
    "log_every_steps": 2500,      # progress line and train metrics
    "checkpoint_every_steps": 2500,  # also saved at every epoch end and at the end
    "keep_checkpoints": 3,        # most recent checkpoints kept
    "device_memory_mib": 0,       # refuse a train step that needs more of one
    #                               device (XLA's memory analysis; core/memory.py);
    #                               0: no limit
}, check=_check_run,
    # How often to log or save, how the work is laid out on devices, where the
    # data is read from, what is evaluated, how long to train (a longer or
    # shorter run of the same experiment, unless something is laid out over
    # the run's length: `run_length_dependents`) do not change what is trained.
    free=("log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
          "steps_per_call", "num_devices", "data_dir", "download",
          "eval_batch_size", "eval_split", "num_epochs", "init_from",
          "device_memory_mib"),
    fixed={"batch_size": "steps count batches, so its epochs, schedule and data "
                         "order would no longer line up with the steps already "
                         "taken"})
register(RUN)


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
    """Reads the config a run saved in `workdir`; lists become tuples again.
    A section the run's code did not have yet gets its defaults (off)."""
    path = os.path.join(workdir, CONFIG_JSON)
    if not os.path.isfile(path):
        raise errors.UserError(
            f"No {CONFIG_JSON} in workdir {workdir!r}: it holds no run. Pass "
            "--config=configs/<name>.py, or point --workdir at a trained run.")
    with open(path) as f:
        content = json.load(f)
    content.pop("_history", None)
    for section in SECTIONS.values():
        if not section.optional:
            for key, value in section.defaults.items():
                content.setdefault(key, value)
    config = ml_collections.ConfigDict(_tuples(content))
    config.lock()
    return config


def _tuples(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _tuples(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return tuple(_tuples(v) for v in tree)
    return tree
