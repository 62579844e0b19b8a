"""Character-level LSTM language model of Tiny Shakespeare.

python -m research.main --config=configs/shakespeare_rnn.py:cpu --workdir=runs/rnn
python -m research.main --config=configs/shakespeare_rnn.py:smoke --workdir=runs/smoke
python -m research.main --config=configs/shakespeare_rnn.py --workdir=runs/rnn \
    --mode=sample --config.sample.prompt='ROMEO:'
python -m research.main --workdir=runs/rnn --mode=eval --config.eval_split=test
"""
import ml_collections

from research import assembly


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """Returns the experiment config; `preset` is the part after the colon."""
    config = assembly.base_config("text")
    config.dataset = "tiny_shakespeare"  # the vocabulary is built from "train"
    config.eval_split = "validation"  # scored whole after every epoch
    # This text is one TFDS record cut into windows (config.seq_len, default
    # 128): it has no streamed rows, so input "auto" keeps it in memory.
    config.model = "char_rnn"
    config.model_kwargs = ml_collections.ConfigDict({
        "vocab_size": 65,             # must equal the training text's characters
        "cell": "lstm",               # "lstm" or "gru"
        "embed_dim": 64,
        "hidden_size": 512,
        "num_layers": 2,
        "dropout_rate": 0.2,          # between layers and before the head
        "lstm_impl": "auto",          # "auto": the C++ CPU kernel where built; "xla"
    })
    config.optimizer = "adam"
    config.learning_rate = 2e-3       # peak, after the warmup
    config.momentum = 0.0             # SGD only
    config.lr_schedule = "cosine"
    config.warmup_steps = 100
    config.end_learning_rate = 1e-4
    config.grad_clip_norm = 5.0
    config.batch_size = 64            # windows per step, over all devices
    config.num_epochs = 30            # an epoch: the training text once (~122 steps)
    config.eval_batch_size = 16       # contiguous streams the eval text is cut into
    config.steps_per_call = 1
    config.log_every_steps = 50
    config.checkpoint_every_steps = 250

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
