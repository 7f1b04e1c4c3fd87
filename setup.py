"""Build script: metadata lives in pyproject.toml. svk is pure Python + Triton; the native
gathered-core op in csrc/ (svk._native) is optional.

Ahead-of-time build: when PyTorch with CUDA and a CUDA toolkit (nvcc, CUDA_HOME) are importable
at build time (e.g. `pip install --no-build-isolation .`), csrc/ is compiled into
svk/_svk_native*.so. SVK_BUILD_NATIVE=0 skips it; SVK_BUILD_NATIVE=1 also builds the CPU-only
library where there is no CUDA. Any failure (no torch at build time, no compiler, a toolkit
mismatch) only prints a warning: installing never needs a compiler, and svk._native then
builds on first use with ninja instead (or reports why it cannot, in `python -m svk.info`).
"""
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithNativeSources(build_py):
    """Ships csrc/ inside the wheel as svk/csrc/, where svk._native looks for the sources to
    build on first use after a non-editable install."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "svk" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for source in Path(__file__).resolve().parent.glob("csrc/*"):
            if source.suffix in (".cpp", ".cu", ".h", ".cuh"):
                shutil.copy2(source, target / source.name)


def _warn(message):
    print(f"svk: {message}; the native op will be built on first use instead", file=sys.stderr)


def _native_extension():
    wanted = os.environ.get("SVK_BUILD_NATIVE", "auto")
    if wanted == "0":
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import (CUDA_HOME, BuildExtension, CppExtension,
                                               CUDAExtension)
    except Exception:        # build isolation without torch, or no torch at all
        return {}
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if not with_cuda and wanted != "1":
        return {}

    class OptionalBuildExtension(BuildExtension):
        """Never fails the install: a native build error is a warning."""

        def run(self):
            try:
                super().run()
            except Exception as error:
                _warn(f"skipping the ahead-of-time native build ({error})")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:
                _warn(f"could not build {ext.name} ({error})")

    sources = ["csrc/gather_core_cpu.cpp"]
    if with_cuda:
        extension = CUDAExtension("svk._svk_native", sources + ["csrc/gather_core_cuda.cu"],
                                  extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    else:
        extension = CppExtension("svk._svk_native", sources, extra_compile_args=["-O3"])
    return {"ext_modules": [extension], "cmdclass": {"build_ext": OptionalBuildExtension}}


options = _native_extension()
options.setdefault("cmdclass", {})["build_py"] = BuildPyWithNativeSources
setup(**options)
