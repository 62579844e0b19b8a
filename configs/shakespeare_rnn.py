"""Character-level LSTM language model of Tiny Shakespeare.

python -m research.main --config=configs/shakespeare_rnn.py:cpu --workdir=runs/rnn
python -m research.main --config=configs/shakespeare_rnn.py:smoke --workdir=runs/smoke
python -m research.main --config=configs/shakespeare_rnn.py --workdir=runs/rnn \
    --mode=sample --config.sample.prompt='ROMEO:'
python -m research.main --workdir=runs/rnn --mode=eval --config.eval_split=test
"""
import ml_collections


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """Returns the experiment config; `preset` is the part after the colon."""
    config = ml_collections.ConfigDict()
    config.seed = 0                   # the init, dropout and data-order keys
    # Data.
    config.dataset = "tiny_shakespeare"  # key of input_pipeline.DATASETS
    config.data_dir = ""              # TFDS data_dir; "": $TFDS_DATA_DIR or the default
    config.download = False           # let TFDS download when the data is not prepared
    config.train_split = "train"      # the vocabulary is built from "train"
    config.eval_split = "validation"  # scored whole after every epoch
    config.seq_len = 128              # characters per training window (BPTT length)
    # Input path: "memory" reads a split whole onto the devices; "stream" reads
    # each step's rows from ArrayRecord files (python -m research.convert);
    # "auto" streams a converted split larger than stream.memory_limit_mb per
    # process. Both paths give the same batches (README, "Data larger than memory").
    # This text is one TFDS record cut into windows: it has no streamed rows,
    # so "auto" keeps it in memory and "stream" is refused.
    config.input = "auto"
    config.stream = ml_collections.ConfigDict({
        "dir": "",                    # converted data; "": $RESEARCH_STREAM_DIR
        "memory_limit_mb": 4096.0,    # "auto": larger splits stream
        "threads": 2,                 # reader threads per process (Grain)
        "prefetch_steps": 16,         # batches read ahead on the host
        "device_prefetch": 2,         # chunks of steps placed on the devices ahead
    })
    # Model.
    config.model = "char_rnn"         # key of models.MODELS
    config.model_kwargs = ml_collections.ConfigDict({
        "vocab_size": 65,             # must equal the training text's characters
        "cell": "lstm",               # "lstm" or "gru"
        "embed_dim": 64,
        "hidden_size": 512,
        "num_layers": 2,
        "dropout_rate": 0.2,          # between layers and before the head
        "lstm_impl": "auto",          # "auto": the C++ CPU kernel where built; "xla"
    })
    config.objective = ""             # "": the dataset's (next-character prediction)
    config.objective_kwargs = ml_collections.ConfigDict()
    # Optimisation.
    config.optimizer = "adam"         # key of state.OPTIMIZERS
    config.learning_rate = 2e-3       # peak, after the warmup
    config.momentum = 0.0             # SGD only
    config.lr_schedule = "cosine"     # key of optimizers.LR_SCHEDULES: constant,
    #                                   cosine or linear (decay to end_learning_rate)
    config.warmup_steps = 100         # linear warmup ...
    config.warmup_fraction = 0.0      # ... or over this fraction of the run (if > 0)
    config.warmup_start_factor = 0.0  # the warmup starts at this x learning_rate
    config.end_learning_rate = 1e-4   # where "cosine" and "linear" end
    config.nesterov = False           # Nesterov momentum (SGD)
    config.weight_decay = 0.0         # decay per step at the peak lr (optimizers.py)
    # Per-group learning-rate multipliers: name -> {pattern (regex on paths like
    # "head/kernel"), lr_scale (0: frozen), train_epochs (frozen after; 0: all)}.
    config.param_groups = ml_collections.ConfigDict()
    config.grad_clip_norm = 5.0       # clip gradients to this global norm; 0: off
    config.batch_size = 64            # windows per step, over all devices
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
    config.num_epochs = 30            # an epoch: the training text once (~122 steps)
    # Devices and loop.
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
    config.eval_batch_size = 16       # contiguous streams the eval text is cut into
    config.steps_per_call = 1         # steps unrolled per jitted call (1-64), README
    config.log_every_steps = 50       # progress line and train metrics
    config.checkpoint_every_steps = 250  # also saved at every epoch end and at the end
    config.keep_checkpoints = 3       # most recent checkpoints kept
    # --mode=sample.
    config.sample = ml_collections.ConfigDict({
        "prompt": "ROMEO:",           # text to continue; its characters must be known
        "length": 500,                # characters to generate
        "temperature": 0.8,           # 0: greedy (argmax)
        "top_k": 0,                   # sample from the k likeliest; 0: all
        "seed": 0,                    # same seed, same text
    })

    if preset == "cpu":               # about 28 minutes on the 2-core CPU (C++ LSTM)
        config.num_epochs = 12
    elif preset == "smoke":           # seconds-long run for tests
        config.seq_len = 32
        config.model_kwargs.embed_dim = 16
        config.model_kwargs.hidden_size = 32
        config.model_kwargs.num_layers = 1
        config.batch_size = 64
        config.num_epochs = 1
        config.warmup_steps = 10
        config.log_every_steps = 100
        config.checkpoint_every_steps = 200
        config.sample.length = 100
    elif preset:
        raise ValueError(f"Unknown preset {preset!r} for shakespeare_rnn; choose "
                         "from ['cpu', 'smoke'] or none")
    return config
