"""Compression of the character GPT: distillation, MLP pruning, int8.

python -m research.compress --config=configs/pipelines/compress_gpt.py \
    --workdir=runs/compress_gpt

The teacher is the `cpu` GPT's shape (4 layers of width 192) trained 4
epochs; the student a 2-layer GPT of width 64, trained alone and distilled
with the same data, steps and seeds. Both compute in float32, so that the
int8 rows differ from their float baseline by the quantization alone.
Scores: validation loss in nats per character (docs/scaling.md).
"""
import ml_collections

from configs.pipelines import compress_cifar


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    config = compress_cifar.get_config()
    config.stages = ("teacher", "student", "distill", "prune", "ptq", "ptq_weights")
    config.seeds = (0, 1)
    # Tiny Shakespeare's own splits: runs scored on validation, test once.
    config.train_split = config.eval_split = ""
    config.test_split = "test"
    shared = {"num_epochs": 4, "batch_size": 32, "warmup_steps": 0,
              "warmup_fraction": 0.05, "end_learning_rate": 2e-4,
              "log_every_steps": 200, "checkpoint_every_steps": 2000,
              "keep_checkpoints": 1}
    config.teacher = ml_collections.ConfigDict({
        "config": "configs/shakespeare_gpt.py:cpu",
        "overrides": ml_collections.ConfigDict({
            **shared, "model_kwargs": {"dropout_rate": 0.0, "dtype": "float32"}}),
    })
    config.student = ml_collections.ConfigDict({
        "config": "configs/shakespeare_gpt.py:cpu",
        "overrides": ml_collections.ConfigDict({
            **shared, "model_kwargs": {"num_layers": 2, "width": 64, "num_heads": 4,
                                       "dropout_rate": 0.0, "dtype": "float32"}}),
    })
    # Language models distil at a low temperature (next-token distributions
    # are already soft) with the labels' loss weighted as much as the teacher's.
    config.distill = ml_collections.ConfigDict({"temperature": 2.0, "alpha": 0.5})
    config.prune = ml_collections.ConfigDict({
        "models": ("teacher",),
        "levels": (0.0, 0.5, 0.75),   # 0: the same fine-tuning, dense
        "compose_level": 0.75,
        "schedule": "cubic",
        "scope": "layer",
        "teacher_levels": (),
        "exclude": "attention|embed",  # the MLP weights only (fc1, fc2)
    })
    config.fine_tune = ml_collections.ConfigDict({
        "student": {"epochs": 1, "lr_scale": 0.1, "prune_update_every": 20},
        "teacher": {"epochs": 1, "lr_scale": 0.1, "prune_update_every": 20},
    })
    config.quant = ml_collections.ConfigDict({
        "calibration_batches": 4,     # x 256 training windows
        "qat_epochs": 1,
        "qat_models": (),
        # The projections and the MLP; the tied embedding stays float.
        "module_path": r".*/(query|key|value|out|fc1|fc2)",
    })
    if preset == "smoke":             # seconds, for tests (mocked text)
        config.seeds = (0,)
        for role, width in (("teacher", 32), ("student", 16)):
            config[role].config = "configs/shakespeare_gpt.py:smoke"
            config[role].overrides.num_epochs = 2
            config[role].overrides.batch_size = 8
            config[role].overrides.model_kwargs.update(
                {"num_layers": 1, "width": width, "num_heads": 2})
        config.quant.calibration_batches = 1
        config.fine_tune.teacher.prune_update_every = 2
    elif preset:
        raise ValueError(f"Unknown preset {preset!r} for compress_gpt; choose from "
                         "['smoke'] or none")
    return config
