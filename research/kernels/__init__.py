"""Optional C++ CPU kernels, compiled at install time (setup.py) and called
through `jax.ffi`. Everything that uses them has an XLA fallback."""
import ctypes
import functools
import glob
import os

import jax

_TARGETS = {"research_conv_fwd": "ResearchConvFwd",
            "research_conv_dw": "ResearchConvDw",
            "research_bias_relu_pool": "ResearchBiasReluPool",
            "research_bias_relu_pool_grad": "ResearchBiasReluPoolGrad",
            "research_lstm_fwd": "ResearchLstmFwd",
            "research_lstm_bwd": "ResearchLstmBwd"}
IMPLS = ("auto", "kernel", "xla")
DATA_AXIS = "data"  # parallel.DATA_AXIS (models do not import the trainer)


@functools.cache
def load_error() -> str | None:
    """Registers the kernels with XLA once; None when they are ready, else why
    they are not (they were not built, or the library does not load here)."""
    libs = glob.glob(os.path.join(os.path.dirname(__file__), "_conv_kernels*.so"))
    if not libs:
        return ("research/kernels/_conv_kernels*.so was not built; reinstall with "
                "a C++ compiler (pip install -e .) to get the fast CPU kernels")
    try:
        lib = ctypes.CDLL(libs[0])
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
    except (OSError, AttributeError) as e:
        return f"could not load {libs[0]}: {e}"
    return None


def available() -> bool:
    """Whether the kernels can run here: built, loadable, and JAX on CPU."""
    return jax.default_backend() == "cpu" and load_error() is None


def resolve(impl: str, field: str) -> str:
    """Which implementation a model option (`field`, e.g. "conv_impl") runs:
    'auto' is the kernel where it can run (built, on CPU), else XLA."""
    if impl not in IMPLS:
        raise ValueError(f"{field}={impl!r}; choose from {IMPLS}.")
    if impl == "auto":
        return "kernel" if available() else "xla"
    if impl == "kernel" and not available():
        why = load_error() or "JAX is not running on the CPU"
        raise RuntimeError(f"{field}='kernel' but {why}; use 'auto' or 'xla'.")
    return impl


def data_parallel_size() -> int:
    """Devices on the data axis of the mesh being traced under (`jax.set_mesh`,
    as the trainer does), else 1: kernels then run per device (shard_map)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or DATA_AXIS not in mesh.axis_names:
        return 1
    return mesh.shape[DATA_AXIS]
