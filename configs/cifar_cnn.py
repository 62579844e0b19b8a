"""The classic CIFAR-10 CNN (LeNet) with SGD + momentum: the seed's recipe.

Pixels scaled to [0, 1], no augmentation, SGD lr 0.001 momentum 0.9, batch 4,
10 epochs, the whole test split evaluated after every epoch. Every other
field is its section's default (`assembly.base_config`; each section's
fields are documented where they are declared, e.g. core/optimizers.py).

python -m research.main --config=configs/cifar_cnn.py --workdir=runs/cifar_cnn
python -m research.main --config=configs/cifar_cnn.py:smoke --workdir=runs/smoke
python -m research.main --config=configs/cifar_cnn.py --config.batch_size=128 \
    --config.num_epochs=2 --config.learning_rate=0.01 --config.seed=1
"""
import ml_collections

from research import assembly


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """Returns the experiment config; `preset` is the part after the colon."""
    config = assembly.base_config("augment")
    config.dataset = "cifar10"        # train/test splits: 50,000/10,000 images
    config.model = "lenet"            # conv 6@5x5, pool, conv 16@5x5, pool, 120, 84, 10
    # conv_impl: "auto" runs the convolutions in the C++ CPU kernel where it is
    # built and JAX is on the CPU, else in XLA; "xla" or "kernel" to force.
    # dtype: "bfloat16" computes in bf16 on float32 weights (XLA's convolutions).
    config.model_kwargs = ml_collections.ConfigDict({"num_classes": 10,
                                                     "conv_impl": "auto",
                                                     "dtype": "float32"})
    config.objective_kwargs = ml_collections.ConfigDict({"label_smoothing": 0.0})
    # The recipe (equal to the base's defaults, stated for the reader).
    config.optimizer = "sgd"
    config.learning_rate = 0.001
    config.momentum = 0.9
    config.batch_size = 4
    config.num_epochs = 10

    if preset == "smoke":             # seconds-long run for run.sh and tests
        config.train_split = "train[:256]"
        config.eval_split = "test[:200]"
        config.batch_size = 8
        config.num_epochs = 2
        config.eval_batch_size = 64
        config.log_every_steps = 8
        config.checkpoint_every_steps = 16
    elif preset:
        raise ValueError(f"Unknown preset {preset!r} for cifar_cnn; choose from "
                         "['smoke'] or none")
    return config
