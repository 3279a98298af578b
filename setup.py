"""Builds htc_kernels._C: CPU kernels always, CUDA kernels when a toolkit and a CUDA torch are present.

Environment:
  HTC_NO_EXT=1            pure-Python install (reference and Triton backends only)
  FORCE_CUDA=1            build the CUDA sources even if torch/toolkit detection says no
  HTC_NO_CUDA=1           CPU kernels only (faster development builds; CI always builds CUDA)
  TORCH_CUDA_ARCH_LIST    CUDA archs (default "8.0;9.0")
  HTC_CPU_ARCH            unset (default, x86-64): the CPU kernels are compiled once per ISA variant (avx2,
                          avx512, avx512_bf16, amx; see CPU_VARIANTS) and the best one this CPU runs is
                          chosen at load (csrc/common/cpu_dispatch.h; HTC_CPU_ISA=<variant> forces one):
                          the build runs on any x86-64 CPU with AVX2. Set (e.g. "native"): everything is
                          compiled once with -march=$HTC_CPU_ARCH, for that machine only (the one variant
                          is "native"). Other architectures than x86-64 always build that way (native).
  HTC_CPU_ISAS            comma-separated subset of the variants to compile (development builds)
  MAX_JOBS                parallel compile jobs (ninja), as in torch.utils.cpp_extension
  HTC_ASAN=1              CPU kernels built with AddressSanitizer (-O1 -g -fsanitize=address); load them
                          with libasan preloaded. `make test-asan` builds one into build/asan and runs
                          the fuzz and kernel tests on it.
"""

import glob
import os
import platform

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# CPU kernel variants, lowest first (csrc/common/cpu_dispatch.cpp checks the same features at run time:
# keep the two in step). Every csrc/**/*_isa.cpp source is compiled once per variant, with these flags
# and -DHTC_ISA=<name> (its code lands in namespace htc::isa_<name>: csrc/common/isa.h); every other
# source once, for the x86-64 baseline. The objects are linked baseline first, then the variants lowest
# first: where several define the same inline function (std::, c10::), the copy the linker keeps is the
# first one, so code never calls a copy compiled for a higher ISA than its own.
CPU_VARIANTS = {
    "avx2": ["-march=x86-64-v3"],  # AVX2, FMA, F16C, BMI1/2, LZCNT, MOVBE
    "avx512": ["-march=x86-64-v4"],  # + AVX512F/BW/CD/DQ/VL
    "avx512_bf16": ["-march=x86-64-v4", "-mavx512bf16"],
    "amx": ["-march=x86-64-v4", "-mavx512bf16", "-mamx-tile", "-mamx-bf16"],
}


def _cpu_variants() -> tuple[str | None, dict[str, list[str]]]:
    """(-march value for every source, or None for the dispatched build; {variant: extra flags})."""
    march = os.environ.get("HTC_CPU_ARCH")
    if march is None and platform.machine().lower() not in ("x86_64", "amd64"):
        march = "native"
    if march is not None:
        return march, {"native": []}
    wanted = os.environ.get("HTC_CPU_ISAS")
    names = list(CPU_VARIANTS) if not wanted else [n.strip() for n in wanted.split(",") if n.strip()]
    unknown = [n for n in names if n not in CPU_VARIANTS]
    if unknown or not names:
        raise SystemExit(f"HTC_CPU_ISAS={wanted!r}: variants are {', '.join(CPU_VARIANTS)}")
    return None, {n: CPU_VARIANTS[n] for n in CPU_VARIANTS if n in names}


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
    isa_sources = [s for s in cpu_sources if s.endswith("_isa.cpp")]
    cpu_sources = [s for s in cpu_sources if s not in isa_sources]
    cuda_sources = sorted(
        s for s in glob.glob("csrc/**/*.cu", recursive=True) if not s.startswith("csrc/tests/")
    )
    march, variants = _cpu_variants()
    cxx = [
        "-O3",
        "-fopenmp",
        *([f"-march={march}"] if march else []),
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
    macros = [(f"HTC_ISA_COMPILED_{n}", None) for n in variants]
    macros.append(("HTC_CPU_MARCH", f'"{march or ""}"'))
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
    ext._htc_isa = (isa_sources, variants)  # read by _build_ext_class's build_extension
    return [ext], {"build_ext": _build_ext_class(BuildExtension).with_options(use_ninja=True)}


def _build_ext_class(base):
    """torch's BuildExtension, plus the per-variant objects of the *_isa.cpp sources.

    cpp_extension gives one set of compiler flags per extension; the variants need their own. So each
    variant's sources are compiled by the same (ninja) compiler, into a directory of their own, with the
    extension's flags plus the variant's, and join the link as extra objects (after the baseline's)."""

    class BuildExt(base):
        def build_extension(self, ext):
            isa = getattr(ext, "_htc_isa", None)
            if isa is not None:
                sources, variants = isa
                args = ext.extra_compile_args
                cxx = list(args["cxx"] if isinstance(args, dict) else args)
                extra = [o for o in ext.extra_objects if "/isa_" not in o]
                for name, flags in variants.items():
                    extra += self.compiler.compile(
                        sources,
                        output_dir=os.path.join(self.build_temp, f"isa_{name}"),
                        macros=[*ext.define_macros, ("HTC_ISA", name)],
                        include_dirs=ext.include_dirs,
                        debug=self.debug,
                        extra_postargs={"cxx": cxx + flags, "nvcc": []},
                        depends=ext.depends,
                    )
                ext.extra_objects = extra
            super().build_extension(ext)

    return BuildExt


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["htc_kernels", "htc_kernels.*", "htc_model", "htc_model.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"build": {"build_base": "build/python"}},
)
