"""DiLoCo against synchronous data parallelism on CIFAR-10 (a sweep).

XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python -m research.sweep --config=configs/pipelines/diloco_cifar.py \
        --workdir=runs/diloco_cifar

The BatchNorm ConvNet (narrowed to 16/32/64 channels to fit the 2-core CPU)
on 8 devices, K = 4 replicas of 2 devices, the same steps and global batch
for every variant; see research/sweep.py and docs/diloco.md.
"""
import ml_collections


# Outer (learning rate, momentum) settings at H = 16 that a sweep chooses
# among on validation data: the paper's (0.7, 0.9) and three more.
OUTER = {"diloco_h16_nesterov": (0.7, 0.9), "diloco_h16_nesterov_m08": (0.7, 0.8),
         "diloco_h16_nesterov_lr1_m08": (1.0, 0.8),
         "diloco_h16_nesterov_lr09_m09": (0.9, 0.9)}


def variants(h_values=(4, 16, 64), h=16) -> ml_collections.ConfigDict:
    """sync; DiLoCo at each H with outer SGD lr 1 and no momentum (plain
    averaging of the replicas); the paper's outer Nesterov (0.7, 0.9) at the
    larger H; at H = `h`, the other outer settings of OUTER and the delayed
    (overlapped) variant with plain averaging and the paper's rule."""
    def diloco(every, lr, momentum, delayed=False):
        return {"data_parallel": {"scheme": "diloco", "sync_every": every,
                                  "outer_learning_rate": lr,
                                  "outer_momentum": momentum, "delayed": delayed}}
    out = {"sync": {"data_parallel": {"scheme": "sync"}}}
    for every in h_values:
        out[f"diloco_h{every}"] = diloco(every, 1.0, 0.0)
    for every in h_values[1:]:
        out[f"diloco_h{every}_nesterov"] = diloco(every, 0.7, 0.9)
    for name, (lr, momentum) in OUTER.items():
        out[name.replace("h16", f"h{h}")] = diloco(h, lr, momentum)
    out[f"diloco_h{h}_delayed"] = diloco(h, 1.0, 0.0, delayed=True)
    out[f"diloco_h{h}_nesterov_delayed"] = diloco(h, 0.7, 0.9, delayed=True)
    return ml_collections.ConfigDict(out)


def order(h_values=(4, 16, 64), h=16) -> tuple[str, ...]:
    """The variants' names in table order (ConfigDict keeps keys sorted)."""
    return ("sync", *(f"diloco_h{every}" for every in h_values),
            *(f"diloco_h{every}_nesterov" for every in h_values[1:]),
            *(n.replace("h16", f"h{h}") for n in list(OUTER)[1:]),
            f"diloco_h{h}_delayed",
            f"diloco_h{h}_nesterov_delayed")


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    sweep = ml_collections.ConfigDict()
    sweep.config = "configs/cifar_convnet.py"
    sweep.overrides = ml_collections.ConfigDict({
        "model_kwargs": {"features": (16, 32, 64)},
        # Validation: the last 5,000 training images, never trained on; the
        # test split is scored once, after the choice (sweep.test_split).
        "train_split": "train[:45000]", "eval_split": "train[45000:]",
        "num_devices": 8, "num_epochs": 4, "steps_per_call": 4,
        # A cosine decay (the inner schedule, as in the paper): the constant
        # rate left the last epoch's accuracy swinging by several points.
        "lr_schedule": "cosine", "end_learning_rate": 0.0,
        "data_parallel": {"replicas": 4},
        "log_every_steps": 130, "checkpoint_every_steps": 1000})
    sweep.variants = variants()
    sweep.order = order()             # run and table order (a subset is fine)
    sweep.seeds = (0, 1, 2)           # the baseline and the candidates: each
    sweep.baseline = "sync"
    sweep.choose = ml_collections.ConfigDict({
        "among": tuple(OUTER), "metric": "accuracy", "higher": True})
    sweep.test_split = "test"
    if preset == "smoke":
        sweep.overrides.train_split = "train[:512]"
        sweep.overrides.eval_split = "train[512:768]"
        sweep.test_split = "test[:256]"
        sweep.overrides.num_epochs = 1
        sweep.seeds = (0, 1)
        sweep.order = ("sync", "diloco_h16")
        sweep.choose.among = tuple(OUTER)[:2]
    elif preset:
        raise ValueError(f"Unknown preset {preset!r}; choose from ['smoke'] or none")
    return sweep
