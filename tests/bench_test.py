"""`python -m research.bench` end to end on tiny settings (a subprocess:
its flags clash with research.main's), for an image and a text model."""
import json
import os
import subprocess
import sys

import pytest

from tests import conftest


@pytest.mark.parametrize("config, batch, extra", [
    ("cifar_cnn.py:smoke", "8", []),
    ("shakespeare_rnn.py:smoke", "8", ["--rnn_sizes=1x16"]),
])
def test_benchmark_reports_every_number(tmp_path, config, batch, extra):
    output = str(tmp_path / "bench.json")
    proc = subprocess.run(
        [sys.executable, "-m", "research.bench", f"--config=configs/{config}",
         f"--batch_sizes={batch}", "--steps=2", "--repeats=1", "--notorch",
         f"--output={output}", *extra],
        cwd=conftest.REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": conftest.REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(output) as f:
        records = json.load(f)
    assert len(records) == 1 and records[0]["framework"] == "jax"
    for key in ("train_per_sec", "eval_per_sec", "step_ms", "mfu"):
        assert records[0][key] > 0, records
    assert "jax/torch" in proc.stdout
