"""The seed's LeNet recipe read from memory and streamed from converted
ArrayRecord files: the same batches, so the same accuracy and loss, and the
wall time each path takes (a sweep; no choice is made, the evaluation split
is the recipe's test split).

python -m research.convert --dataset=cifar10 --out_dir=runs/stream \
    --output=runs/stream/convert.json
RESEARCH_STREAM_DIR=runs/stream python -m research.sweep \
    --config=configs/pipelines/streaming_pairs.py --workdir=runs/streaming_pairs

docs/streaming.md quotes its table (docs/results/streaming_pairs_results.*).
Run it on a quiet machine: the times are half of the point.
"""
import ml_collections


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    sweep = ml_collections.ConfigDict()
    sweep.config = "configs/cifar_cnn.py"
    sweep.overrides = ml_collections.ConfigDict({"checkpoint_every_steps": 12500})
    sweep.variants = ml_collections.ConfigDict({
        "memory": {"input": "memory"},
        "stream": {"input": "stream"},  # from $RESEARCH_STREAM_DIR
    })
    sweep.order = ("memory", "stream")
    sweep.seeds = (0, 1)
    sweep.baseline = "memory"
    sweep.seeded = ("stream",)
    sweep.choose = ml_collections.ConfigDict({
        "among": (), "metric": "accuracy", "higher": True})
    sweep.test_split = ""             # the runs' own eval split is the test split
    if preset == "smoke":
        sweep.overrides.train_split = "train[:256]"
        sweep.overrides.eval_split = "test[:128]"
        sweep.overrides.num_epochs = 1
    elif preset:
        raise ValueError(f"Unknown preset {preset!r}; choose from ['smoke'] or none")
    return sweep
