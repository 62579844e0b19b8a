"""Which implementation a model's kernel option (`conv_impl`, `lstm_impl`)
runs: the C++ CPU kernel or XLA. The kernels package is optional; without it
every option resolves to XLA."""
from types import ModuleType

try:
    from research import kernels as _kernels
    from research.kernels import conv as conv_kernel
    from research.kernels import lstm as lstm_kernel
    from research.kernels import onednn as onednn_kernel
except ImportError:  # research/kernels/ removed: XLA only
    _kernels = conv_kernel = lstm_kernel = onednn_kernel = None

IMPLS = ("auto", "kernel", "xla")


def kernels() -> ModuleType | None:
    """The kernels package, or None where it is absent."""
    return _kernels


def resolve(impl: str, field: str, library: str = "research") -> str:
    """"kernel" or "xla" for a model option; "auto" takes the kernel where it
    can run (`library`: see `research.kernels.resolve`).

    Raises:
      ValueError: an unknown `impl`, or "kernel" where the kernels cannot run.
    """
    if _kernels is not None:
        return _kernels.resolve(impl, field, library)
    if impl not in IMPLS:
        raise ValueError(f"{field}={impl!r}; choose from {IMPLS}.")
    if impl == "kernel":
        raise ValueError(f"{field}='kernel' but research/kernels/ is missing; "
                         "use 'auto' or 'xla'.")
    return "xla"
