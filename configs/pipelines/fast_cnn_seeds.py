"""The fast CNN's CPU recipes over seeds: airbench94 (`cifar_fast.py:cpu`,
10 epochs) and airbench94_muon (`cifar_fast.py:muon`, 8 epochs, Muon on the
filters), scored on CIFAR-10's test split (the recipe's evaluation split: no
choice is made here), with each run's training time (a sweep).

python -m research.sweep --config=configs/pipelines/fast_cnn_seeds.py \
    --workdir=runs/fast_cnn_seeds

Run it on a quiet machine: the times are the headline (docs/fast_cnn.md).
"""
import ml_collections


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    sweep = ml_collections.ConfigDict()
    sweep.config = "configs/cifar_fast.py:cpu"
    sweep.overrides = ml_collections.ConfigDict()
    sweep.variants = ml_collections.ConfigDict({
        "airbench94": {},
        "muon": {"config": "configs/cifar_fast.py:muon"},
    })
    sweep.order = ("airbench94", "muon")
    sweep.seeds = (0, 1)
    sweep.baseline = "airbench94"
    sweep.seeded = ("muon",)
    sweep.choose = ml_collections.ConfigDict({
        "among": (), "metric": "accuracy", "higher": True})
    sweep.test_split = ""             # the runs' own eval split is the test split
    if preset == "smoke":
        sweep.config = "configs/cifar_fast.py:smoke"
        sweep.variants.muon.config = "configs/cifar_fast.py:muon_smoke"
        sweep.overrides.num_epochs = 1
    elif preset:
        raise ValueError(f"Unknown preset {preset!r}; choose from ['smoke'] or none")
    return sweep
