"""The seed's LeNet recipe read from memory and streamed from converted
ArrayRecord files: the same batches, so the same accuracy and loss, and the
wall time each path takes (`lenet_seeds.py`'s sweep with other variants;
no choice is made, the evaluation split is the recipe's test split).

python -m research.convert --dataset=cifar10 --out_dir=runs/stream \
    --output=runs/stream/convert.json
RESEARCH_STREAM_DIR=runs/stream python -m research.sweep \
    --config=configs/pipelines/streaming_pairs.py --workdir=runs/streaming_pairs

docs/streaming.md quotes its table (docs/results/streaming_pairs_results.*).
Run it on a quiet machine: the times are half of the point.
"""
import ml_collections

from configs.pipelines import lenet_seeds


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    sweep = lenet_seeds.get_config(preset)
    sweep.variants = ml_collections.ConfigDict({
        "memory": {"input": "memory"},
        "stream": {"input": "stream"},  # from $RESEARCH_STREAM_DIR
    })
    sweep.order = ("memory", "stream")
    sweep.seeds = (0, 1)
    sweep.baseline = "memory"
    sweep.seeded = ("stream",)
    return sweep
