"""Builds the optional C++ CPU kernels (research/kernels/*.cc).

Everything else is declared in setup.cfg. The kernels compile against the
XLA FFI headers that jaxlib ships; without a C++ compiler (or jaxlib at build
time) the build only warns, and the models fall back to XLA's convolutions.
$RESEARCH_KERNEL_CFLAGS replaces the default `-O3 -march=native`, e.g. to
build for another CPU than the install machine's.

The oneDNN convolutions (research/kernels/onednn_conv.cc) are a second
library: headers from onednn-devel-cpu-gomp and libdnnl from onednn-cpu-gomp,
both build requirements (pyproject.toml); the runtime library comes from
onednn-cpu-gomp in install_requires and is loaded by research.kernels.
"""
import importlib.metadata
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


def _dist_dir(dist: str, suffix: str) -> list[str]:
    """The folder holding `suffix` (a relative path) in installed distribution
    `dist`, e.g. <prefix>/include for oneapi/dnnl/dnnl.hpp; [] if missing."""
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return []
    for f in d.files or ():
        if f.as_posix().endswith("/" + suffix):
            path = os.path.abspath(os.path.normpath(str(d.locate_file(f))))
            return [path[:-len(suffix) - 1]]
    return []


class _BuildKernels(build_ext):
    """Builds the kernels as a plain shared library loaded with ctypes (no
    Python module init); a failure is a warning, never a failed install."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # pylint: disable=broad-except
            print(f"WARNING: research's C++ kernels {ext.name} were not built "
                  f"({e}); the models use XLA's convolutions instead.")

    def get_export_symbols(self, ext):
        return []  # not a Python module: no PyInit_ symbol to export


_FLAGS = shlex.split(os.environ.get("RESEARCH_KERNEL_CFLAGS", "-O3 -march=native"))
_SOURCES = ["research/kernels/conv_kernels.cc", "research/kernels/lstm_kernels.cc"]
_ONEDNN_SOURCES = ["research/kernels/onednn_conv.cc"]
_KERNELS = Extension(
    "research.kernels._conv_kernels", sources=_SOURCES,
    include_dirs=_jaxlib_include(), depends=["research/kernels/simd.h"],
    language="c++", extra_compile_args=["-std=c++17", "-w", *_FLAGS], optional=True)
_ONEDNN = Extension(
    "research.kernels._onednn_conv", sources=_ONEDNN_SOURCES,
    # <prefix>/include/oneapi/dnnl/dnnl.hpp and <prefix>/lib/libdnnl.so
    include_dirs=_jaxlib_include() + _dist_dir("onednn-devel-cpu-gomp",
                                                "oneapi/dnnl/dnnl.hpp"),
    library_dirs=_dist_dir("onednn-cpu-gomp", "libdnnl.so"), libraries=["dnnl"],
    language="c++", extra_compile_args=["-std=c++17", "-w", *_FLAGS], optional=True)

setup(
    # The kernels are optional: without their sources everything runs on XLA.
    ext_modules=[ext for ext in (_KERNELS, _ONEDNN)
                 if all(map(os.path.exists, ext.sources))],
    cmdclass={"build_ext": _BuildKernels},
)
