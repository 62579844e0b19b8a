"""Every config and preset loads; overrides apply and bad ones fail."""
import glob
import os
import sys
from unittest import mock

import pytest
from absl import flags
from ml_collections import config_flags

from research import assembly
from research.core import config_lib
from research import errors
from tests import helpers

CONFIG_FILES = sorted(
    p for pattern in ("*.py", "pipelines/*.py")
    for p in glob.glob(os.path.join(helpers.CONFIGS, pattern))
    if not p.endswith("__init__.py"))
PRESETS = {"cifar_cnn.py": ["", "smoke"], "cifar_convnet.py": ["", "smoke"],
           "shakespeare_rnn.py": ["", "cpu", "smoke"],
           "cifar_fast.py": ["", "gpu", "cpu", "muon", "smoke", "muon_smoke"],
           "compress_cifar.py": ["", "smoke"], "diloco_cifar.py": ["", "smoke"],
           "diloco_lstm.py": ["", "smoke"], "lenet_seeds.py": ["", "smoke"],
           "fast_cnn_seeds.py": ["", "smoke"], "streaming_pairs.py": ["", "smoke"],
           "scaling_shakespeare.py": ["", "cpu", "gpu", "smoke"],
           "compress_gpt.py": ["", "smoke"]}
PIPELINES = {"compress_cifar.py", "compress_gpt.py"}  # research.compress configs
SWEEPS = {"diloco_cifar.py", "diloco_lstm.py", "lenet_seeds.py",
          "fast_cnn_seeds.py", "streaming_pairs.py"}  # research.sweep
GRIDS = {"scaling_shakespeare.py"}  # research.scaling configs


def _parse(*args):
    """Parses a command line the way research.main defines --config."""
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                    lock_config=True)
    argv = ["prog", *args]
    # config_flags reads the --config.<field> overrides from sys.argv.
    with mock.patch.object(sys, "argv", argv):
        flag_values(argv)
    return flag_values.config


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_and_preset_loads_and_validates(path):
    for preset in PRESETS.get(os.path.basename(path), [""]):
        config = config_lib.load_config(f"{path}:{preset}" if preset else path)
        if os.path.basename(path) in PIPELINES:
            from research import compress  # pylint: disable=g-import-not-at-top
            compress.check(config)
        elif os.path.basename(path) in SWEEPS:
            from research import sweep  # pylint: disable=g-import-not-at-top
            sweep.check(config)
            for name in config.variants:
                assembly.validate(sweep.variant_config(config, name))
        elif os.path.basename(path) in GRIDS:
            from research import scaling  # pylint: disable=g-import-not-at-top
            assert config.heldout.size in {*config.sizes, *config.heldout.sizes}
            for name in {*config.sizes, *config.heldout.sizes}:
                assembly.validate(scaling.size_config(config, name))
        else:
            assembly.validate(config)


def test_every_config_has_declared_presets():
    assert {os.path.basename(p) for p in CONFIG_FILES} >= set(PRESETS)


def test_seed_recipe():
    config = config_lib.load_config(os.path.join(helpers.CONFIGS, "cifar_cnn.py"))
    assert (config.model, config.optimizer, config.batch_size, config.num_epochs,
            config.learning_rate, config.momentum) == (
                "lenet", "sgd", 4, 10, 0.001, 0.9)


def test_command_line_overrides_apply():
    config = _parse(f"--config={helpers.CONFIGS}/cifar_cnn.py",
                    "--config.batch_size=128", "--config.num_epochs=2",
                    "--config.learning_rate=0.01", "--config.seed=1",
                    "--config.model_kwargs.num_classes=5")
    assert (config.batch_size, config.num_epochs, config.learning_rate, config.seed,
            config.model_kwargs.num_classes) == (128, 2, 0.01, 1, 5)


@pytest.mark.parametrize("override, message", [
    ("--config.batch_size=abc", "batch_size=abc: invalid literal for int"),
    ("--config.learning_rate=fast", "learning_rate=fast: could not convert"),
])
def test_bad_command_line_types_fail(override, message):
    with pytest.raises(flags.IllegalFlagValueError, match=message):
        _parse(f"--config={helpers.CONFIGS}/cifar_cnn.py", override)


def test_unknown_command_line_field_fails_with_suggestion():
    with pytest.raises(AttributeError, match='Did you mean "batch_size"'):
        _parse(f"--config={helpers.CONFIGS}/cifar_cnn.py", "--config.batch_sise=8")


def test_python_overrides_are_checked():
    path = os.path.join(helpers.CONFIGS, "cifar_cnn.py")
    config = config_lib.load_config(path, {"batch_size": 16,
                                           "model_kwargs.num_classes": 4})
    assert config.batch_size == 16 and config.model_kwargs.num_classes == 4
    with pytest.raises(errors.UserError, match="Unknown config field 'batchsize'"):
        config_lib.load_config(path, {"batchsize": 16})
    with pytest.raises(errors.UserError, match="batch_size"):
        config_lib.load_config(path, {"batch_size": "large"})
    with pytest.raises(errors.UserError, match="does not exist"):
        config_lib.load_config("configs/nope.py")
    with pytest.raises(errors.UserError, match="Unknown preset 'huge'"):
        config_lib.load_config(path + ":huge")


@pytest.mark.parametrize("key, value, message", [
    ("model", "resnet9000", r"Unknown model 'resnet9000'.*'lenet'"),
    ("dataset", "imagenet", r"Unknown dataset 'imagenet'.*cifar10"),
    ("optimizer", "lion", r"Unknown optimizer 'lion'.*sgd"),
    ("batch_size", 0, "batch_size must be a positive integer"),
    ("num_epochs", -1, "num_epochs must be > 0"),
    ("learning_rate", -0.1, "learning_rate must be positive"),
    ("momentum", 1.5, r"momentum must be in \[0, 1\)"),
])
def test_validate_rejects_bad_values(key, value, message):
    config = config_lib.load_config(os.path.join(helpers.CONFIGS, "cifar_cnn.py"))
    setattr(config, key, value)
    with pytest.raises(errors.UserError, match=message):
        assembly.validate(config)


def test_saved_config_round_trips(tmp_path):
    config = config_lib.load_config(os.path.join(helpers.CONFIGS, "cifar_cnn.py"))
    config_lib.save_config(config, str(tmp_path))
    assert config_lib.load_workdir_config(str(tmp_path)).to_dict() == config.to_dict()
    with pytest.raises(errors.UserError, match="holds no run"):
        config_lib.load_workdir_config(str(tmp_path / "empty"))


def test_a_sweep_variant_may_name_its_own_config():
    from research import sweep  # pylint: disable=g-import-not-at-top
    config = config_lib.load_config(
        os.path.join(helpers.CONFIGS, "pipelines/fast_cnn_seeds.py"))
    muon = sweep.variant_config(config, "muon", seed=1)
    plain = sweep.variant_config(config, "airbench94")
    assert (muon.muon.pattern, muon.num_epochs, muon.seed) == (
        r".*conv\d/kernel", 8, 1)
    assert (plain.muon.pattern, plain.num_epochs, plain.seed) == ("", 10, 0)
