"""TFDS datasets as in-memory numpy arrays; the only module importing TensorFlow.

Small datasets are read once, whole, and live on the device; shuffling and
batching happen there (see `train.py`), so the input never stalls a step.
"""
import dataclasses
import os
import socket
import time

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from research import errors

Split = dict[str, np.ndarray]  # feature name -> array with a leading example axis


@dataclasses.dataclass(frozen=True)
class ImageClassification:
    """A TFDS image dataset with `image` (uint8 HWC) and integer `label`."""
    tfds_name: str
    input_shape: tuple[int, ...]  # one example's model input, e.g. (32, 32, 3)
    num_classes: int
    download_host: str  # probed before a download so that offline runs fail fast
    task: str = "classification"  # key of tasks.TASKS

    def preprocess(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """uint8 pixels to float32 in [0, 1]; runs on device inside the step."""
        return {**batch, "image": batch["image"].astype(jnp.float32) / 255.0}


DATASETS = {
    "cifar10": ImageClassification("cifar10", (32, 32, 3), 10, "www.cs.toronto.edu"),
}


def get_dataset(name: str) -> ImageClassification:
    if name not in DATASETS:
        raise errors.UserError(
            f"Unknown dataset {name!r}; choose from {sorted(DATASETS)}.")
    return DATASETS[name]


def resolve_data_dir(config: ml_collections.ConfigDict) -> str:
    """config.data_dir, else $TFDS_DATA_DIR, else TFDS's default folder."""
    return (config.data_dir or os.environ.get("TFDS_DATA_DIR")
            or os.path.expanduser("~/tensorflow_datasets"))


def load_split(config: ml_collections.ConfigDict, split: str) -> Split:
    """Reads one TFDS split whole into numpy arrays.

    Raises:
      UserError: when the data is not prepared under the data_dir and cannot be
        downloaded; raised within seconds, never after download retries.
    """
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    dataset = get_dataset(config.dataset)
    data_dir = resolve_data_dir(config)
    start = time.perf_counter()
    try:
        try:
            ds = tfds.load(dataset.tfds_name, split=split, data_dir=data_dir,
                           download=False, shuffle_files=False)
        except AssertionError:  # not prepared under data_dir
            if not config.download:
                raise
            _check_reachable(dataset.download_host, dataset.tfds_name, data_dir)
            ds = tfds.load(dataset.tfds_name, split=split, data_dir=data_dir,
                           download=True, shuffle_files=False)
    except (AssertionError, tfds.core.registered.DatasetNotFoundError) as e:
        raise errors.UserError(
            f"Dataset {dataset.tfds_name!r} is not prepared in data_dir "
            f"{data_dir!r} ({type(e).__name__}: {str(e).splitlines()[0]}). Fix: point "
            f"--config.data_dir or $TFDS_DATA_DIR at a TFDS data_dir that holds "
            f"{dataset.tfds_name}/ (in this project: ../shared/tensorflow_datasets), "
            f"or, on a machine with network access, pass --config.download=True."
        ) from None
    except ValueError as e:  # bad split syntax or an unknown split name
        raise errors.UserError(f"Bad split {split!r} for {dataset.tfds_name}: {e}"
                               ) from None
    parts = {"image": [], "label": []}
    # Never batch_size=-1: it aborts the process under tfds.testing.mock_data.
    for batch in tfds.as_numpy(ds.batch(10_000)):
        for key in parts:
            parts[key].append(batch[key])
    if not parts["label"]:
        raise errors.UserError(f"Split {split!r} of {dataset.tfds_name} is empty.")
    arrays = {"image": np.concatenate(parts["image"]).astype(np.uint8),
              "label": np.concatenate(parts["label"]).astype(np.int32)}
    logging.info("Loaded %s[%s]: %d examples from %s in %.1fs", dataset.tfds_name,
                 split, len(arrays["label"]), data_dir, time.perf_counter() - start)
    return arrays


def _check_reachable(host: str, name: str, data_dir: str) -> None:
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as e:
        raise errors.UserError(
            f"config.download=True but {host} is unreachable ({e}); {name} cannot be "
            f"downloaded into {data_dir!r}. Prepare it on a machine with network "
            f"access and point --config.data_dir or $TFDS_DATA_DIR at it.") from None
