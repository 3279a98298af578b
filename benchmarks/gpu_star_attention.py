"""GPU star_attention benchmark (issue 8): bf16 forward and forward+backward of htc's GPU backends
against the peers, at the LLaVA shape and at 16 images. ``scripts/gpu_check.sh`` runs it.

    python -m benchmarks.gpu_star_attention [--out DIR] [--quick] [--cases A,B] [--budget-s S]
    python -m benchmarks.gpu_star_attention --smoke     # CPU, tiny shapes, files in a temp dir (CI)
    python -m benchmarks.gpu_star_attention --env       # print the environment and exit
    python -m benchmarks.gpu_star_attention --profile llava-b16:fwd:cuda,...  # runs for ncu, untimed

Cases (bf16, star topology, 32 heads, head dim 128; units run in this order, the targets' first):
    llava-b16  B=16, S=680: 35 text + 580 visual + 1 voco + 64 text (DESIGN §7)    fwd, fwd+bwd
    16img      B=1, S=9603: 35 text + 16 x (580 visual + 1 voco + 13 text) + 64 text fwd (+ fwd+bwd)
    llava-b1   B=1, S=680                                                            (fwd, fwd+bwd)
``--quick`` runs only the units in front of the brackets, with fewer timing repetitions.
Triton tile sweep (``--sweep``; default on without ``--quick``): after the units with targets, the triton
backend at the SWEEP_TILES configurations and its table's, checked and timed like a provider.

Providers: ``htc triton`` / ``htc cuda`` (``hk.star_attention(backend=...)``; a backend that refuses the
call is SKIP with its reason), ``htc triton, no key panel`` / ``htc cuda, no key panel`` (the same in
the plain key order, on layouts with >= 2 images per sample: what the TEXT/VOCO key panel gains; no
targets), ``htc cuda, no prefill split`` (the CUDA forward without splitting its long query tiles, at
the small grids where it splits them: llava-b1; no targets), ``htc cuda, 3 CTAs/SM`` (the CUDA kernels'
builds for three CTAs per SM, HTC_CUDA_THREE_CTAS=1; sm_90 only; no targets), ``sdpa dense
mask`` (F.scaled_dot_product_attention with the dense bool mask), ``flex compiled``
(torch.compile(flex_attention) with the BlockMask of the same rule; the block mask build is timed
separately, the compile is excluded), ``xformers bias`` (memory_efficient_attention with a tensor
attn_bias), ``sdpa causal (flash)`` (dense causal attention on SDPA's flash backend: a
lower bound for *different* work). Builders: ``benchmarks/star_peers.py``.

Correctness first: every provider's output (and dq, dk, dv) is compared with the float64 dense reference
(computed on the device, a few heads at a time) before it is timed; tolerance 2x the error of the same
dense math in bf16 + 2e-3 (DESIGN §6). A provider over it is WRONG and not timed; one that raises is
ERROR. The causal peer is checked against float64 causal attention.

Timing: CUDA events around each call, warm-up first, then the median of many repetitions, the L2 cache
flushed (a 256 MiB write) before each one (``--no-flush`` keeps it warm). Device time: a GPU sleep
(``torch.cuda._sleep``, ~0.2 ms) queued before each call's start event lets the host enqueue the call's
kernels first, so a call whose Python/launch overhead exceeds its GPU time (B=1 shapes) is not timed as
host time.

Floors: HBM bytes (fwd: q, k, v read + o written; fwd+bwd adds q, k, v, o, dO read + dq, dk, dv
written) at the measured device-to-device copy rate (bytes read + written) and at the H100 SXM spec
3.35 TB/s (DESIGN §7); FLOPs of the allowed pairs (fwd 4·D per pair and head, fwd+bwd 14·D: FA-2's
accounting) at the measured bf16 GEMM rate and at 989 TFLOP/s. "x floor" = time / max(the two measured
floors).

Profiling (``--profile CASE:MODE:BACKEND,...``; ``scripts/gpu_check.sh`` runs it under Nsight Compute):
each unit is checked against the reference, warmed up, then run ``PROFILE_ITERS`` times between
``cudaProfilerStart``/``Stop`` (so ``ncu --profile-from-start off`` sees only those launches), each call in
an NVTX range ``htc/<case>/<mode>/<backend>``. Nothing is timed.

Output: ``<out>/gpu-<device>.md`` (one table per case, the issue's targets as PASS/FAIL lines) and
``.json`` (every raw number and the environment), rewritten after each unit so a killed run leaves what
it measured. Exit status: 3 if any provider was WRONG or ERROR, 2 if there is no CUDA device (without
``--smoke``), else 0 (1: the script itself failed); missed targets are reported, not failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

import htc_kernels as hk
from benchmarks import common, star_peers
from benchmarks.star_peers import C, Skip, T, V

SPEC = {"name": "H100 SXM spec (DESIGN §7)", "hbm_bytes_per_s": 3.35e12, "bf16_flop_per_s": 989e12}
DTYPE = torch.bfloat16
OUTPUTS = ("out", "dq", "dk", "dv")
MODES = {"fwd": "forward", "fwdbwd": "forward+backward"}
RESULTS = Path(__file__).resolve().parent / "results"

# --------------------------------------------------------------------------------------------------
# Cases and units
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    kinds: tuple[int, ...]
    batch: int
    heads: int
    head_dim: int
    layout_text: str

    @property
    def seq_len(self) -> int:
        return len(self.kinds)

    @property
    def shape(self) -> str:
        return f"B={self.batch} H={self.heads} S={self.seq_len} D={self.head_dim}"


GPU_CASES = {
    c.name: c
    for c in (
        Case("llava-b16", tuple(star_peers.llava_kinds()), 16, 32, 128,
             "35 text + 580 visual + 1 voco + 64 text (DESIGN §7), one layout for the batch"),
        Case("16img", tuple(star_peers.image_kinds(16, between=13)), 1, 32, 128,
             "35 text + 16 × (580 visual + 1 voco + 13 text) + 64 text"),
        Case("llava-b1", tuple(star_peers.llava_kinds()), 1, 32, 128,
             "35 text + 580 visual + 1 voco + 64 text (DESIGN §7)"),
    )
}  # fmt: skip
# The same names at toy sizes (head dim 64: the smallest the GPU kernels are specified for).
SMOKE_CASES = {
    c.name: c
    for c in (
        Case("llava-b16", tuple([T] * 5 + [V] * 20 + [C] + [T] * 6), 2, 2, 64,
             "smoke: 5 text + 20 visual + 1 voco + 6 text"),
        Case("16img", tuple(star_peers.image_kinds(3, prefix=3, visual=8, between=2, suffix=4)), 1, 2, 64,
             "smoke: 3 text + 3 × (8 visual + 1 voco + 2 text) + 4 text"),
    )
}  # fmt: skip
QUICK_UNITS = (("llava-b16", "fwd"), ("llava-b16", "fwdbwd"), ("16img", "fwd"))
FULL_UNITS = QUICK_UNITS + (("16img", "fwdbwd"), ("llava-b1", "fwd"), ("llava-b1", "fwdbwd"))

# Targets (issue 8; on an H100, bf16; reported, not asserted), checked for every htc row.
#   (case, mode, kind, peer, threshold): kind "floor": time <= threshold x HBM floor at SPEC;
#   "max_us": time <= threshold µs; "speedup": peer time / htc time >= threshold.
TARGETS = (
    ("llava-b16", "fwd", "floor", None, 1.3),
    ("llava-b16", "fwdbwd", "max_us", None, 450.0),
    ("llava-b16", "fwd", "speedup", "flex compiled", 1.3),
    ("llava-b16", "fwdbwd", "speedup", "flex compiled", 1.3),
    ("llava-b16", "fwd", "speedup", "sdpa dense mask", 5.0),
    ("llava-b16", "fwdbwd", "speedup", "sdpa dense mask", 5.0),
    ("16img", "fwd", "speedup", "flex compiled", 3.5),
    ("16img", "fwd", "speedup", "sdpa causal (flash)", 9.0),
)


# Triton tile sweep: the triton backend with other tile configurations than its table's
# (htc_kernels/triton/star_attention.py, _TILE_TABLE: register and shared-memory budgets, never timed)
# on these units, so the table can be set from measurements. Fields of TileConfig: block_q, block_k,
# warps_fwd, warps_bwd, stages, persist (visiting kernels' programs per SM; 0: one per tile). The
# table's own entry is timed too (marked in the report). Runs after the units with targets; never
# changes the exit status (a config that fails to compile is an ERROR row; a WRONG one, reported, is a
# compiler problem at that config: the table must avoid it).
SWEEP_UNITS = (("llava-b16", "fwd"), ("16img", "fwd"), ("llava-b16", "fwdbwd"))
SWEEP_TILES = (
    (64, 64, 4, 8, 2, 0), (64, 64, 4, 8, 2, 1), (64, 64, 4, 8, 2, 2), (64, 64, 4, 8, 2, 3),
    (64, 64, 4, 8, 2, 8), (64, 64, 4, 8, 1, 2), (64, 64, 4, 8, 3, 2), (64, 64, 8, 8, 2, 2),
    (64, 64, 4, 4, 2, 2), (128, 64, 8, 8, 2, 0), (128, 64, 8, 8, 2, 2), (64, 32, 4, 4, 2, 2),
    (32, 32, 2, 4, 2, 0),
)  # fmt: skip
SMOKE_SWEEP_TILES = ((32, 32, 1, 1, 1, 3), (16, 16, 1, 1, 1, 0))


@dataclasses.dataclass
class Unit:
    """One (case, mode) on one device: layouts, inputs, references and tolerances."""

    case: Case
    mode: str
    device: torch.device
    smoke: bool
    layout: hk.StarLayout
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    notes: dict = dataclasses.field(default_factory=dict)  # per-unit extras (flex build time, ...)

    @property
    def with_grad(self) -> bool:
        return self.mode == "fwdbwd"

    @functools.cached_property
    def causal_layout(self) -> hk.StarLayout:
        return hk.StarLayout(torch.full((self.case.seq_len,), T, device=self.device))

    @functools.cached_property
    def allowed_pairs(self) -> int:
        """Allowed (query, key) pairs summed over the batch, per head."""
        return int(hk.star_mask(self.layout).sum()) * (self.case.batch // self.layout.batch_size)


def make_unit(case: Case, mode: str, device: torch.device, smoke: bool) -> Unit:
    g = torch.Generator(device=device).manual_seed(1234)
    shape = (case.batch, case.heads, case.seq_len, case.head_dim)
    q, k, v, dout = (torch.randn(shape, generator=g, device=device, dtype=DTYPE) for _ in range(4))
    if mode == "fwdbwd":
        q, k, v = (x.requires_grad_() for x in (q, k, v))
    layout = hk.StarLayout(torch.tensor(case.kinds, device=device))
    return Unit(case, mode, device, smoke, layout, q, k, v, dout)


def dense_reference(unit: Unit, layout: hk.StarLayout, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """``hk.star_attention_reference`` in ``dtype`` (out, and dq, dk, dv for fwd+bwd) on the unit's
    device, a few heads at a time so the S×S intermediates stay near 2 GiB."""
    b, h, s, _d = unit.q.shape
    per_head = b * s * s * 8 * 6  # float64 scores, probs, masks and their autograd buffers
    chunk = max(1, int(2**31 // per_head))
    parts = []
    for h0 in range(0, h, chunk):
        sl = slice(h0, min(h, h0 + chunk))
        qc, kc, vc = (
            x.detach()[:, sl].to(dtype, copy=True).requires_grad_(unit.with_grad)
            for x in (unit.q, unit.k, unit.v)
        )
        with torch.enable_grad() if unit.with_grad else torch.no_grad():
            out = hk.star_attention_reference(qc, kc, vc, layout)
            grads = (
                torch.autograd.grad(out, (qc, kc, vc), unit.dout[:, sl].to(dtype)) if unit.with_grad else ()
            )
        parts.append((out.detach(), *grads))
    return tuple(torch.cat(p, dim=1) for p in zip(*parts))


def _blocks_skipped_pct(block_mask) -> float | None:
    """Percent of the block mask's blocks Flex skips, counted from its dense block map (some torch
    versions' BlockMask.sparsity() measure the area of a ragged last block, not blocks)."""
    try:
        dense = block_mask.to_dense()
    except Exception:  # noqa: BLE001 (an older BlockMask without to_dense: not reported)
        return None
    return 100.0 * (1.0 - float(dense.bool().sum()) / dense.numel())


def references(unit: Unit, causal: bool) -> tuple[tuple[torch.Tensor, ...], tuple[float, ...]]:
    """(float64 reference outputs, tolerances) for the star rule, or for plain causal attention."""
    key = "ref_causal" if causal else "ref_star"
    if key not in unit.notes:
        layout = unit.causal_layout if causal else unit.layout
        ref = dense_reference(unit, layout, torch.float64)
        low = dense_reference(unit, layout, DTYPE)
        kinds = layout.kinds  # errors per kind of row: one <voco> row is not diluted by 580 others
        tols = tuple(2 * common.rel_err(x, r, kinds) + 2e-3 for x, r in zip(low, ref))
        unit.notes[key] = (ref, tols)
    return unit.notes[key]


# --------------------------------------------------------------------------------------------------
# Providers: factory(unit) -> fn(q, k, v) -> out, or raise Skip
# --------------------------------------------------------------------------------------------------


def _htc(backend: str):
    def factory(unit: Unit):
        def fn(q, k, v):
            return hk.star_attention(q, k, v, unit.layout, backend=backend)

        return fn

    return factory


def _cuda_with_env(unit: Unit, var: str, value: str):
    """``htc cuda`` with the environment variable ``var`` (read per call by star_attention_cuda.cu) set
    to ``value`` around each call."""
    layout = unit.layout

    def fn(q, k, v):
        old = os.environ.get(var)
        os.environ[var] = value
        try:
            return hk.star_attention(q, k, v, layout, backend="cuda")
        finally:
            if old is None:
                del os.environ[var]
            else:
                os.environ[var] = old

    return fn


def _cuda_without_prefill_split(unit: Unit):
    """``htc cuda`` with its prefill split-K off (HTC_CUDA_PREFILL_SPLIT=0), at the small prefill grids
    where it would split the long query tiles: what that split gains, measured in the same run. The grid
    rule mirrors star_attention_cuda.cu (kPrefillSplitWaves: split below 4 CTAs per SM, decode's own
    split-K below 1)."""
    if unit.device.type != "cuda":
        raise Skip("the CUDA backend needs a CUDA device")
    case = unit.case
    ctas = case.batch * case.heads * -(-len(case.kinds) // 64)
    sms = torch.cuda.get_device_properties(unit.device).multi_processor_count
    if not sms <= ctas < 4 * sms:
        raise Skip(f"{ctas} query-tile CTAs on {sms} SMs: no prefill split here (only {sms}..{4 * sms - 1})")
    return _cuda_with_env(unit, "HTC_CUDA_PREFILL_SPLIT", "0")


def _cuda_three_ctas(unit: Unit):
    """``htc cuda`` with HTC_CUDA_THREE_CTAS=1: the forward and dQ kernels' builds for three CTAs per SM
    (12 warps instead of 8; at bf16 D=128 the forward has 3 pipeline stages instead of 4 and dQ 2, and
    both unroll less to fit 168 registers). What more warps per SM gain, measured in the same run; the
    default changes if it wins. Needs sm_90's 228 KB of shared memory per SM."""
    if unit.device.type != "cuda":
        raise Skip("the CUDA backend needs a CUDA device")
    smem = torch.cuda.get_device_properties(unit.device).shared_memory_per_multiprocessor
    if smem < 228 * 1024:
        raise Skip(f"{smem // 1024} KB of shared memory per SM: three CTAs need 228 KB (sm_90)")
    return _cuda_with_env(unit, "HTC_CUDA_THREE_CTAS", "1")


def _htc_without_panel(backend: str):
    """``backend`` in the plain key order, on layouts that take the TEXT/VOCO key panel (>= 2 images
    in a sample): what the panel gains, measured in the same run."""

    def factory(unit: Unit):
        if not unit.layout.uses_key_panel:
            raise Skip("this layout does not take the key panel (fewer than 2 images per sample)")
        layout = hk.StarLayout(unit.layout.kinds, unit.layout.groups, unit.layout.topology)
        layout.uses_key_panel = False

        def fn(q, k, v):
            return hk.star_attention(q, k, v, layout, backend=backend)

        return fn

    return factory


@functools.cache
def _flex_compiled():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(unit: Unit):
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as exc:
        raise Skip(f"FlexAttention is not in this torch ({exc})") from None
    if unit.with_grad and unit.device.type == "cpu":
        reason = star_peers.flex_backward_reason("cpu")
        if reason:
            raise Skip(f"FlexAttention has no CPU backward ({reason})")
    builds = []
    for _ in range(1 if unit.smoke else 6):  # the first build, then 5 rebuilds (median reported)
        _sync(unit.device)
        t0 = time.perf_counter()
        block_mask = star_peers.flex_block_mask(unit.layout)
        _sync(unit.device)
        builds.append((time.perf_counter() - t0) * 1e3)
    unit.notes["flex_block_mask_ms"] = {
        "first": builds[0],
        "median_rebuild": statistics.median(builds[1:]) if len(builds) > 1 else None,
        "rebuilds": len(builds) - 1,
        "block_size": list(getattr(block_mask, "BLOCK_SIZE", ())),
        "sparsity_pct": _blocks_skipped_pct(block_mask),
    }
    if unit.smoke:  # compiling flex for the CPU takes minutes: the smoke checks the mask, eagerly
        unit.notes["flex_note"] = "smoke: eager flex_attention (not compiled)"

        def fn(q, k, v):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return flex_attention(q, k, v, block_mask=block_mask)

        return fn
    return star_peers.flex_provider(block_mask, _flex_compiled())


def _xformers(unit: Unit):
    return star_peers.xformers_bias(unit.layout, unit.case.batch, unit.case.heads, DTYPE)


# Run in this order, ours last: a fault in a new CUDA kernel poisons the context for every later call,
# so the peers' numbers come first.
PROVIDERS: dict[str, Callable[[Unit], Callable]] = {
    "sdpa dense mask": lambda u: star_peers.sdpa_dense_mask(u.layout),
    "sdpa causal (flash)": lambda u: star_peers.sdpa_causal_flash(u.layout),
    "xformers bias": _xformers,
    "flex compiled": _flex,
    "htc triton": _htc("triton"),
    "htc triton, no key panel": _htc_without_panel("triton"),
    "htc cuda": _htc("cuda"),
    "htc cuda, no key panel": _htc_without_panel("cuda"),
    "htc cuda, no prefill split": _cuda_without_prefill_split,
    "htc cuda, 3 CTAs/SM": _cuda_three_ctas,
}
STAND_IN = "htc reference (stand-in)"  # smoke only: exercises the htc-row code paths on the CPU
DIFFERENT_WORK = {"sdpa causal (flash)"}  # checked against causal attention, not the star rule
# Comparison rows (the key panel, the prefill split, three CTAs per SM), not backends users get.
UNTARGETED = {
    "htc triton, no key panel",
    "htc cuda, no key panel",
    "htc cuda, no prefill split",
    "htc cuda, 3 CTAs/SM",
}


def is_htc(provider: str) -> bool:
    return provider.startswith("htc ")


# --------------------------------------------------------------------------------------------------
# Timing and rates
# --------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass
class Timer:
    """Median of repeated calls after a warm-up: CUDA events on a GPU (the L2 flushed by a 256 MiB
    write before each call unless ``flush`` is off), ``time.perf_counter`` on the CPU."""

    device: torch.device
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_reps: int = 10
    max_reps: int = 500
    flush: bool = True
    est_calls: int = 3  # calls that estimate the time of one (sets the warm-up and repetition counts)
    host_lead_cycles: int = 400_000  # GPU sleep before each start event (~0.2 ms): the host gets ahead

    @functools.cached_property
    def _flush_buf(self):
        if self.flush and self.device.type == "cuda":
            return torch.empty(256 * 2**20, dtype=torch.int8, device=self.device)
        return None

    def describe(self) -> dict:
        return {
            "timer": "cuda events" if self.device.type == "cuda" else "time.perf_counter",
            "warmup_ms": self.warmup_ms,
            "rep_ms": self.rep_ms,
            "min_reps": self.min_reps,
            "max_reps": self.max_reps,
            "l2_flush_bytes": self._flush_buf.numel() if self._flush_buf is not None else 0,
            "host_lead_cycles": self.host_lead_cycles if self.device.type == "cuda" else 0,
        }

    def __call__(self, fn: Callable[[], object], flush: bool = True) -> dict:
        fn()
        _sync(self.device)
        t0 = time.perf_counter()
        for _ in range(self.est_calls):
            fn()
        _sync(self.device)
        est_ms = max((time.perf_counter() - t0) * 1e3 / self.est_calls, 1e-4)
        for _ in range(int(self.warmup_ms / est_ms)):
            fn()
        reps = max(self.min_reps, min(self.max_reps, int(self.rep_ms / est_ms)))
        buf = self._flush_buf if flush else None
        if self.device.type == "cuda":
            ev = [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                for _ in range(reps)
            ]
            for start, end in ev:
                if buf is not None:
                    buf.zero_()
                # The GPU sleeps while the host enqueues this call: between the events it then waits
                # for no launch, and the interval is the call's device time.
                torch.cuda._sleep(self.host_lead_cycles)
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize(self.device)
            ms = [start.elapsed_time(end) for start, end in ev]
        else:
            ms = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                ms.append((time.perf_counter() - t0) * 1e3)
        ms.sort()
        return {
            "median_ms": statistics.median(ms),
            "min_ms": ms[0],
            "p20_ms": ms[int(0.2 * (reps - 1))],
            "p80_ms": ms[int(0.8 * (reps - 1))],
            "reps": reps,
            "samples_ms": [round(x, 5) for x in ms],  # sorted
        }


def measure_rates(device: torch.device, timer: Timer, smoke: bool) -> dict:
    """Device-to-device copy (bytes read + written) and bf16 GEMM rates, measured here."""
    n_copy = 2**21 if smoke else 2**29  # bf16 elements: 4 MiB / 1 GiB
    src = torch.randn(n_copy, device=device, dtype=DTYPE)
    dst = torch.empty_like(src)
    copy = timer(lambda: dst.copy_(src), flush=False)
    n = 256 if smoke else 8192
    a, b = (torch.randn(n, n, device=device, dtype=DTYPE) for _ in range(2))
    c = torch.empty(n, n, device=device, dtype=DTYPE)
    gemm = timer(lambda: torch.mm(a, b, out=c), flush=False)
    return {
        "copy_bytes_per_s": 2 * n_copy * 2 / (copy["median_ms"] * 1e-3),
        "copy_nbytes": 2 * n_copy * 2,
        "bf16_gemm_flop_per_s": 2 * n**3 / (gemm["median_ms"] * 1e-3),
        "gemm_n": n,
        "note": f"copy_ of {n_copy * 2 / 2**20:.0f} MiB bf16 (read + write counted); "
        f"{n}³ bf16 torch.mm on random data; medians",
    }


def floors(unit: Unit, rates: dict) -> dict:
    c = unit.case
    tensor_bytes = c.batch * c.heads * c.seq_len * c.head_dim * unit.q.element_size()
    if unit.mode == "fwd":
        nbytes, flops = 4 * tensor_bytes, 4 * c.head_dim * c.heads * unit.allowed_pairs
    else:  # q,k,v,o,dO read + dq,dk,dv written by the backward; backward GEMMs = 2.5x the forward's
        nbytes, flops = 12 * tensor_bytes, 14 * c.head_dim * c.heads * unit.allowed_pairs
    f = {
        "bytes": nbytes,
        "flops": flops,
        "hbm_measured_us": nbytes / rates["copy_bytes_per_s"] * 1e6,
        "hbm_spec_us": nbytes / SPEC["hbm_bytes_per_s"] * 1e6,
        "flop_measured_us": flops / rates["bf16_gemm_flop_per_s"] * 1e6,
        "flop_spec_us": flops / SPEC["bf16_flop_per_s"] * 1e6,
    }
    f["floor_us"] = max(f["hbm_measured_us"], f["flop_measured_us"])
    return f


# --------------------------------------------------------------------------------------------------
# Running one provider
# --------------------------------------------------------------------------------------------------


def _call(fn, unit: Unit) -> Callable[[], tuple]:
    q, k, v = unit.q, unit.k, unit.v
    if unit.with_grad:

        def call():
            out = fn(q, k, v)
            return (out, *torch.autograd.grad(out, (q, k, v), unit.dout))
    else:

        def call():
            with torch.no_grad():
                return (fn(q, k, v),)

    return call


def _short(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= 600 else text[:600] + " ..."


def run_provider(name: str, unit: Unit, timer: Timer, deadline: float, factory=None, context=None) -> dict:
    """Check one provider against the reference, then time it. ``factory`` (default: PROVIDERS[name])
    builds the function; ``context`` (a context-manager factory) wraps every whole call, backward
    included."""
    row: dict = {"provider": name, "status": "ok"}
    if time.monotonic() > deadline:
        return {**row, "status": "SKIP", "reason": "time budget exhausted before this provider"}
    if factory is None:
        factory = _htc("reference") if name == STAND_IN else PROVIDERS[name]
    try:
        fn = factory(unit)
    except Skip as exc:
        return {**row, "status": "SKIP", "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 (a peer that cannot be built is reported, not fatal)
        return {**row, "status": "ERROR", "reason": "building it failed: " + _short(exc)}
    call = _call(fn, unit)
    if context is not None:
        bare = call

        def call():
            with context():
                return bare()

    try:
        _sync(unit.device)
        t0 = time.perf_counter()
        got = call()
        _sync(unit.device)
        row["first_call_s"] = time.perf_counter() - t0
    except (Skip, NotImplementedError) as exc:
        return {**row, "status": "SKIP", "reason": _short(exc)}
    except ValueError as exc:
        if is_htc(name):  # the public API's refusal: "backend 'x' cannot run this call: <reasons>"
            return {**row, "status": "SKIP", "reason": str(exc)}
        return {**row, "status": "ERROR", "reason": _short(exc)}
    except Exception as exc:  # noqa: BLE001
        return {**row, "status": "ERROR", "reason": _short(exc)}

    errs, bad = {}, []
    try:
        refs, tols = references(unit, causal=name in DIFFERENT_WORK)
        for oname, x, r, tol in zip(OUTPUTS, got, refs, tols):
            if x.shape != r.shape or x.dtype != DTYPE:
                bad.append(f"{oname} is {tuple(x.shape)} {x.dtype}, expected {tuple(r.shape)} {DTYPE}")
                continue
            layout = unit.causal_layout if name in DIFFERENT_WORK else unit.layout
            errs[oname] = common.rel_err(x, r, layout.kinds)
            if not errs[oname] <= tol:
                bad.append(f"{oname} relative error {errs[oname]:.3g} > tolerance {tol:.3g}")
    except Exception as exc:  # noqa: BLE001 (e.g. out of memory in the float64 reference)
        return {**row, "status": "ERROR", "reason": "while checking against the reference: " + _short(exc)}
    row["rel_err"] = errs
    row["tolerance"] = dict(zip(OUTPUTS, tols))
    del got
    if bad:
        return {**row, "status": "WRONG", "reason": "; ".join(bad) + " (not timed)"}

    try:
        if unit.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(unit.device)
            base = torch.cuda.memory_allocated(unit.device)
            call()
            _sync(unit.device)
            row["peak_extra_bytes"] = torch.cuda.max_memory_allocated(unit.device) - base
        row.update(timer(call))
    except Exception as exc:  # noqa: BLE001
        return {**row, "status": "ERROR", "reason": "while timing: " + _short(exc)}
    return row


def _cfg_text(cfg) -> str:
    return f"{cfg[0]}×{cfg[1]} w{cfg[2]}/{cfg[3]} s{cfg[4]} p{cfg[5]}"


def _row_text(row: dict) -> str:
    """One provider row as a log line's tail: its time, or its status and reason."""
    return f"{row['median_ms'] * 1e3:.1f} µs" if "median_ms" in row else _status(row)[:160]


def _sweep_entry(case: Case, mode: str, skipped: str | None = None) -> dict:
    entry: dict = {"case": case.name, "mode": mode, "shape": case.shape, "rows": []}
    if skipped:
        entry["skipped"] = skipped
    return entry


def run_sweep(
    case: Case, mode: str, device: torch.device, smoke: bool, timer: Timer, deadline: float
) -> dict:
    """The triton backend at every SWEEP_TILES configuration (and its table's) on one unit."""
    from htc_kernels.star_attention import _triton_star

    why = hk.backends.triton_reasons(device)
    mod = None if why else _triton_star()
    if mod is None:
        return _sweep_entry(case, mode, "; ".join(why or ["the Triton kernel module failed to load"]))
    entry = _sweep_entry(case, mode)
    unit = make_unit(case, mode, device, smoke)
    table = tuple(mod.tile_config(case.head_dim, DTYPE, device, case.seq_len))
    entry["table"] = list(table)
    tiles = list(SMOKE_SWEEP_TILES if smoke else SWEEP_TILES)
    tiles += [table] if table not in tiles else []
    for cfg in tiles:
        tile_cfg = mod.TileConfig(*cfg)
        row = run_provider(
            f"htc triton {_cfg_text(cfg)}",
            unit,
            timer,
            deadline,
            factory=_htc("triton"),
            context=lambda c=tile_cfg: mod._override_tiles(c),
        )
        row["config"] = list(cfg)
        row["is_table"] = cfg == table
        entry["rows"].append(row)
        print(f"[sweep] {case.name} {mode} {_cfg_text(cfg)}: {_row_text(row)}", flush=True)
    del unit
    return entry


def render_sweep(sweeps: list[dict]) -> list[str]:
    lines = [
        "## Triton tile sweep",
        "",
        "The triton backend with other tile configurations (block_q×block_k, warps forward/backward, "
        "stages, persist: programs per SM, 0 = one per tile) than its table's "
        "(`_TILE_TABLE` in htc_kernels/triton/star_attention.py); the same "
        "reference check and timing as above. Speed-up: the table's time / this time (> 1: faster than "
        "the table's). Not part of the exit status.",
        "",
    ]
    for e in sweeps:
        lines.append(f"### sweep: {e['case']} {MODES[e['mode']]}: {e['shape']} bf16")
        lines.append("")
        if e.get("skipped"):
            lines += [f"Not run: {e['skipped']}.", ""]
            continue
        base = next((r for r in e["rows"] if r.get("is_table") and "median_ms" in r), None)
        lines += ["| config | µs | speed-up vs table | rel. err | status |", "|---|---|---|---|---|"]
        for r in e["rows"]:
            t = r.get("median_ms")
            cells = [_cfg_text(r["config"]) + (" (table)" if r.get("is_table") else "")]
            cells.append(_fmt(t * 1e3 if t else None, 4))
            cells.append(f"{base['median_ms'] / t:.2f}×" if base and t else "")
            cells.append("/".join(f"{x:.1e}" for x in r.get("rel_err", {}).values()))
            cells.append(_status(r))
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        lines.append("")
    return lines


# --------------------------------------------------------------------------------------------------
# Targets and the report
# --------------------------------------------------------------------------------------------------


def triton_kernels() -> list[dict]:
    """The Triton star kernels this run compiled, as this machine's Triton built them: registers and
    spills from the driver, shared memory, and tile loads pipelined / waiting in their loops (TTGIR,
    htc_kernels/triton/_codegen.py). The same facts the codegen table records from triton 3.8 without
    a GPU, here for the Triton that ran."""
    from htc_kernels.triton import _codegen

    rows = []
    for name, fn in _codegen.KERNELS.items():
        for entry in getattr(fn, "device_caches", {}).values():
            for k in entry[0].values():  # (kernel_cache, ...) per device
                k._init_handles()
                consts = getattr(k.src, "constants", {}) or {}
                named = {fn.arg_names[key[0]]: v for key, v in consts.items() if isinstance(key, tuple)}
                pipelined, waiting = _codegen.loop_tile_loads(k.asm.get("ttgir", ""))
                rows.append({
                    "kernel": name, "exact": named.get("EXACT"), "persist": named.get("PERSIST"),
                    "block": [named.get("BLOCK_M"), named.get("BLOCK_N"), named.get("BLOCK_D")],
                    "num_warps": k.metadata.num_warps, "num_stages": k.metadata.num_stages,
                    "registers": k.n_regs, "spills": k.n_spills, "shared": k.metadata.shared,
                    "pipelined": pipelined, "waiting": waiting,
                })  # fmt: skip
    return rows


def render_triton_kernels(report: dict) -> list[str]:
    lines = ["## Triton kernels compiled in this run", ""]
    if report.get("triton_kernels_error"):
        return lines + [f"Not available: {report['triton_kernels_error']}", ""]
    lines += [
        'Registers and spills as the driver reports them; "pipelined / waiting": 2-D tile loads inside '
        "the visiting loop issued as async copies / waiting for their data (htc_kernels/triton/_codegen.py).",
        "",
        "| kernel | EXACT | PERSIST | BLOCK_M, BLOCK_N, BLOCK_D | warps | stages | registers | spills "
        "| shared B | pipelined / waiting |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.get("triton_kernels", []):
        lines.append(
            f"| {r['kernel']} | {r['exact']} | {r['persist']} | {', '.join(str(x) for x in r['block'])} "
            f"| {r['num_warps']} | {r['num_stages']} | {r['registers']} | {r['spills']} | {r['shared']} "
            f"| {r['pipelined']} / {r['waiting']} |"
        )
    return lines + [""]


def _target_text(mode: str, kind: str, peer: str | None, thr: float) -> str:
    if kind == "floor":
        return f"{MODES[mode]} ≤ {thr}× the HBM floor at {SPEC['hbm_bytes_per_s'] / 1e12:.2f} TB/s"
    if kind == "max_us":
        return f"{MODES[mode]} ≤ {thr:.0f} µs"
    return f"{MODES[mode]} ≥ {thr}× faster than {peer}"


def _no_time(rows: dict, name: str) -> str | None:
    """Why ``rows[name]`` has no time (None if it has one)."""
    row = rows.get(name)
    if row is None:
        return f"{name} was not run"
    if row["status"] != "ok":
        return f"{name}: {row['status']} ({row.get('reason', '')})"
    return None


def check_targets(units: list[dict]) -> list[dict]:
    """TARGETS checked for every htc provider of the run. An htc provider timed in no case gets one
    N/A entry (with its first reason) instead of one per target."""
    found = {(u["case"], u["mode"]): {r["provider"]: r for r in u["rows"]} for u in units}
    floors_of = {(u["case"], u["mode"]): u["floors"] for u in units}
    htc_names = sorted(
        {r["provider"] for u in units for r in u["rows"] if is_htc(r["provider"])} - UNTARGETED
    )
    results = []
    for name in htc_names:
        rows_of_name = [rows[name] for rows in found.values() if name in rows]
        if not any(r["status"] == "ok" for r in rows_of_name):
            first = rows_of_name[0]
            why = f"{first['status']} ({first.get('reason', '')})"
            results.append(
                {"htc": name, "verdict": "N/A", "text": "all targets", "detail": f"never timed: {why}"}
            )
            continue
        for case, mode, kind, peer, thr in TARGETS:
            res = {"case": case, "mode": mode, "kind": kind, "peer": peer, "threshold": thr, "htc": name}
            res["text"] = f"{case} {_target_text(mode, kind, peer, thr)}"
            rows = found.get((case, mode))
            why = "this case/mode was not run" if rows is None else _no_time(rows, name)
            if why is None and kind == "speedup":
                why = _no_time(rows, peer)
            if why is not None:
                results.append({**res, "verdict": "N/A", "detail": why})
                continue
            us = rows[name]["median_ms"] * 1e3
            if kind == "floor":
                floor = floors_of[(case, mode)]["hbm_spec_us"]
                res["measured"], ok = us / floor, us <= thr * floor
                detail = f"{us:.1f} µs = {us / floor:.2f}× the floor ({thr * floor:.1f} µs allowed)"
            elif kind == "max_us":
                res["measured"], ok = us, us <= thr
                detail = f"{us:.1f} µs"
            else:
                peer_us = rows[peer]["median_ms"] * 1e3
                res["measured"] = peer_us / us
                ok = res["measured"] >= thr
                detail = f"{res['measured']:.2f}× ({peer_us:.1f} µs vs {us:.1f} µs)"
            results.append({**res, "verdict": "PASS" if ok else "FAIL", "detail": detail})
    return results


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _status(row: dict) -> str:
    if row["status"] == "ok":
        return "ok"
    reason = row.get("reason", "")
    return f"{row['status']}: {reason if len(reason) <= 300 else reason[:300] + ' ...'}"


def _fmt(x: float | None, nd: int = 3) -> str:
    return "" if x is None else f"{x:.{nd}g}" if abs(x) < 10**nd else f"{x:.0f}"


def render_unit(u: dict) -> list[str]:
    f, rows = u["floors"], u["rows"]
    ours = [r for r in rows if is_htc(r["provider"]) and r["status"] == "ok"]
    lines = [
        f"### {u['case']} {MODES[u['mode']]}: {u['shape']} bf16, star "
        f"({100 * u['allowed_frac_of_s2']:.1f}% of S² allowed, "
        f"{100 * u['allowed_frac_of_causal']:.1f}% of causal)",
        "",
        f"Layout: {u['layout_text']}. Floors: HBM {f['bytes'] / 1e6:.1f} MB → {f['hbm_spec_us']:.1f} µs at "
        f"{SPEC['hbm_bytes_per_s'] / 1e12:.2f} TB/s (spec), {f['hbm_measured_us']:.1f} µs at the measured "
        f"copy rate; FLOPs {f['flops'] / 1e9:.2f} GFLOP → {f['flop_spec_us']:.1f} µs at "
        f"{SPEC['bf16_flop_per_s'] / 1e12:.0f} TFLOP/s, {f['flop_measured_us']:.1f} µs at the measured GEMM "
        f"rate. × floor = time / {f['floor_us']:.1f} µs.",
        "",
    ]
    head = ["provider", "median ms", "µs", "× floor"] + [f"{r['provider']} speed-up" for r in ours]
    head += [
        "rel. err (" + "/".join(OUTPUTS[: 4 if u["mode"] == "fwdbwd" else 1]) + ")",
        "peak extra MiB",
        "status",
    ]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        t = r.get("median_ms")
        cells = [r["provider"] + (" †" if r["provider"] in DIFFERENT_WORK else "")]
        cells += [_fmt(t), _fmt(t * 1e3 if t else None, 4), _fmt(t * 1e3 / f["floor_us"] if t else None)]
        for o in ours:
            cells.append("" if not t or o is r else f"{t / o['median_ms']:.2f}×")
        cells.append("/".join(f"{e:.1e}" for e in r.get("rel_err", {}).values()))
        peak = r.get("peak_extra_bytes")
        cells.append("" if peak is None else f"{peak / 2**20:.0f}")
        cells.append(_status(r))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    floor_rows = (
        ("floor: HBM at the measured copy rate", f["hbm_measured_us"]),
        (f"floor: HBM at {SPEC['hbm_bytes_per_s'] / 1e12:.2f} TB/s", f["hbm_spec_us"]),
        ("floor: FLOPs at the measured GEMM rate", f["flop_measured_us"]),
    )
    for name, us in floor_rows:  # bounds, not measurements: "speed-up" < 1 = htc's share of the floor
        cells = [name, _fmt(us / 1e3), _fmt(us, 4), _fmt(us / f["floor_us"])]
        cells += [f"{us / 1e3 / o['median_ms']:.2f}×" for o in ours]
        lines.append("| " + " | ".join(cells + ["", "", "bound, not measured"]) + " |")
    lines.append("")
    if ours:
        lines.append(
            "Floor rows are bounds, not measurements: their speed-up is floor / htc (1.00× = at the floor)."
        )
    if any(r["provider"] in DIFFERENT_WORK for r in rows):
        lines.append(
            "† dense causal attention: different (more) work, a lower bound; checked against causal "
            "attention."
        )
    fb = u["notes"].get("flex_block_mask_ms")
    if fb:
        built = f"first build {fb['first']:.2f} ms"
        if fb["median_rebuild"] is not None:
            built += f", rebuild {fb['median_rebuild']:.2f} ms (median of {fb['rebuilds']})"
        skipped = f", {fb['sparsity_pct']:.1f}% of blocks skipped" if fb["sparsity_pct"] is not None else ""
        lines.append(
            f"FlexAttention block mask (block size {fb['block_size']}{skipped}): {built}; "
            "not in the flex row."
        )
    flex = next((r for r in rows if r["provider"] == "flex compiled" and "first_call_s" in r), None)
    if flex and not u["notes"].get("flex_note"):
        lines.append(f"flex compiled: first call (torch.compile) {flex['first_call_s']:.1f} s, not timed.")
    if u["notes"].get("flex_note"):
        lines.append(u["notes"]["flex_note"] + ".")
    lines.append("")
    return lines


def render(report: dict) -> str:
    env, rates, timing = report["environment"], report["rates"], report["timing"]
    lines = [f"# star_attention on {env['device']} (bf16)", ""]
    if report["smoke"]:
        lines += ["**Smoke run** (tiny shapes): checks the pipeline only; its numbers mean nothing.", ""]
    lines += [
        f"{report['time_utc']} · commit {env.get('git_commit') or '?'} · torch {env['torch']} "
        f"(CUDA {env['torch_cuda']}) · triton {env['packages'].get('triton')} · driver "
        f"{env.get('driver') or '-'} · python {env['python']}. Generated by "
        f"`python -m benchmarks.gpu_star_attention {' '.join(report['argv'])}`.",
        "",
        f"Device: {env['device']}"
        + (
            f", compute capability {env['capability']}, {env['sm_count']} SMs, {env['memory_gib']} GiB, "
            f"L2 {env['l2_mib']} MiB"
            if "capability" in env
            else ""
        )
        + f". Missing Python packages: {', '.join(env['missing']) or 'none'}.",
        "",
        f"Measured: device-to-device copy {rates['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write), "
        f"bf16 GEMM {rates['bf16_gemm_flop_per_s'] / 1e12:.0f} TFLOP/s ({rates['gemm_n']}³). Spec anchors: "
        f"{SPEC['name']}, {SPEC['hbm_bytes_per_s'] / 1e12:.2f} TB/s, "
        f"{SPEC['bf16_flop_per_s'] / 1e12:.0f} TFLOP/s.",
        "",
        f"Timing: {timing['timer']}, median of {timing['min_reps']}–{timing['max_reps']} repetitions "
        f"(~{timing['rep_ms']:.0f} ms) after ~{timing['warmup_ms']:.0f} ms of warm-up"
        + (
            f", L2 flushed ({timing['l2_flush_bytes'] >> 20} MiB write) before each"
            if timing["l2_flush_bytes"]
            else ""
        )
        + (
            f", a {timing['host_lead_cycles']:,}-cycle GPU sleep before each start event (device time, "
            "not the host's launch time)"
            if timing.get("host_lead_cycles")
            else ""
        )
        + "; torch.compile and first-call costs excluded. Every provider is checked against the float64 "
        "reference first (tolerance: 2× the error of the dense math in bf16 + 2e-3); a WRONG one is not "
        "timed. Speed-up columns: that row's time / the htc row's time (> 1: htc is faster).",
        "",
        "## Targets (issue 8, on an H100; reported, not asserted)",
        "",
    ]
    for t in report["targets"]:
        lines.append(f"- **{t['verdict']}** {t['htc']} · {t['text']}: {t['detail']}")
    if not report["targets"]:
        lines.append("- no htc provider in this run")
    lines += [""]
    lines += ["## Results", ""]
    for u in report["units"]:
        lines += render_unit(u)
    for case, mode, why in report["not_run"]:
        lines.append(f"- {case} {MODES[mode]}: not run ({why})")
    if report.get("sweeps"):
        lines += [""] + render_sweep(report["sweeps"])
    if "triton_kernels" in report or "triton_kernels_error" in report:
        lines += [""] + render_triton_kernels(report)
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------

PACKAGES = ("triton", "xformers", "transformers", "numpy", "pytest", "pytest-benchmark", "ninja", "pybind11")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str]) -> str | None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def environment() -> dict:
    cuda = torch.cuda.is_available()
    env: dict = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
    }
    if cuda:
        p = torch.cuda.get_device_properties(0)
        env["capability"] = f"{p.major}.{p.minor}"
        env["sm_count"] = p.multi_processor_count
        env["memory_gib"] = round(p.total_memory / 2**30, 1)
        env["l2_mib"] = getattr(p, "L2_cache_size", 0) / 2**20 or None
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        env["driver"] = smi.splitlines()[0] if smi else None
    env["packages"] = {name: _version(name) for name in PACKAGES}
    env["missing"] = [name for name, ver in env["packages"].items() if ver is None]
    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    out = _run([nvcc, "--version"])
    env["nvcc"] = out.splitlines()[-1] if out else None
    env["git_commit"] = _run(
        ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"]
    )
    try:
        env["htc_kernels"] = hk.info()
    except Exception as exc:  # noqa: BLE001
        env["htc_kernels"] = {"error": _short(exc)}
    env["env_vars"] = {
        k: os.environ.get(k)
        for k in (
            "CUDA_HOME",
            "TORCH_CUDA_ARCH_LIST",
            "TRITON_INTERPRET",
            "HTC_POISON_OUTPUTS",
            "CUDA_VISIBLE_DEVICES",
        )
    }
    return env


def slug(device: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


PROFILE_ITERS = 2


def profile(specs: str, device: torch.device, smoke: bool) -> int:
    """Run the htc units named in ``specs`` (``case:mode:backend``, comma-separated) for a profiler; 0 if
    every one ran and matched the reference, 3 if one was wrong or raised, 2 for a bad spec."""
    cases = SMOKE_CASES if smoke else GPU_CASES
    runs = []
    for spec in specs.split(","):
        parts = spec.split(":")
        if len(parts) != 3 or parts[0] not in cases or parts[1] not in ("fwd", "fwdbwd"):
            print(f"gpu_star_attention: bad --profile unit {spec!r} (want case:fwd|fwdbwd:backend, cases "
                  f"{sorted(cases)})", file=sys.stderr)  # fmt: skip
            return 2
        runs.append(parts)
    cuda = device.type == "cuda"
    status = 0
    for case_name, mode, backend in runs:
        unit = make_unit(cases[case_name], mode, device, smoke)
        call = _call(_htc(backend)(unit), unit)
        try:
            refs, tols = references(unit, causal=False)
            errs = [round(common.rel_err(a, b), 6) for a, b in zip(call(), refs)]
        except Exception as exc:  # noqa: BLE001 (a backend that refuses or fails: say so, go on)
            print(f"[profile] {case_name} {mode} {backend}: ERROR {_short(exc)}", flush=True)
            status = 3
            continue
        if any(e > t for e, t in zip(errs, tols)):
            print(f"[profile] {case_name} {mode} {backend}: WRONG (errors {errs}, tolerances {tols})")
            status = 3
            continue
        for _ in range(3):  # warm-up: compilation, autotuning, caches outside the profiled range
            call()
        _sync(device)
        if cuda:
            torch.cuda.profiler.start()
        for _ in range(PROFILE_ITERS):
            with torch.autograd.profiler.record_function(f"htc/{case_name}/{mode}/{backend}"):
                if cuda:
                    torch.cuda.nvtx.range_push(f"htc/{case_name}/{mode}/{backend}")
                call()
                if cuda:
                    torch.cuda.nvtx.range_pop()
        _sync(device)
        if cuda:
            torch.cuda.profiler.stop()
        print(f"[profile] {case_name} {mode} {backend}: ran {PROFILE_ITERS}x (errors {errs})", flush=True)
        del unit
    return status


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_star_attention",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", help=f"output folder (default {RESULTS}; --smoke: a new temp dir)")
    p.add_argument(
        "--smoke", action="store_true", help="tiny shapes on the CPU (or GPU): checks the pipeline"
    )
    p.add_argument("--quick", action="store_true", help="only the units with targets; fewer repetitions")
    p.add_argument("--cases", help=f"comma-separated subset of {','.join(GPU_CASES)}")
    p.add_argument("--providers", help=f"comma-separated subset of {','.join(PROVIDERS)}")
    p.add_argument("--budget-s", type=float, default=None, help="start no new measurement after this")
    p.add_argument("--no-flush", action="store_true", help="do not flush the L2 before each repetition")
    p.add_argument("--env", action="store_true", help="print the environment as JSON and exit")
    p.add_argument("--print-stem", action="store_true", help="print the output file stem and exit")
    p.add_argument("--profile", metavar="CASE:MODE:BACKEND,...", help="run these htc units for a profiler")
    sweep = p.add_mutually_exclusive_group()
    sweep.add_argument(
        "--sweep", action="store_true", help="run the Triton tile sweep (default: not with --quick)"
    )
    sweep.add_argument("--no-sweep", action="store_true", help="no Triton tile sweep")
    return p.parse_args(argv)


def _write(report: dict, out: Path, stem: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / f"{stem}.md", out / f"{stem}.json"
    md.write_text(render(report))
    js.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return md, js


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if args.smoke:
        stem = f"smoke-{device.type}"
    else:
        stem = f"gpu-{slug(torch.cuda.get_device_name(0))}" if cuda else "no-gpu"
    if args.print_stem:
        print(stem)
        return 0
    if args.env:
        print(json.dumps(environment(), indent=1, default=str))
        return 0
    if not cuda and not args.smoke:
        print(
            "gpu_star_attention: no CUDA device visible to torch; on a CPU machine use --smoke",
            file=sys.stderr,
        )
        return 2
    if args.profile:
        return profile(args.profile, device, args.smoke)
    start = time.monotonic()
    deadline = start + args.budget_s if args.budget_s else math.inf
    cases = SMOKE_CASES if args.smoke else GPU_CASES
    units = [(c, m) for c, m in FULL_UNITS if c in cases]
    if args.quick:
        units = [x for x in units if x in QUICK_UNITS]
    if args.cases:
        wanted = set(args.cases.split(","))
        if wanted - set(GPU_CASES):
            print(f"gpu_star_attention: unknown cases {sorted(wanted - set(GPU_CASES))}", file=sys.stderr)
            return 2
        units = [x for x in units if x[0] in wanted]
    providers = list(PROVIDERS) + ([STAND_IN] if args.smoke else [])
    if args.providers:
        providers = [p for p in providers if p in args.providers.split(",")]
    if args.smoke:
        timer = Timer(device, warmup_ms=0, rep_ms=0, min_reps=2, max_reps=2, flush=False, est_calls=1)
    elif args.quick:
        timer = Timer(device, warmup_ms=10, rep_ms=40, flush=not args.no_flush)
    else:
        timer = Timer(device, flush=not args.no_flush)
    out = (
        Path(args.out)
        if args.out
        else (Path(tempfile.mkdtemp(prefix="htc-gpu-smoke-")) if args.smoke else RESULTS)
    )

    env = environment()
    print(f"[bench] {env['device']}: torch {env['torch']}, triton {env['packages']['triton']}, "
          f"missing: {', '.join(env['missing']) or 'nothing'}", flush=True)  # fmt: skip
    if os.environ.get("HTC_POISON_OUTPUTS") == "1":
        print("[bench] WARNING: HTC_POISON_OUTPUTS=1: htc kernels fill their outputs with NaN first (timed)")
    rates = measure_rates(device, timer, args.smoke)
    print(f"[bench] copy {rates['copy_bytes_per_s'] / 1e12:.3f} TB/s, bf16 GEMM "
          f"{rates['bf16_gemm_flop_per_s'] / 1e12:.1f} TFLOP/s", flush=True)  # fmt: skip
    report = {
        "schema": 1,
        "smoke": args.smoke,
        "argv": argv,
        "time_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "environment": env,
        "rates": rates,
        "spec": SPEC,
        "timing": timer.describe(),
        "units": [],
        "not_run": [],
        "targets": [],
        "sweeps": [],
    }
    sweep = args.sweep or (not args.quick and not args.no_sweep)
    picked = set(args.cases.split(",")) if args.cases else set(cases)
    sweep_units = [(c, m) for c, m in SWEEP_UNITS if c in cases and c in picked]
    # The units with targets, then the sweep, then the rest (the budget may not reach them).
    first = [x for x in units if x in QUICK_UNITS]
    order = first + (["sweep"] if sweep else []) + [x for x in units if x not in QUICK_UNITS]
    for item in order:
        if item == "sweep":
            for case_name, mode in sweep_units:
                case = cases[case_name]
                if time.monotonic() > deadline:
                    entry = _sweep_entry(case, mode, "time budget exhausted")
                else:
                    try:
                        entry = run_sweep(case, mode, device, args.smoke, timer, deadline)
                    except Exception as exc:  # noqa: BLE001 (the sweep is exploratory: report, go on)
                        entry = _sweep_entry(case, mode, "ERROR: " + _short(exc))
                report["sweeps"].append(entry)
                _write(report, out, stem)
                if cuda:
                    torch.cuda.empty_cache()
            continue
        case_name, mode = item
        if time.monotonic() > deadline:
            report["not_run"].append((case_name, mode, f"time budget of {args.budget_s:.0f} s exhausted"))
            continue
        case = cases[case_name]
        t0 = time.monotonic()
        try:
            unit = make_unit(case, mode, device, args.smoke)
            pairs = unit.allowed_pairs  # summed over the batch, per head
        except Exception as exc:  # noqa: BLE001 (e.g. a CUDA error left by an earlier unit)
            report["not_run"].append((case_name, mode, "ERROR setting it up: " + _short(exc)))
            continue
        entry = {
            "case": case.name,
            "mode": mode,
            "shape": case.shape,
            "layout_text": case.layout_text,
            "allowed_pairs_per_head": pairs,
            "allowed_frac_of_s2": pairs / (case.batch * case.seq_len**2),
            "allowed_frac_of_causal": pairs / (case.batch * case.seq_len * (case.seq_len + 1) / 2),
            "floors": floors(unit, rates),
            "rows": [],
        }
        for name in providers:
            row = run_provider(name, unit, timer, deadline)
            entry["rows"].append(row)
            print(f"[bench] {case.name} {mode} {name}: {_row_text(row)}", flush=True)
        entry["notes"] = {k: v for k, v in unit.notes.items() if not k.startswith("ref_")}
        entry["seconds"] = time.monotonic() - t0
        report["units"].append(entry)
        report["targets"] = check_targets(report["units"])
        _write(report, out, stem)  # after every unit: a killed run keeps what it measured
        del unit
        if cuda:
            torch.cuda.empty_cache()
    report["targets"] = check_targets(report["units"])
    if cuda:
        try:
            report["triton_kernels"] = triton_kernels()
        except Exception as exc:  # noqa: BLE001 (a report of the compiled kernels: never fails the run)
            report["triton_kernels_error"] = _short(exc)
    report["seconds"] = time.monotonic() - start
    md, js = _write(report, out, stem)
    text = render(report)
    results_at = text.index("## Results")
    print(text[results_at:] + "\n" + text[:results_at])  # the targets last: the end of the log shows them
    print(f"[bench] wrote {md} and {js} ({report['seconds']:.0f} s)")
    failed = [(u["case"], u["mode"], r["provider"], r["status"]) for u in report["units"] for r in u["rows"]]
    failed = [f for f in failed if f[3] in ("WRONG", "ERROR")]
    failed += [(c, m, "(unit)", "ERROR") for c, m, why in report["not_run"] if why.startswith("ERROR")]
    for f in failed:
        print(f"[bench] {f[3]}: {f[0]} {f[1]} {f[2]}", file=sys.stderr)
    return 3 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
