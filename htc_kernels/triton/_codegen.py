"""What the Triton star kernels compile to on a CUDA arch, without a GPU (issue 8).

Triton compiles for a named target with no device present (``triton.compile`` of an ``ASTSource`` to
a ``GPUTarget``); its bundled ``cuobjdump`` then reads the cubin's registers and stack. So CI and a
machine without a GPU can check what decides the kernels' speed on one: whether the tile loads of the
visiting loops are software-pipelined (``ttg.async_copy_global_to_local`` inside the loop), the shared
memory per program, the registers per thread, and spills (a stack frame).

The arguments are specialised as a launch specialises them (pointers 16-byte aligned, integers equal
to 1 folded, integers divisible by 16 marked so, except the kernel's ``do_not_specialize``), for
contiguous ``[B, H, S, D]`` tensors of the LLaVA shape (S = 680: not a multiple of 16, as real
sequence lengths).
``python -m htc_kernels.triton._codegen`` prints the table for every tile-table
entry of both archs.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from htc_kernels.triton import star_attention as ts

_H, _S = 32, 680
# The visiting kernels by short name (the GPU benchmark's compiled-kernel table uses the same).
KERNELS = {"fwd": ts._star_fwd_kernel, "dq": ts._star_bwd_dq_kernel, "dkdv": ts._star_bwd_dkdv_kernel}
_KERNELS = tuple(KERNELS)


@dataclasses.dataclass(frozen=True)
class Codegen:
    kernel: str  # fwd, dq, dkdv
    arch: int  # 80, 90
    registers: int
    stack_bytes: int  # > 0: the kernel spills (or keeps arrays in local memory)
    shared_bytes: int
    pipelined_tiles: int  # 2-D tile loads issued asynchronously inside a loop
    sync_tiles: int  # 2-D tile loads inside a loop that wait for their data


def _strides(prefix: str, d: int) -> dict:
    return {f"{prefix}b": _H * _S * d, f"{prefix}h": _S * d, f"{prefix}s": d, f"{prefix}d": 1}


def _args(kernel: str, dtype: torch.dtype, d: int) -> dict:
    """Argument name -> pointer type ('*bf16', ...) or a representative value."""
    elt = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[dtype]
    n_t = -(-_S // 64)
    common = dict(
        KINDS="*i8", GROUPS="*i32", PANEL="*i32", TILES="*i32", STEPS="*i32",
        FLAGS="*i32", WORK="*i32",
        LSE="*fp32", slb=_H * _S, slh=_S, s_lay=0, s_pan=0, NP=0, stb=0, str_=n_t, ssb=0,
        Hq=_H, Hkv=_H, GROUP=1, Sq=_S, Skv=_S, D=d,
        qk_scale=0.125, scale=0.125, topology=0, softcap=0.0, inv_softcap=0.0,
        **_strides("sq", d), **_strides("sk", d), **_strides("sv", d),
    )  # fmt: skip
    if kernel == "fwd":
        return dict(common, Q=elt, K=elt, V=elt, O=elt, **_strides("so", d))
    common.update(Q=elt, K=elt, V=elt, DO=elt, DELTA="*fp32", **_strides("sd", d))
    if kernel == "dq":
        return dict(common, DQ=elt, **_strides("sqg", d))
    return dict(common, DK=elt, DV=elt, **_strides("skg", d), **_strides("svg", d))


def _source(fn, args: dict, constexprs: dict) -> ASTSource:
    skip = set(fn.do_not_specialize) | {fn.arg_names[i] for i in fn.do_not_specialize if isinstance(i, int)}
    signature, attrs, consts = {}, {}, dict(constexprs)
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, str):
            signature[name] = value
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1 and name not in skip:
            signature[name] = "constexpr"
            consts[name] = 1
        else:
            signature[name] = "i32"
            if value % 16 == 0 and name not in skip:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)


def _cubin_resources(cubin: bytes) -> tuple[int, int]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        cmd = [tool, "--dump-resource-usage", f.name]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    regs = re.search(r"REG:(\d+)", out.stdout)
    stack = re.search(r"STACK:(\d+)", out.stdout)
    if not (regs and stack):
        raise RuntimeError(f"cuobjdump: no resource line in {out.stdout!r}")
    return int(regs.group(1)), int(stack.group(1))


def compile_kernel(
    kernel: str, arch: int, cfg: ts.TileConfig, dtype: torch.dtype = torch.bfloat16, head_dim: int = 128
) -> Codegen:
    """Compile the plain pass (EXACT False) of one visiting kernel for sm_<arch> and report it."""
    fn = KERNELS[kernel]
    constexprs = dict(
        BLOCK_M=cfg.block_q, BLOCK_N=cfg.block_k, BLOCK_D=ts._block_d(head_dim), PREC=ts._prec(dtype),
        F32_DOTS=False, SOFTCAP=False, EXACT=False,
    )  # fmt: skip
    constexprs["PERSIST"] = cfg.persist > 0
    warps = cfg.warps_fwd if kernel == "fwd" else cfg.warps_bwd
    compiled = triton.compile(
        _source(fn, _args(kernel, dtype, head_dim), constexprs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": warps, "num_stages": cfg.stages},
    )
    regs, stack = _cubin_resources(compiled.asm["cubin"])
    pipelined, waiting = loop_tile_loads(compiled.asm["ttgir"])
    return Codegen(
        kernel=kernel,
        arch=arch,
        registers=regs,
        stack_bytes=stack,
        shared_bytes=compiled.metadata.shared,
        pipelined_tiles=pipelined,
        sync_tiles=waiting,
    )


def loop_tile_loads(ttgir: str) -> tuple[int, int]:
    """(2-D tile loads issued asynchronously, 2-D tile loads that wait) from the first loop of a
    kernel's TTGIR on: the software pipeliner turns a loop's loads into async copies."""
    loops = ttgir.split("scf.for", 1)[-1].splitlines()
    tile = re.compile(r": tensor<\d+x\d+x!tt\.ptr")  # a 2-D tile of pointers
    pipelined = sum(1 for x in loops if "async_copy_global_to_local" in x and tile.search(x))
    return pipelined, sum(1 for x in loops if " = tt.load " in x and tile.search(x))


def main() -> None:
    """Print the markdown table of every tile-table entry (benchmarks/results/triton-codegen.md)."""
    print(f"# What the Triton star kernels compile to (triton {triton.__version__}, no GPU)\n")
    print("Generated by `python -m htc_kernels.triton._codegen` (module docstring: how). The plain pass")
    print(f"(EXACT False) of each visiting kernel, bf16/fp32 at the entry's largest head dim, S = {_S}.\n")
    print("| arch | D | dtype | tile config (bq, bk, warps fwd, warps bwd, stages, persist) | kernel "
          "| registers | stack (spill) B | shared B | tile loads pipelined / waiting |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for arch_name, entries in ts._TILE_TABLE.items():
        arch = int(arch_name[2:])
        for d_max, half, fp32 in entries:
            for dtype, cfg in ((torch.bfloat16, half), (torch.float32, fp32)):
                for kernel in _KERNELS:
                    c = compile_kernel(kernel, arch, cfg, dtype, d_max)
                    print(
                        f"| sm_{arch} | {d_max} | {str(dtype)[6:]} | {tuple(cfg)} | {kernel} | {c.registers} "
                        f"| {c.stack_bytes} | {c.shared_bytes} | {c.pipelined_tiles} / {c.sync_tiles} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
