"""A small CNN with BatchNorm and dropout on CIFAR-10 (cifar_cnn.py's data and loop).

python -m research.main --config=configs/cifar_convnet.py --workdir=runs/convnet
python -m research.main --config=configs/cifar_convnet.py:smoke --workdir=runs/smoke
"""
import ml_collections

from configs import cifar_cnn


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """cifar_cnn's config with the model and optimisation changed."""
    config = cifar_cnn.get_config(preset)
    config.model = "convnet"
    config.model_kwargs = ml_collections.ConfigDict(
        {"features": (32, 64, 128), "num_classes": 10, "dropout_rate": 0.1})
    if preset != "smoke":
        config.batch_size = 128
        config.learning_rate = 0.05
        config.num_epochs = 10
        config.log_every_steps = 100
        config.checkpoint_every_steps = 1000
    return config
