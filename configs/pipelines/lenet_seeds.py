"""The seed's LeNet recipe over seeds: the C++ convolution kernel, XLA's
convolutions, and bfloat16 compute (a sweep; no choice is made, the
evaluation split is the recipe's test split).

python -m research.sweep --config=configs/pipelines/lenet_seeds.py \
    --workdir=runs/lenet_seeds

docs/speed.md quotes its table (docs/results/lenet_seeds_results.*).
"""
import ml_collections


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    sweep = ml_collections.ConfigDict()
    sweep.config = "configs/cifar_cnn.py"
    sweep.overrides = ml_collections.ConfigDict({"checkpoint_every_steps": 12500})
    sweep.variants = ml_collections.ConfigDict({
        "kernel": {},  # the config as it is: the C++ kernel where it is built
        "xla": {"model_kwargs": {"conv_impl": "xla"}},
        "bfloat16": {"model_kwargs": {"dtype": "bfloat16"}},
    })
    sweep.order = ("kernel", "xla", "bfloat16")
    sweep.seeds = (0, 1, 2)
    sweep.baseline = "kernel"
    sweep.seeded = ("xla", "bfloat16")
    sweep.choose = ml_collections.ConfigDict({
        "among": (), "metric": "accuracy", "higher": True})
    sweep.test_split = ""             # the runs' own eval split is the test split
    if preset == "smoke":
        sweep.overrides.train_split = "train[:256]"
        sweep.overrides.eval_split = "test[:128]"
        sweep.overrides.num_epochs = 1
        sweep.seeds = (0, 1)
    elif preset:
        raise ValueError(f"Unknown preset {preset!r}; choose from ['smoke'] or none")
    return sweep
