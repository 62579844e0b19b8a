"""Test setup: CPU only, quiet TensorFlow, one compilation cache, no leaked
processes. Helpers shared by the test files are in tests/helpers.py."""
import os
import subprocess
import tempfile

import pytest

# Before jax or tensorflow load anywhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
# One compilation cache for the session (subprocesses inherit it): the suite
# compiles the same small steps many times. Decoded splits are cached there
# too, away from the user's ~/.cache.
_CACHE = tempfile.mkdtemp(prefix="research-tests-")
os.environ.setdefault("RESEARCH_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_CACHE, "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


@pytest.fixture(autouse=True)
def _kill_leftover_processes(monkeypatch):
    """Every process a test starts is gone when it ends, whether it passed,
    failed or timed out: no test leaks into another."""
    started = []
    init = subprocess.Popen.__init__

    def tracked_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        started.append(self)

    monkeypatch.setattr(subprocess.Popen, "__init__", tracked_init)
    yield
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
