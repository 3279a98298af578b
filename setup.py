"""Builds htc_kernels._C: CPU kernels always, CUDA kernels when a toolkit and a CUDA torch are present.

Environment:
  HTC_NO_EXT=1            pure-Python install (reference and Triton backends only)
  FORCE_CUDA=1            build the CUDA sources even if torch/toolkit detection says no
  HTC_NO_CUDA=1           CPU kernels only (faster development builds; CI always builds CUDA)
  TORCH_CUDA_ARCH_LIST    CUDA archs (default "8.0;9.0")
  HTC_CPU_ARCH            value for -march (default "native": this is a from-source build for this machine)
  MAX_JOBS                parallel compile jobs (ninja), as in torch.utils.cpp_extension
  HTC_ASAN=1              CPU kernels built with AddressSanitizer (-O1 -g -fsanitize=address); load them
                          with libasan preloaded. `make test-asan` builds one into build/asan and runs
                          the fuzz and kernel tests on it.
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("HTC_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    with_cuda = os.environ.get("FORCE_CUDA") == "1" or (
        torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("HTC_NO_CUDA") != "1"
    )
    cpu_sources = sorted(
        s for s in glob.glob("csrc/**/*.cpp", recursive=True) if not s.startswith("csrc/tests/")
    )
    cuda_sources = sorted(
        s for s in glob.glob("csrc/**/*.cu", recursive=True) if not s.startswith("csrc/tests/")
    )
    march = os.environ.get("HTC_CPU_ARCH", "native")
    cxx = [
        "-O3",
        "-fopenmp",
        f"-march={march}",
        "-Wall",
        "-Wno-unknown-pragmas",
        "-Wno-maybe-uninitialized",
    ]
    # CUDA sources include c10/cuda headers only (not ATen/cuda/CUDAContext.h): the toolkit on these
    # machines ships no cuSPARSE/cuBLAS headers, and the kernels need none of them.
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-diag-suppress=3189"]
    link = ["-fopenmp"]
    if os.environ.get("HTC_ASAN") == "1":
        cxx = [f for f in cxx if f != "-O3"] + ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"]
        link += ["-fsanitize=address"]
    macros = []
    if with_cuda:
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        macros += [("HTC_WITH_CUDA", None), ("HTC_CUDA_ARCHS", f'"{archs}"')]
        ext_cls, sources = CUDAExtension, cpu_sources + cuda_sources
    else:
        ext_cls, sources = CppExtension, cpu_sources
    ext = ext_cls(
        name="htc_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if with_cuda else {"cxx": cxx},
        extra_link_args=link,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["htc_kernels", "htc_kernels.*", "htc_model", "htc_model.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"build": {"build_base": "build/python"}},
)
