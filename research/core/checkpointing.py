"""Orbax checkpoints of a run: `<workdir>/checkpoints/<step>/{model,train,...}`.

The model variables (`model`) are an item of their own, so evaluation,
sampling and distillation teachers restore them with one call and never build
an optimizer. `train` holds the rest of the train state and the loop's
running metrics (`state.checkpoint_items` makes both); `config` the config
the checkpoint was trained with; `dataset` what the model needs besides (a
vocabulary, the number of classes).
"""
import os
import shutil
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import orbax.checkpoint as ocp

from research import errors

PyTree = Any
CHECKPOINT_DIR = "checkpoints"
QUARANTINE_DIR = "corrupt_checkpoints"  # unreadable checkpoints are moved here


def create_manager(workdir: str, keep: int = 3, read_only: bool = False
                   ) -> ocp.CheckpointManager:
    """The run's manager; saves are asynchronous, the newest `keep` are kept."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep, create=not read_only,
        read_only=read_only, save_interval_steps=0 if read_only else 1,
        enable_async_checkpointing=True)
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)), options=options)


def save(manager: ocp.CheckpointManager, step: int, items: dict[str, PyTree],
         config: ml_collections.ConfigDict, dataset_info: dict[str, Any]) -> None:
    """Starts an asynchronous save of `step`; returns before it is on disk.

    Args:
      manager: the run's manager.
      step: the step the items belong to.
      items: {"model": variables, "train": the rest} (`state.checkpoint_items`).
      config: saved beside them.
      dataset_info: e.g. a vocabulary; makes the checkpoint usable on its own.
    """
    manager.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(items["model"]),
        train=ocp.args.StandardSave(items["train"]),
        config=ocp.args.JsonSave(config.to_dict()),
        dataset=ocp.args.JsonSave(dataset_info)), force=True)


def restore_latest(manager: ocp.CheckpointManager, abstract: dict[str, PyTree]
                   ) -> dict[str, PyTree] | None:
    """Restores the `model` and `train` items of the newest readable
    checkpoint (`abstract`: their shapes, dtypes and shardings), or returns
    None if there is none.

    A checkpoint newer than a readable one that fails to restore is reported
    by name and moved to `<workdir>/corrupt_checkpoints/`; nothing is deleted.

    Raises:
      UserError: if checkpoints exist but none restores (for example the config
        changed the model): training would otherwise restart from scratch.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    failures = []
    for step in steps:
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                model=ocp.args.StandardRestore(abstract["model"]),
                train=ocp.args.StandardRestore(abstract["train"])))
        except Exception as e:  # pylint: disable=broad-except
            logging.info("Checkpoint %s could not be restored: %s: %s",
                         _step_dir(manager, step), type(e).__name__, e)
            failures.append((step, e))
            continue
        for bad_step, error in failures:
            _quarantine(manager, bad_step, _root_cause(error))
        if failures:
            manager.reload()
        logging.info("Restored checkpoint %s", _step_dir(manager, step))
        return {"model": restored.model, "train": restored.train}
    if not failures:
        return None
    step, error = failures[0]
    raise errors.UserError(
        f"None of the {len(steps)} checkpoints in {manager.directory} could be "
        f"restored (newest, step {step}: {_root_cause(error)}). If the config "
        "changed the model or optimizer, use the config the run was trained with "
        "(config.json in the workdir); if the files are damaged, start again in a "
        "new --workdir (this one is left as it is for inspection). Nothing was "
        "changed.")


def restore_model(workdir: str, abstract_model: PyTree, step: int | None = None
                  ) -> tuple[PyTree, dict[str, Any], int]:
    """Restores only the model variables of `step` (default: the latest).

    Returns:
      The variables, the dataset info saved with them, and their step.
    """
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        raise errors.UserError(
            f"No checkpoints in {directory}: train first with --mode=train and "
            "the same --workdir.")
    latest, attempt = step is None, 0
    while True:
        attempt += 1
        manager = create_manager(workdir, read_only=True)
        try:
            steps = manager.all_steps()
            if latest:
                step = manager.latest_step()
            if step is None or step not in steps:
                raise errors.UserError(
                    f"No checkpoint for step {step} in {directory}; saved steps: "
                    f"{sorted(steps)}.")
            restored = manager.restore(step, args=ocp.args.Composite(
                model=ocp.args.StandardRestore(abstract_model),
                dataset=ocp.args.JsonRestore()))
            return restored.model, restored.dataset, step
        except errors.UserError:
            raise
        except Exception as e:  # pylint: disable=broad-except
            logging.info("Checkpoint %s could not be restored: %s",
                         _step_dir(manager, step), e)
            # A run training in this workdir may have replaced the latest
            # checkpoint while it was read: then read the new latest one.
            if latest and attempt < _READ_ATTEMPTS:
                time.sleep(0.2 * attempt)
                if saved_steps(workdir) != sorted(steps):
                    continue
            raise errors.UserError(
                f"Checkpoint {_step_dir(manager, step)} could not be restored "
                f"({_root_cause(e)}). If the config describes another model, use "
                "the one the run saved (--workdir alone); or pick another "
                f"checkpoint with --step (saved: {sorted(steps)}).") from None
        finally:
            manager.close()


# Reads of the latest checkpoint while a run may be replacing it.
_READ_ATTEMPTS = 5


def saved_steps(workdir: str) -> list[int]:
    """The steps of the finished checkpoints in `workdir`, ascending (Orbax
    writes a checkpoint under a temporary name and renames it when done)."""
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _root_cause(error: BaseException) -> str:
    """The innermost message of an exception chain, first line, shortened."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if not text.startswith(type(error).__name__):
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def with_sharding(abstract: PyTree, sharding: jax.sharding.Sharding) -> PyTree:
    """Attaches `sharding` to every leaf of an abstract (eval_shape) tree."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        abstract)


def _step_dir(manager: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(str(manager.directory), str(step))


def _quarantine(manager: ocp.CheckpointManager, step: int, why: str) -> None:
    source = _step_dir(manager, step)
    base = os.path.join(os.path.dirname(str(manager.directory)), QUARANTINE_DIR,
                        str(step))
    target, n = base, 0
    while os.path.exists(target):  # an earlier quarantine of the same step
        n += 1
        target = f"{base}.{n}"
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.move(source, target)
    logging.warning("Checkpoint %s is unreadable (%s); moved it to %s and resume "
                    "from an older one.", source, why, target)
