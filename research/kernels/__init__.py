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
            "research_bias_relu_pool_grad": "ResearchBiasReluPoolGrad"}


@functools.cache
def load_error() -> str | None:
    """Registers the kernels with XLA once; None when they are ready, else why
    they are not (they were not built, or the library does not load here)."""
    libs = glob.glob(os.path.join(os.path.dirname(__file__), "_conv_kernels*.so"))
    if not libs:
        return ("research/kernels/_conv_kernels*.so was not built; reinstall with "
                "a C++ compiler (pip install -e .) to get the fast CPU convolutions")
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
