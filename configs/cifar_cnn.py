"""The classic CIFAR-10 CNN (LeNet) with SGD + momentum: the seed's recipe.

Pixels scaled to [0, 1], no augmentation, SGD lr 0.001 momentum 0.9, batch 4,
10 epochs, the whole test split evaluated after every epoch.

python -m research.main --config=configs/cifar_cnn.py --workdir=runs/cifar_cnn
python -m research.main --config=configs/cifar_cnn.py:smoke --workdir=runs/smoke
python -m research.main --config=configs/cifar_cnn.py --config.batch_size=128 \
    --config.num_epochs=2 --config.learning_rate=0.01 --config.seed=1
"""
import ml_collections


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """Returns the experiment config; `preset` is the part after the colon."""
    config = ml_collections.ConfigDict()
    config.seed = 0                   # the init, dropout and data-order keys
    # Data.
    config.dataset = "cifar10"        # key of input_pipeline.DATASETS
    config.data_dir = ""              # TFDS data_dir; "": $TFDS_DATA_DIR or the default
    config.download = False           # let TFDS download when the data is not prepared
    config.train_split = "train"      # TFDS split (slicing allowed, e.g. "train[:10%]")
    config.eval_split = "test"        # evaluated whole after every epoch
    # Input path: "memory" reads a split whole onto the devices; "stream" reads
    # each step's rows from ArrayRecord files (python -m research.convert);
    # "auto" streams a converted split larger than stream.memory_limit_mb per
    # process. Both paths give the same batches (README, "Data larger than memory").
    config.input = "auto"
    config.stream = ml_collections.ConfigDict({
        "dir": "",                    # converted data; "": $RESEARCH_STREAM_DIR
        "memory_limit_mb": 4096.0,    # "auto": larger splits stream
        "threads": 2,                 # reader threads per process (Grain)
        "prefetch_steps": 16,         # batches read ahead on the host
        "device_prefetch": 2,         # chunks of steps placed on the devices ahead
    })
    # Model.
    config.model = "lenet"            # key of models.MODELS
    # conv_impl: "auto" runs the convolutions in the C++ CPU kernel where it is
    # built and JAX is on the CPU, else in XLA; "xla" or "kernel" to force.
    config.model_kwargs = ml_collections.ConfigDict({"num_classes": 10,
                                                     "conv_impl": "auto"})
    # Objective: "" is the dataset's own (classification: cross-entropy).
    config.objective = ""             # key of objectives.OBJECTIVES
    config.objective_kwargs = ml_collections.ConfigDict({"label_smoothing": 0.0})
    # Augmentation, on device and keyed by (seed, step, example); see augment.py.
    config.augment = ml_collections.ConfigDict({
        "flip": "none",               # "none", "random" or "alternating"
        "translate": 0,               # pixels of reflect padding + random crop
        "cutout": 0,                  # side of a zeroed square; 0: off
        "eval_views": "identity",     # test-time augmentation: "identity", "flip",
        #                               "flip_translate" (augment.EVAL_VIEWS)
        "final_eval_views": "",       # for the run's last evaluation; "": the same
    })
    # Optimisation.
    config.optimizer = "sgd"          # key of state.OPTIMIZERS
    config.learning_rate = 0.001
    config.momentum = 0.9             # SGD momentum; 0 for plain SGD
    config.lr_schedule = "constant"   # key of optimizers.LR_SCHEDULES: constant,
    #                                   cosine or linear (decay to end_learning_rate)
    config.warmup_steps = 0           # linear warmup ...
    config.warmup_fraction = 0.0      # ... or over this fraction of the run (if > 0)
    config.warmup_start_factor = 0.0  # the warmup starts at this x learning_rate
    config.end_learning_rate = 0.0    # where "cosine" and "linear" end
    config.nesterov = False           # Nesterov momentum (SGD)
    config.weight_decay = 0.0         # decay per step at the peak lr (optimizers.py)
    # Per-group learning-rate multipliers: name -> {pattern (regex on paths like
    # "Conv_0/kernel"), lr_scale (0: frozen), train_epochs (frozen after; 0: all)}.
    config.param_groups = ml_collections.ConfigDict()
    config.grad_clip_norm = 0.0       # clip gradients to this global norm; 0: off
    config.batch_size = 4             # global batch size, over all devices
    config.grad_accum_steps = 1       # micro-batches per step: same update, less memory
    config.ema_decay = 0.0            # evaluate an EMA of the weights; 0: off
    # Lookahead (airbench): every `every` steps pull the weights to a slow copy.
    config.lookahead = ml_collections.ConfigDict({"every": 0, "decay": 0.95})
    config.init_from = ""             # start from this workdir's model (fine-tune)
    # Compression (research/compression/): magnitude pruning wrapped around
    # the optimizer, quantization-aware training. Off by default.
    config.prune = ml_collections.ConfigDict({
        "sparsity": 0.0,              # final fraction of kernel weights pruned; 0: off
        "schedule": "cubic",          # "cubic" (gradual, Zhu & Gupta) or "one_shot"
        "scope": "layer",             # rank magnitudes per "layer" or "global"ly
        "begin_step": 0,              # first mask update
        "end_step": 0,                # cubic: final sparsity reached; 0: 3/4 of the run
        "update_every": 100,          # steps between mask updates
        "exclude": "",                # regex of parameter paths never pruned
    })
    config.quant = ml_collections.ConfigDict({
        "qat": False,                 # train through int8 fake quantization (qwix)
    })
    config.num_epochs = 10
    # Devices.
    config.num_devices = 0            # devices on the mesh's data axis; 0: all
    # Data parallelism (research/diloco.py): "sync" all-reduces the gradients
    # every step; "diloco" trains `replicas` copies (each a group of devices)
    # that average their parameter changes every `sync_every` steps into an
    # outer Nesterov SGD step; `delayed` applies each average one period late.
    config.data_parallel = ml_collections.ConfigDict({
        "scheme": "sync",             # "sync" or "diloco"
        "replicas": 4,                # diloco: K, dividing the device count
        "sync_every": 16,             # diloco: H inner steps between syncs
        "outer_learning_rate": 0.7,   # diloco: the outer SGD's (paper: 0.7)
        "outer_momentum": 0.9,        # diloco: Nesterov momentum (paper: 0.9)
        "delayed": False,             # diloco: overlap the outer step with a period
    })
    # Loop and bookkeeping.
    config.eval_batch_size = 1000     # the last eval batch is padded and masked
    config.steps_per_call = 4         # steps unrolled per jitted call (1-64), README
    config.log_every_steps = 2500     # progress line and train metrics
    config.checkpoint_every_steps = 2500  # also saved at every epoch end and at the end
    config.keep_checkpoints = 3       # most recent checkpoints kept

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
