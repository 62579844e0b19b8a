"""A fast CIFAR-10 CNN: airbench94's network and recipe (arXiv:2404.00498).

python -m research.main --config=configs/cifar_fast.py            # gpu: aims at 94%
python -m research.main --config=configs/cifar_fast.py:cpu        # this 2-core CPU
python -m research.main --config=configs/cifar_fast.py:muon       # 8 epochs, Muon
python -m research.main --config=configs/cifar_fast.py:smoke      # seconds

airbench's hyperparameters are given per 1024 examples of a summed loss; here
the loss is the batch mean, so its learning rate 11.5 / (1 + 1 / (1 - 0.85))
is 1.5 and its weight decay 0.0153 / 7.667 = 0.0020 per step at the peak rate
(optimizers.py). Every technique is a field and can be switched off alone.
"""
import ml_collections

from configs import cifar_cnn


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """cifar_cnn's data and loop with airbench's model and recipe."""
    config = cifar_cnn.get_config("smoke" if preset in ("smoke", "muon_smoke")
                                  else None)
    config.model = "airbench"
    config.model_kwargs = ml_collections.ConfigDict({
        "widths": (64, 256, 256),     # the three blocks
        "num_classes": 10,
        "bn_momentum": 0.6,           # running = 0.6 running + 0.4 batch
        "scale": 1.0 / 9.0,           # logits x this
        "dtype": "float32",           # "bfloat16": convolutions and activations
        "conv_impl": "auto",          # "auto": the bf16 CPU kernel where built
    })
    config.objective_kwargs.label_smoothing = 0.2
    config.augment.flip = "alternating"   # each image flipped every other epoch
    config.augment.translate = 2
    config.augment.eval_views = "identity"
    config.augment.final_eval_views = "flip_translate"  # airbench's TTA level 2
    config.optimizer = "sgd"
    config.nesterov = True
    config.momentum = 0.85
    config.learning_rate = 1.5
    config.weight_decay = 0.0153 / (1 + 1 / (1 - 0.85))
    config.lr_schedule = "linear"     # 0.2 -> 1 over 23% of the run, then -> 0.07
    config.warmup_fraction = 0.23
    config.warmup_start_factor = 0.2
    config.end_learning_rate = 0.07 * 1.5
    config.param_groups = ml_collections.ConfigDict({
        # BatchNorm biases learn 64x faster (weight decay unchanged).
        "norm_bias": {"pattern": r".*norm\d/bias", "lr_scale": 64.0,
                      "train_epochs": 0.0},
        "whiten_kernel": {"pattern": "whiten_kernel", "lr_scale": 0.0,
                          "train_epochs": 0.0},   # frozen: set from the data
        "whiten_bias": {"pattern": "whiten_bias", "lr_scale": 1.0,
                        "train_epochs": 3.0},     # then frozen
    })
    config.prune.exclude = "whiten"   # frozen, set from the data: never pruned
    config.lookahead.every = 5
    config.lookahead.decay = 0.95
    config.batch_size = 1024
    config.num_epochs = 10            # airbench trains 9.9 (476 of these 480 steps)
    config.steps_per_call = 1
    config.eval_batch_size = 2000
    config.log_every_steps = 50
    config.checkpoint_every_steps = 200

    if preset in (None, "gpu"):
        config.model_kwargs.dtype = "bfloat16"
    elif preset == "cpu":             # sized for the 2-core CPU (docs/fast_cnn.md)
        config.model_kwargs.dtype = "bfloat16"
    elif preset in ("muon", "muon_smoke"):
        muon(config, batch_size=32 if preset == "muon_smoke" else 2000)
        if preset == "muon_smoke":    # the recipe on the smoke sizes
            smoke(config)
            config.model_kwargs.scale = 1.0 / config.model_kwargs.widths[-1]
    elif preset == "smoke":           # seconds, on cifar_cnn's smoke splits
        smoke(config)
    else:
        raise ValueError(f"Unknown preset {preset!r} for cifar_fast; choose from "
                         "['gpu', 'cpu', 'muon', 'smoke', 'muon_smoke'] or none")
    return config


def muon(config: ml_collections.ConfigDict, batch_size: int = 2000) -> None:
    """airbench94_muon (KellerJordan/cifar10-airbench; 94.01% in 8 epochs on
    a GPU, against airbench94's 9.9): Muon on the convolution filters, SGD on
    the rest at its per-example rates x the batch (a mean loss), batch 2000, linear
    decay to 0 without warmup, no lookahead, head std 1 and logits / 256.
    Differences: the whitening bias follows the run's schedule and stops
    after 3 epochs (airbench decays it to 0 over them); the final pool is
    global (airbench's MaxPool2d(3) sees the top-left 3x3 of 4x4)."""
    config.model_kwargs.dtype = "bfloat16"
    config.model_kwargs.scale = 1.0 / config.model_kwargs.widths[-1]
    config.model_kwargs.head_std = 1.0
    config.batch_size = batch_size
    config.num_epochs = 8
    config.learning_rate = 0.053 * batch_size  # biases' (and whitening bias's)
    config.weight_decay = 2e-6 * batch_size    # per step at the peak rate
    config.warmup_fraction = 0.0
    config.warmup_start_factor = 0.0
    config.end_learning_rate = 0.0
    config.param_groups.norm_bias.lr_scale = 1.0
    config.param_groups.head = {"pattern": "head/kernel",
                                "lr_scale": 0.67 / 0.053, "train_epochs": 0.0}
    config.muon = {"pattern": r".*conv\d/kernel", "learning_rate": 0.24,
                   "momentum": 0.6, "nesterov": True, "ns_steps": 3,
                   "normalize_weights": True}
    config.lookahead.every = 0
    config.log_every_steps = 25
    config.checkpoint_every_steps = 50


def smoke(config: ml_collections.ConfigDict) -> None:
    """Seconds, on cifar_cnn's smoke splits."""
    config.model_kwargs.widths = (8, 16, 16)
    config.batch_size = 32
    config.num_epochs = 2
    config.eval_batch_size = 64
    config.log_every_steps = 4
    config.checkpoint_every_steps = 8
    config.param_groups.whiten_bias.train_epochs = 1.0
