"""DiLoCo against synchronous data parallelism on Tiny Shakespeare (a sweep).

XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python -m research.sweep --config=configs/pipelines/diloco_lstm.py \
        --workdir=runs/diloco_lstm

A 1 x 256 character LSTM (Adam inside, as DiLoCo's paper has AdamW) on 8
devices, K = 4 replicas of 2 devices; XLA's LSTM for every variant (the C++
kernel is not used under DiLoCo), the same steps and global batch.
"""
import ml_collections

from configs.pipelines import diloco_cifar


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    sweep = ml_collections.ConfigDict()
    sweep.config = "configs/shakespeare_rnn.py"
    sweep.overrides = ml_collections.ConfigDict({
        "model_kwargs": {"hidden_size": 256, "num_layers": 1, "lstm_impl": "xla"},
        "num_devices": 8, "num_epochs": 6, "warmup_steps": 50,
        "data_parallel": {"replicas": 4},
        "log_every_steps": 100, "checkpoint_every_steps": 1000})
    sweep.variants = diloco_cifar.variants()
    sweep.order = ("sync", "diloco_h4", "diloco_h16", "diloco_h64",
                   "diloco_h16_nesterov", "diloco_h16_nesterov_m08",
                   "diloco_h16_delayed", "diloco_h16_nesterov_delayed")
    # Scored on Tiny Shakespeare's validation split (the base config's);
    # the outer momentum chosen there, the test split scored once after.
    sweep.seeds = (0, 1, 2)
    sweep.baseline = "sync"
    sweep.choose = ml_collections.ConfigDict({
        "among": ("diloco_h16_nesterov", "diloco_h16_nesterov_m08"),
        "metric": "loss", "higher": False})
    sweep.test_split = "test"
    if preset == "smoke":
        sweep.overrides.num_epochs = 1
        sweep.seeds = (0, 1)
        sweep.order = ("sync", "diloco_h16")
    elif preset:
        raise ValueError(f"Unknown preset {preset!r}; choose from ['smoke'] or none")
    return sweep
