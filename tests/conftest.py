"""Test setup: CPU only, quiet TensorFlow, shared helpers as fixtures."""
import os
import tempfile

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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
