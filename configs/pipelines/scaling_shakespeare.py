"""Scaling laws of the character GPT on Tiny Shakespeare (research.scaling).

python -m research.scaling --config=configs/pipelines/scaling_shakespeare.py:cpu \
    --workdir=runs/scaling
python -m research.scaling --config=configs/pipelines/scaling_shakespeare.py:cpu \
    --workdir=runs/scaling --heldout     # then predict, and run, the held-out point

A grid of model sizes (name -> model_kwargs) by compute budgets (training
FLOPs, XLA's count of the compiled step times the steps). One recipe for
every run (Adam, peak lr 2e-3, warmup over 5% of the run, cosine to a tenth,
bf16 compute, no dropout); only the size and the number of steps change.
`heldout`: a budget beyond the grid's and a size, predicted from the fits
before it is trained. docs/scaling.md has the measured grid.
"""
import ml_collections


def _size(layers: int, width: int, heads: int) -> dict:
    return {"num_layers": layers, "width": width, "num_heads": heads}


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    grid = ml_collections.ConfigDict()
    grid.config = "configs/shakespeare_gpt.py:cpu"
    grid.overrides = ml_collections.ConfigDict({
        "batch_size": 32, "seq_len": 128,
        "model_kwargs": {"context": 128, "dropout_rate": 0.0, "dtype": "bfloat16"},
        "learning_rate": 2e-3, "adam_b2": 0.99, "lr_schedule": "cosine",
        "warmup_steps": 0, "warmup_fraction": 0.05, "end_learning_rate": 2e-4,
        "log_every_steps": 100, "checkpoint_every_steps": 2000,
        "keep_checkpoints": 1})
    # Non-embedding parameters from 25 thousand to 1.8 million (72x).
    grid.sizes = ml_collections.ConfigDict({
        "L2_w32": _size(2, 32, 2), "L2_w48": _size(2, 48, 3),
        "L2_w64": _size(2, 64, 4), "L3_w96": _size(3, 96, 3),
        "L4_w128": _size(4, 128, 4), "L4_w192": _size(4, 192, 4)})
    grid.budgets = (1.5e12, 3.2e12, 7e12, 1.5e13)  # 10x
    # Budgets of the compute-optimal table (scaling_results.md): up to 100x
    # the grid's largest; beyond, Tiny Shakespeare's million characters would
    # be repeated thousands of times, which no fit here has seen.
    grid.table_budgets = (1e13, 3e13, 1e14, 3e14, 1e15)
    grid.bootstrap_replicas = 200
    grid.heldout = ml_collections.ConfigDict({
        "size": "L4_w256", "budget": 1e14,
        "sizes": {"L4_w256": _size(4, 256, 4)}})  # sizes only the held-out run uses
    if preset in (None, "cpu"):  # about an hour of the 2-core CPU
        pass
    elif preset == "gpu":  # nanoGPT-sized models, 100x the budgets
        grid.overrides.batch_size = 64
        grid.overrides.seq_len = 256
        grid.overrides.model_kwargs.context = 256
        grid.sizes = ml_collections.ConfigDict({
            "L4_w128": _size(4, 128, 4), "L4_w192": _size(4, 192, 4),
            "L6_w256": _size(6, 256, 4), "L6_w384": _size(6, 384, 6),
            "L8_w512": _size(8, 512, 8), "L12_w768": _size(12, 768, 12)})
        grid.budgets = (1.5e14, 3.2e14, 7e14, 1.5e15)
        grid.table_budgets = (1e15, 1e16, 1e17)
        grid.heldout.size, grid.heldout.budget = "L8_w512", 1e16
        grid.heldout.sizes = {}
    elif preset == "smoke":  # seconds, for tests
        grid.overrides.seq_len = 16
        grid.overrides.model_kwargs.context = 16
        grid.overrides.batch_size = 8
        grid.sizes = ml_collections.ConfigDict({
            "L1_w16": _size(1, 16, 2), "L1_w24": _size(1, 24, 2),
            "L1_w32": _size(1, 32, 2)})
        grid.budgets = (1e8, 2e8)
        grid.table_budgets = (1e9, 1e12)
        grid.bootstrap_replicas = 5
        grid.heldout = ml_collections.ConfigDict({
            "size": "L1_w32", "budget": 4e8, "sizes": {}})
    else:
        raise ValueError(f"Unknown preset {preset!r}; choose from ['cpu', 'gpu', "
                         "'smoke'] or none (cpu)")
    return grid
