"""Compression of CIFAR-10 models: distillation, pruning, int8 quantization.

python -m research.compress --config=configs/pipelines/compress_cifar.py --workdir=runs/compress
python -m research.compress --config=configs/pipelines/compress_cifar.py:smoke \
    --workdir=runs/compress_smoke

The teacher and the student are ordinary experiment configs plus overrides;
every stage trains in its own sub-workdir (see research/compress.py).
"""
import ml_collections


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """Returns the pipeline config; `preset` is the part after the colon."""
    config = ml_collections.ConfigDict()
    config.stages = ("teacher", "student", "distill", "prune", "ptq", "qat",
                     "prune_ptq")      # which stages run (research.compress.STAGES)
    # Students, distilled students and prune.seeded_levels: one run per seed.
    config.seeds = (0, 1, 2)
    config.data_dir = ""              # TFDS data_dir for every stage ("": default)
    # Every run trains on the first 45,000 training images and is scored on
    # the other 5,000 (validation: where settings are chosen); the test
    # split is scored once per row, at the end ("" keeps a config's split).
    config.train_split = "train[:45000]"
    config.eval_split = "train[45000:]"
    config.test_split = "test"
    # The big model: the dense baseline, the teacher, and a model to compress.
    # The fast CNN (configs/cifar_fast.py, ~94% on the test split).
    config.teacher = ml_collections.ConfigDict({
        "config": "configs/cifar_fast.py:cpu",
        "overrides": ml_collections.ConfigDict(),
    })
    # The small model: trained alone and distilled with the same data,
    # augmentation, steps and seeds; only the objective differs.
    config.student = ml_collections.ConfigDict({
        "config": "configs/cifar_cnn.py",
        "overrides": ml_collections.ConfigDict({
            "batch_size": 32, "learning_rate": 0.01, "num_epochs": 15,
            "log_every_steps": 1000, "checkpoint_every_steps": 5000,
            "augment": {"flip": "random", "translate": 2}}),
    })
    config.distill = ml_collections.ConfigDict({
        "temperature": 4.0,           # softens both distributions
        "alpha": 0.1,                 # weight of the labels' cross-entropy
    })
    config.prune = ml_collections.ConfigDict({
        "models": ("student", "teacher"),  # which trained models to prune
        # Final sparsities, one run each; 0: the same fine-tuning, dense
        # (what the pruned runs' extra epochs alone are worth: the fair
        # baseline of every level).
        "levels": (0.0, 0.5, 0.75, 0.9, 0.95),
        "seeded_levels": (0.0, 0.75),  # run with every seed (others: the first)
        "compose_level": 0.75,        # pruned model that prune_ptq quantizes
        "schedule": "cubic",          # gradual, from the dense weights
        "scope": "layer",             # "layer" or "global" magnitude ranking
        "teacher_levels": (0.0, 0.75, 0.9),  # the teacher's own; empty: `levels`
    })
    # Pruning fine-tunes each trained model from its weights; QAT too (at
    # the same rates). lr_scale multiplies the model's learning rates and
    # weight decay and drops the warmup (1: its own recipe, as trained).
    config.fine_tune = ml_collections.ConfigDict({
        "student": {"epochs": 5, "lr_scale": 0.1, "prune_update_every": 50},
        "teacher": {"epochs": 4, "lr_scale": 0.2, "prune_update_every": 8},
    })
    config.quant = ml_collections.ConfigDict({
        "calibration_batches": 8,     # x 256 training images for static ranges
        "qat_epochs": 2,              # quantization-aware fine-tuning
        "qat_models": ("student", "teacher"),  # which models get it
    })

    if preset == "smoke":             # the whole pipeline in a minute or two
        config.seeds = (0,)
        config.train_split = "train[:512]"
        config.eval_split = "train[512:768]"
        config.test_split = "test[:256]"
        for role in ("teacher", "student"):
            config[role].overrides.num_epochs = 1
            config[role].overrides.batch_size = 32
            config[role].overrides.eval_batch_size = 64
            config[role].overrides.log_every_steps = 8
            config[role].overrides.checkpoint_every_steps = 16
        config.teacher.config = "configs/cifar_fast.py:smoke"
        config.prune.teacher_levels = (0.0, 0.5)
        config.quant.qat_models = ("teacher", "student")
        config.prune.levels = (0.0, 0.5, 0.9)
        config.prune.seeded_levels = (0.0, 0.5)
        config.prune.compose_level = 0.5
        for model in ("teacher", "student"):
            config.fine_tune[model].epochs = 1
            config.fine_tune[model].prune_update_every = 4
        config.quant.calibration_batches = 1
        config.quant.qat_epochs = 1
    elif preset:
        raise ValueError(f"Unknown preset {preset!r} for compress_cifar; choose "
                         "from ['smoke'] or none")
    return config
