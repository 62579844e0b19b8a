"""`python -m research.bench` end to end on tiny settings (a subprocess:
its own process), for an image model, a recurrent and a Transformer text
model; its bad flags."""
import json
import os
import subprocess
import sys

import pytest

from research import bench_tables
from tests import helpers


@pytest.mark.parametrize("config, batch, extra", [
    ("cifar_cnn.py:smoke", "8", []),
    ("cifar_cnn.py:smoke", "8", ["--inputs=memory,stream"]),
    ("shakespeare_rnn.py:smoke", "8", ["--rnn_sizes=1x16"]),
    ("shakespeare_gpt.py:smoke", "8", []),
    ("cifar_cnn.py:smoke", "8", ["--runs=2"]),
])
def test_benchmark_reports_every_number(tmp_path, config, batch, extra):
    output = str(tmp_path / "bench.json")
    proc = subprocess.run(
        [sys.executable, "-m", "research.bench", f"--config=configs/{config}",
         f"--batch_sizes={batch}", "--steps=2", "--repeats=1", "--notorch",
         f"--output={output}", *extra],
        cwd=helpers.REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": helpers.REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(output) as f:
        written = json.load(f)
    records = written["records"]
    streamed = [r for r in records if r.get("input") == "stream"]
    assert len(streamed) == (1 if extra == ["--inputs=memory,stream"] else 0)
    records = [r for r in records if r not in streamed]
    runs = 2 if "--runs=2" in extra else 1
    assert len(records) == runs and {r["framework"] for r in records} == {"jax"}
    # Each file says which machine measured it (never compare two by accident).
    about = written["about"]
    assert about["machine"] and about["matmul_peak_flops"] > 0 and about["commit"]
    for key in ("train_per_sec", "eval_per_sec", "step_ms", "mfu"):
        assert records[0][key] > 0, records
    assert "train JAX : PyTorch" in proc.stdout
    # Its Markdown twin: the same row, and the command and commit that made it.
    with open(output[:-len(".json")] + ".md") as f:
        table = f.read()
    assert table.startswith("<!-- written by: python -m research.bench ")
    assert about["commit"] in table and f"| {batch} | jax | 1 |" in table
    assert ("Streaming input" in table) == bool(streamed)
    assert ("Medians over 2 runs" in table) == (runs == 2)


def test_medians_pair_each_run_with_its_own_pytorch_twin():
    def rec(framework, run, train, mfu=0.5):
        return {"config": "lenet", "batch_size": 4, "devices": 1, "run": run,
                "framework": framework, "train_per_sec": train,
                "eval_per_sec": 2 * train, "mfu": mfu}
    records = [rec("jax", 0, 300), rec("torch", 0, 150), rec("jax", 1, 100),
               rec("torch", 1, 50), rec("jax", 2, 400), rec("torch", 2, 100)]
    lines = bench_tables.medians(records, "img/s")
    assert lines[0] == "Medians over 3 runs (in brackets: each run's ratio):"
    # Each run against its own twin (2, 2, 4; pairing with run 0's PyTorch
    # would give 2, 0.67, 2.67), and the median of those ratios, 2, not the
    # ratio of the medians (300 / 100).
    assert lines[-1].startswith(
        "| lenet | 4 | 1 | 300 | 100 | **2.00** (2.00, 2.00, 4.00) | 600 | 200 | "
        "**2.00** (2.00, 2.00, 4.00) | 50.0% |"), lines[-1]


@pytest.mark.parametrize("flag, message", [
    ("--batch_sizes=0", "--batch_sizes=['0']: must be positive integers"),
    ("--batch_sizes=-4", "must be positive integers"),
    ("--batch_sizes=abc", "must be positive integers"),
    ("--batch_sizes=", "must be positive integers"),
    ("--inputs=foo", "--inputs=['foo']: must be some of memory,stream"),
    ("--rnn_sizes=2by3", "must be LAYERSxHIDDEN sizes"),
])
def test_bad_flags_are_one_line_errors(flag, message):
    proc = subprocess.run(
        [sys.executable, "-m", "research.bench", "--config=configs/cifar_cnn.py:smoke",
         flag, "--notorch"], cwd=helpers.REPO, capture_output=True, text=True,
        timeout=120, env={**os.environ, "PYTHONPATH": helpers.REPO})
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and not proc.stdout
