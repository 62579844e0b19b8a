"""A character-level GPT (decoder-only Transformer) on Tiny Shakespeare.

python -m research.main --config=configs/shakespeare_gpt.py:cpu --workdir=runs/gpt
python -m research.main --config=configs/shakespeare_gpt.py:smoke --workdir=runs/smoke
python -m research.main --config=configs/shakespeare_gpt.py:cpu --workdir=runs/gpt \
    --mode=sample --config.sample.prompt='ROMEO:'
XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python -m research.main --config=configs/shakespeare_gpt.py:smoke \
    --config.data_parallel.scheme=sharded --config.sharding.fsdp=2 \
    --config.sharding.tensor=2 --workdir=runs/gpt_sharded

The default is nanoGPT's Shakespeare model (6 layers, width 384, 6 heads,
256 characters of context); `gpu` runs it in bfloat16 on float32 master
weights; `cpu` (4 layers of width 192, context 128, bf16 compute) is sized
for 30 minutes of the 2-core CPU. Layout over devices:
`data_parallel.scheme="sharded"` with `config.sharding` (parallel/sharded.py).
"""
import ml_collections

from research import assembly


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """Returns the experiment config; `preset` is the part after the colon."""
    config = assembly.base_config("text")
    config.dataset = "tiny_shakespeare"
    config.eval_split = "validation"
    config.seq_len = 256              # characters per window: the model's context
    config.eval_windows = True        # evaluated in windows too (a fixed context)
    config.model = "gpt"
    config.model_kwargs = ml_collections.ConfigDict({
        "vocab_size": 65,             # the training text's characters
        "num_layers": 6,
        "width": 384,
        "num_heads": 6,
        "context": 256,               # >= seq_len; the sampling cache's length
        "mlp_ratio": 4,
        "dropout_rate": 0.2,
        "tie_embeddings": True,
        "dtype": "float32",           # compute; "bfloat16" on float32 params
        "param_dtype": "float32",
        "remat": "none",              # or "full", "dots_saveable", ...
    })
    config.optimizer = "adam"
    config.learning_rate = 1e-3
    config.momentum = 0.0
    config.lr_schedule = "cosine"
    config.warmup_steps = 100
    config.end_learning_rate = 1e-4
    config.grad_clip_norm = 1.0
    config.batch_size = 64
    config.num_epochs = 60            # an epoch: every window once (~61 steps)
    config.eval_batch_size = 64       # windows per evaluation batch
    config.steps_per_call = 1
    config.log_every_steps = 50
    config.checkpoint_every_steps = 250

    if preset == "gpu":
        config.model_kwargs.dtype = "bfloat16"
        config.steps_per_call = 4
    elif preset == "cpu":             # sized for 30 minutes of the 2-core CPU
        # (docs/big_models.md: three settings tried, this one best on validation)
        config.seq_len = 128
        config.model_kwargs.update({"num_layers": 4, "width": 192, "num_heads": 4,
                                    "context": 128, "dropout_rate": 0.1,
                                    "dtype": "bfloat16"})
        config.learning_rate = 2e-3
        config.adam_b2 = 0.99
        config.warmup_steps = 200
        config.num_epochs = 17        # ~122 steps an epoch; ~28 minutes here
        # Each step cuts its windows at random places in rows 128 characters
        # longer: validation 1.441 against 1.460 with fixed windows (big_models.md).
        config.window_jitter = 128
    elif preset == "smoke":           # seconds, for tests
        config.seq_len = 64
        config.model_kwargs.update({"num_layers": 2, "width": 32, "num_heads": 4,
                                    "context": 64, "dropout_rate": 0.0})
        config.batch_size = 64
        config.num_epochs = 1         # ~245 steps
        config.warmup_steps = 4
        config.log_every_steps = 20
        config.checkpoint_every_steps = 100
        config.sample.length = 50
    elif preset:
        raise ValueError(f"Unknown preset {preset!r} for shakespeare_gpt; choose "
                         "from ['gpu', 'cpu', 'smoke'] or none")
    return config
