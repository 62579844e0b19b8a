"""Optional C++ CPU kernels, compiled at install time (setup.py) and called
through `jax.ffi`.

Everything kernel-specific lives in this package: loading the library, which
implementation a model option resolves to, and running a kernel per device
under `shard_map`. Models import it optionally (`research.models.impl`); with
this folder removed, every model runs on XLA.
"""
import contextlib
import ctypes
import functools
import glob
import os
from typing import Callable

from absl import logging
import jax
from jax.sharding import PartitionSpec as P

from research import mesh as mesh_lib

_TARGETS = {"research_conv_fwd": "ResearchConvFwd",
            "research_conv_dw": "ResearchConvDw",
            "research_bias_relu_pool": "ResearchBiasReluPool",
            "research_bias_relu_pool_grad": "ResearchBiasReluPoolGrad",
            "research_lstm_fwd": "ResearchLstmFwd",
            "research_lstm_bwd": "ResearchLstmBwd",
            "research_lstm_infer": "ResearchLstmInfer"}
IMPLS = ("auto", "kernel", "xla")
_forced_xla = [False]  # set by `xla_only()`


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


def resolve(impl: str, field: str, library: str = "research") -> str:
    """Which implementation a model option (`field`, e.g. "conv_impl") runs:
    'auto' is the kernel where it can run (built, on CPU), else XLA.
    `library`: "research" (conv_kernels.cc, lstm_kernels.cc) or "onednn"
    (onednn_conv.cc).

    Raises:
      ValueError: an unknown `impl`, or 'kernel' where the kernels cannot run.
    """
    if impl not in IMPLS:
        raise ValueError(f"{field}={impl!r}; choose from {IMPLS}.")
    if _forced_xla[0]:
        return "xla"
    ready, error = ((onednn_available, onednn_load_error) if library == "onednn"
                    else (available, load_error))
    if impl == "auto":
        chosen = "kernel" if ready() else "xla"
    elif impl == "kernel" and not ready():
        why = error() or "JAX is not running on the CPU"
        raise ValueError(f"{field}='kernel' but {why}; use 'auto' or 'xla'.")
    else:
        chosen = impl
    _log_choice(field, impl, chosen, library)
    return chosen


@functools.cache
def _log_choice(field: str, impl: str, chosen: str, library: str) -> None:
    where = "oneDNN" if library == "onednn" else "the C++ CPU kernel"
    logging.info("%s=%r runs on %s.", field, impl,
                 where if chosen == "kernel" else "XLA")


@contextlib.contextmanager
def xla_only():
    """Every model option resolves to XLA inside: e.g. to count a model's FLOPs
    with XLA's cost analysis, which cannot see into custom calls."""
    _forced_xla[0] = True
    try:
        yield
    finally:
        _forced_xla[0] = False


def data_parallel_size() -> int:
    """Devices a batch is split over on the mesh being traced under
    (`jax.set_mesh`, as the trainer does), else 1."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh_lib.DATA_AXIS not in mesh.axis_names:
        return 1
    return mesh.size


def per_device(fn: Callable, batched: tuple[bool, ...], *args: jax.Array):
    """`fn(*args)` run on each device's rows of the batched args (leading axis
    split over the data axis); the other args are replicated, and shard_map's
    transpose sums their gradients. Runs `fn` whole on one device, or where
    the batch does not divide."""
    devices = data_parallel_size()
    leading = [a.shape[0] for a, b in zip(args, batched) if b]
    if devices == 1 or any(n % devices for n in leading):
        return fn(*args)
    axes = mesh_lib.batch_axes(jax.sharding.get_abstract_mesh())
    specs = tuple(P(axes) if b else P() for b in batched)
    return jax.shard_map(fn, in_specs=specs, out_specs=P(axes),
                         check_vma=False)(*args)


# oneDNN convolutions (research/kernels/onednn_conv.cc), a second library: it
# links libdnnl from the PyPI package onednn-cpu-gomp (oneDNN 3.2, CPU-only,
# GNU OpenMP). $RESEARCH_ONEDNN_LIB names another libdnnl.so.3 to use.
_ONEDNN_TARGETS = {"research_onednn_conv_fwd": "ResearchOnednnConvFwd",
                   "research_onednn_conv_bwd_data": "ResearchOnednnConvBwdData",
                   "research_onednn_conv_bwd_weights": "ResearchOnednnConvBwdWeights"}
ONEDNN_DIST = "onednn-cpu-gomp"


def _libdnnl_path() -> str | None:
    """Where libdnnl.so.3 is: $RESEARCH_ONEDNN_LIB, else in the installed
    onednn-cpu-gomp distribution (its wheel puts it in <prefix>/lib)."""
    if os.environ.get("RESEARCH_ONEDNN_LIB"):
        return os.environ["RESEARCH_ONEDNN_LIB"]
    import importlib.metadata  # pylint: disable=g-import-not-at-top
    try:
        dist = importlib.metadata.distribution(ONEDNN_DIST)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name == "libdnnl.so.3":
            return str(dist.locate_file(f))
    return None


@functools.cache
def onednn_load_error() -> str | None:
    """Registers the oneDNN convolutions with XLA once; None when ready, else
    why not (not built, oneDNN not installed, or it does not load)."""
    libs = glob.glob(os.path.join(os.path.dirname(__file__), "_onednn_conv*.so"))
    if not libs:
        return ("research/kernels/_onednn_conv*.so was not built (it needs "
                f"{ONEDNN_DIST} and onednn-devel-cpu-gomp at build time)")
    dnnl = _libdnnl_path()
    if dnnl is None:
        return f"libdnnl.so.3 not found: pip install {ONEDNN_DIST}"
    try:
        # Loaded first, globally: the kernel library finds it by its soname.
        ctypes.CDLL(dnnl, mode=ctypes.RTLD_GLOBAL)
        lib = ctypes.CDLL(libs[0])
        for target, symbol in _ONEDNN_TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
    except (OSError, AttributeError) as e:
        return f"could not load oneDNN ({dnnl}) or {libs[0]}: {e}"
    return None


def onednn_available() -> bool:
    """Whether the oneDNN convolutions can run here (built, loadable, CPU)."""
    return jax.default_backend() == "cpu" and onednn_load_error() is None


def onednn_isa() -> str:
    """The instruction set oneDNN dispatches to here, e.g. avx512_core_bf16."""
    if onednn_load_error() is not None:
        return "unavailable"
    lib = ctypes.CDLL(glob.glob(os.path.join(os.path.dirname(__file__),
                                             "_onednn_conv*.so"))[0])
    buf = ctypes.create_string_buffer(64)
    lib.ResearchOnednnIsa(buf, 64)
    return buf.value.decode()
