"""Builds the optional C++ CPU kernels (research/kernels/*.cc).

Everything else is declared in setup.cfg. The kernels compile against the
XLA FFI headers that jaxlib ships; without a C++ compiler (or jaxlib at build
time) the build only warns, and the models fall back to XLA's convolutions.
$RESEARCH_KERNEL_CFLAGS replaces the default `-O3 -march=native`, e.g. to
build for another CPU than the install machine's.
"""
import os
import shlex

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _jaxlib_include() -> list[str]:
    try:
        import jaxlib  # pylint: disable=g-import-not-at-top
    except ImportError:
        return []
    return [os.path.join(os.path.dirname(jaxlib.__file__), "include")]


class _BuildKernels(build_ext):
    """Builds the kernels as a plain shared library loaded with ctypes (no
    Python module init); a failure is a warning, never a failed install."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # pylint: disable=broad-except
            print(f"WARNING: research's C++ kernels were not built ({e}); "
                  "LeNet uses XLA's convolutions instead.")

    def get_export_symbols(self, ext):
        return []  # not a Python module: no PyInit_ symbol to export


_FLAGS = shlex.split(os.environ.get("RESEARCH_KERNEL_CFLAGS", "-O3 -march=native"))
_SOURCES = ["research/kernels/conv_kernels.cc", "research/kernels/lstm_kernels.cc"]

setup(
    # The kernels are optional: without their sources everything runs on XLA.
    ext_modules=[Extension(
        "research.kernels._conv_kernels",
        sources=_SOURCES,
        include_dirs=_jaxlib_include(),
        depends=["research/kernels/simd.h"],
        language="c++",
        extra_compile_args=["-std=c++17", "-w", *_FLAGS],
        optional=True)] if all(map(os.path.exists, _SOURCES)) else [],
    cmdclass={"build_ext": _BuildKernels},
)
