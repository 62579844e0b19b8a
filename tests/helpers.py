"""Helpers shared by the test files: paths, tiny mocked runs, checkpoint and
tree checks, one-device LeNet steps, and processes with simulated devices.

Test files import this module (`from tests import helpers`), never each
other; `conftest.py` holds only the pytest setup and fixtures, and
`tiny_tfds.py` the on-disk dataset. Each helper imports the `research`
modules it needs when called, so a test file depends only on those of the
helpers it uses.
"""
import glob
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")

# --- tiny runs on mocked CIFAR-10 -------------------------------------------

SMOKE = os.path.join(CONFIGS, "cifar_cnn.py:smoke")
NUM_EXAMPLES = 48  # per split under mock_data: 6 steps an epoch at batch 8


def tiny_config(**overrides):
    """2 epochs x 6 steps, checkpoints every 4 steps, on mocked CIFAR-10."""
    from research.core import config_lib  # pylint: disable=g-import-not-at-top
    values = {"train_split": "train", "eval_split": "test", "batch_size": 8,
              "eval_batch_size": 16, "num_epochs": 2, "log_every_steps": 4,
              "checkpoint_every_steps": 4, "data_dir": "/nonexistent/tfds"}
    values.update(overrides)
    return config_lib.load_config(SMOKE, values)


def mocked(fn, *args, **kwargs):
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
        return fn(*args, **kwargs)


# --- tiny runs on mocked tiny_shakespeare -----------------------------------

def rnn_tiny_config(**overrides):
    # Mocked tiny_shakespeare texts use the letters a-j and spaces.
    from research.core import config_lib  # pylint: disable=g-import-not-at-top
    values = {"data_dir": "/nonexistent/tfds", "seq_len": 8, "batch_size": 4,
              "eval_batch_size": 2, "model_kwargs.vocab_size": 11,
              "log_every_steps": 5, "checkpoint_every_steps": 5,
              "sample.prompt": "abc"}
    values.update(overrides)
    return config_lib.load_config(
        os.path.join(CONFIGS, "shakespeare_rnn.py:smoke"), values)


def rnn_mocked(fn, *args, **kwargs):
    with tfds.testing.mock_data(num_examples=30):
        return fn(*args, **kwargs)


# --- checkpoints and parameters ---------------------------------------------

def final_params(config, workdir, step=None):
    from research import assembly  # pylint: disable=g-import-not-at-top
    variables = assembly.restore_variables(config, workdir, step).variables
    return jax.tree.map(np.asarray, variables["params"])


def assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def saved_steps(workdir):
    return sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints"))
                  if p.isdigit())


def corrupt(step_dir):
    for path in glob.glob(os.path.join(step_dir, "model", "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "wb") as f:
                f.write(b"garbage")


# --- one-device LeNet steps on random images --------------------------------

def lenet_setup(learning_rate=0.01, n=32):
    """A LeNet train state (cifar_cnn.py's optimizer) and n random float
    images with labels: (state, data)."""
    # pylint: disable=g-import-not-at-top
    from research import models
    from research.core import config_lib
    from research.core import state as state_lib
    # pylint: enable=g-import-not-at-top
    config = config_lib.load_config(os.path.join(CONFIGS, "cifar_cnn.py"),
                                    {"learning_rate": learning_rate})
    model = models.create_model("lenet")
    state = state_lib.create_train_state(jax.random.key(0), config, model,
                                         (1, 32, 32, 3))
    rng = np.random.default_rng(0)
    data = {"image": jnp.asarray(rng.uniform(size=(n, 32, 32, 3)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, 10, n), jnp.int32)}
    return state, data


def jit_train_step(**kwargs):
    """steps.train_step of a classifier, jitted: (state, batch, key) ->
    (state, metrics)."""
    # pylint: disable=g-import-not-at-top
    from research.core import objectives
    from research.core import steps
    # pylint: enable=g-import-not-at-top
    objective = objectives.Classification()
    return jax.jit(lambda state, batch, key: steps.train_step(
        state, batch, key, {}, objective=objective, **kwargs)[:2])


# --- processes with simulated devices ---------------------------------------

TOLERANCE = 1e-5  # all-reduce order differs; measured 7e-9 (LeNet), 4e-7 (ConvNet)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_main(worker) -> None:
    """The `__main__` of a test file's subprocess worker, run as `python
    tests/<name>_test.py worker DIR [OUT.json]` (with XLA_FLAGS for 8
    devices): prints `worker(DIR)`'s numbers as JSON, and with OUT also
    writes them with how they were made (for docs/results/)."""
    sys.path.insert(0, REPO)
    measured = worker(sys.argv[2])
    if len(sys.argv) > 3:
        from research import provenance  # pylint: disable=g-import-not-at-top
        about = provenance.about()  # before the file is opened (and dirty)
        with open(sys.argv[3], "w") as f:
            json.dump({"about": about, "result": measured}, f, indent=1)
    print(json.dumps(measured))


def device_env(devices: int) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


# `main` in a process that knows the tiny on-disk dataset (tests/tiny_tfds.py).
MAIN_CHILD = """
import sys
from absl import app
from research import main
from tests import tiny_tfds
tiny_tfds.register()
app.run(main.main, argv=sys.argv, flags_parser=main.parse_flags)
"""


def spawn_main(args, devices, log_path):
    code = MAIN_CHILD
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-c", code, *args],
                                env=device_env(devices), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=log)
