"""Helpers shared by every benchmark family (fixtures that wrap them live in ``conftest.py``).

The benchmark contract (read by ``benchmarks/report.py``)::

    benchmark.group = "<family>: <case>"             # e.g. "star_attention: llava fp32 fwd"
    benchmark.extra_info["provider"] = "htc"         # our kernel is "htc"; peers any other name
    benchmark.extra_info["floor_ms"] = floor_ms(...)  # optional: roofline floor of the case
    benchmark.extra_info["peak_extra_mem_bytes"]     # optional: see peak_alloc_bytes()
    benchmark.extra_info["threads"] = n               # torch intra-op threads used
    benchmark.extra_info["targets"] = [...]           # optional, on the htc row: see report.py

Timings on these shared 2-core machines drift by tens of percent between runs; only ratios
measured in the same run (and against rates measured in the same run) are meaningful.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import statistics
import time
from collections.abc import Callable

import torch


def stat_ms(benchmark, stat: str = "median") -> float | None:
    """A statistic of the rounds just timed, in ms; ``None`` under ``--benchmark-disable`` (the body ran
    once as a test, untimed: there are no stats, and the figures derived from them are left out)."""
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else getattr(stats.stats, stat) * 1e3


# --------------------------------------------------------------------------------------------------
# Machine rates and the floor
# --------------------------------------------------------------------------------------------------


def _best_seconds(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm up (allocations, oneDNN primitive creation)
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _onednn_sgemm_gflops(n: int) -> float | None:
    """fp32 GEMM rate of oneDNN (torch's ``mkldnn_linear`` on oneDNN tensors), or None where this
    torch has no oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return None
    a = torch.randn(n, n).to_mkldnn()
    b = torch.randn(n, n).to_mkldnn()
    t = _best_seconds(lambda: torch._C._nn.mkldnn_linear(a, b), repeat=5)
    return 2 * n**3 / t / 1e9


@functools.cache
def machine_rates(threads: int | None = None) -> dict:
    """Measured peak-ish rates of this machine, with ``threads`` torch threads (default: current).

    - ``sgemm_gflops``: fp32 GEMM of 2048×2048 matrices, best of 5 (2·n³ FLOPs): the faster of
      ``torch.mm`` (MKL) and oneDNN's (``mkldnn_linear``, where torch has it). On AMD Zen 5 MKL's
      sgemm ran at about half of oneDNN's and below our own kernel, so a floor at MKL's rate alone
      was no floor there (README, "Performance on the CPU"). ``sgemm_mkl_gflops`` and
      ``sgemm_onednn_gflops`` (None where unavailable) keep both readings.
    - ``bf16_gemm_gflops``: the same in bf16 (a 16-bit case's floor takes the faster of the two:
      a kernel may convert to fp32 tiles, so torch's bf16 GEMM rate alone is not a floor).
    - ``copy_gbps``: ``copy_`` of a 256 MiB fp32 tensor, best of 5, counting bytes read + written
      (so a floor's byte count is "bytes read + bytes written" too).

    Computed once per process (per thread count).
    """
    with num_threads(threads or torch.get_num_threads()) as n:
        n_mm = 2048
        rates = {"threads": n}
        for key, dtype in (("sgemm_mkl_gflops", torch.float32), ("bf16_gemm_gflops", torch.bfloat16)):
            a = torch.randn(n_mm, n_mm).to(dtype)
            b = torch.randn(n_mm, n_mm).to(dtype)
            c = torch.empty(n_mm, n_mm, dtype=dtype)
            t = _best_seconds(lambda a=a, b=b, c=c: torch.mm(a, b, out=c), repeat=5)
            rates[key] = 2 * n_mm**3 / t / 1e9
        rates["sgemm_onednn_gflops"] = _onednn_sgemm_gflops(n_mm)
        rates["sgemm_gflops"] = max(rates["sgemm_mkl_gflops"], rates["sgemm_onednn_gflops"] or 0.0)
        src = torch.randn(64 * 2**20)
        dst = torch.empty_like(src)
        t = _best_seconds(lambda: dst.copy_(src), repeat=5)
        rates["copy_gbps"] = 2 * src.nbytes / t / 1e9
    return rates


def floor_ms(flops: float, nbytes: float, dtype: torch.dtype = torch.float32, rates=None) -> float:
    """Roofline floor in ms: ``max(flops / gemm_rate, nbytes / copy_rate)`` with this machine's
    measured rates. FLOPs at the sgemm rate; bf16/fp16 FLOPs at the faster of the bf16 GEMM and
    sgemm rates (a 16-bit kernel may compute in fp32 tiles: where torch's bf16 GEMM is slower than
    its sgemm, as on CPUs without AVX512-BF16/AMX, the bf16 rate alone would be no floor)."""
    rates = rates or machine_rates()
    gemm = rates["sgemm_gflops"]
    if dtype in (torch.bfloat16, torch.float16):
        gemm = max(gemm, rates["bf16_gemm_gflops"])
    return max(flops / (gemm * 1e9), nbytes / (rates["copy_gbps"] * 1e9)) * 1e3


# --------------------------------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def num_threads(n: int):
    """Run the block with ``n`` torch intra-op threads (and OpenMP's, which torch sets); restore."""
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield int(n)
    finally:
        torch.set_num_threads(old)


def default_threads() -> int:
    """Threads benchmarks run with: ``HTC_BENCH_THREADS`` if set, else torch's current setting
    (``make bench`` exports ``OMP_NUM_THREADS=$(nproc)``)."""
    env = os.environ.get("HTC_BENCH_THREADS")
    return int(env) if env else torch.get_num_threads()


# --------------------------------------------------------------------------------------------------
# Peak extra memory
# --------------------------------------------------------------------------------------------------


def peak_alloc_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes live in torch's CPU allocator during ``fn()``, counted from the call's start.

    How: ``torch.profiler`` with ``profile_memory=True`` records every allocation and free made
    through c10's CPU allocator (every tensor: ``torch.*`` ops, ``at::empty`` inside C++ kernels,
    autograd buffers). The peak of the running sum of those events is the extra memory the call
    needed, including its outputs (and gradients for a backward). Frees of tensors that existed
    before the call are ignored (matched by address).

    What it does NOT see: memory a C++ kernel gets from ``malloc``/``new``/``std::vector`` or thread
    stacks (see :func:`peak_rss_extra_bytes` for a whole-process cross-check). torch 2.14 has no CPU
    allocator statistics API (``torch.cpu.memory_stats`` does not exist), hence the profiler.
    """
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    # The Kineto events carry no address; the exported trace does (needed to ignore frees of tensors
    # allocated before the call).
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.load(open(f.name))
    events = [
        e["args"]
        for e in trace["traceEvents"]
        if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0
    ]
    events.sort(key=lambda a: a.get("Ev Idx", 0))
    mine: dict[int, int] = {}
    live = peak = 0
    for a in events:
        addr, nbytes = a["Addr"], int(a["Bytes"])
        if nbytes > 0:
            mine[addr] = nbytes
            live += nbytes
            peak = max(peak, live)
        elif addr in mine:
            live -= mine.pop(addr)
    return int(peak)


_RSS_PROBE = r"""
import os, sys, json
sys.path[:0] = json.loads(os.environ["HTC_PROBE_PATH"])
import importlib, torch
def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
mod, name = os.environ["HTC_PROBE_FN"].rsplit(":", 1)
factory = getattr(importlib.import_module(mod), name)
fn = factory(**json.loads(os.environ["HTC_PROBE_KWARGS"]))   # builds inputs; returns the call
torch.set_num_threads(int(os.environ["HTC_PROBE_THREADS"]))
if isinstance(fn, tuple):                                     # (warm-up on tiny inputs, call)
    warm, fn = fn
    warm()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")                                              # reset VmHWM to the current RSS
base = status("VmRSS")
out = fn()
print(json.dumps({"extra": status("VmHWM") - base}))
"""


def peak_rss_extra_bytes(factory: str, threads: int = 1, **kwargs) -> int | None:
    """Whole-process cross-check of :func:`peak_alloc_bytes`: in a fresh Python process, build
    the inputs with ``factory`` (``"module:function"``, called with ``kwargs``, returning a
    zero-argument callable, or ``(warmup, call)``: the warm-up runs first so that code pages and
    thread stacks are not counted), reset the RSS high-water mark (``/proc/self/clear_refs``),
    make ONE call and return ``VmHWM - VmRSS_before``. Sees every page the call touched (malloc,
    thread stacks, allocator arenas, code paged in), at page granularity. Memory freed but still
    resident before the call can be reused unseen, so it may under-count; ``None`` without /proc.
    """
    import json
    import subprocess
    import sys

    if not os.path.exists("/proc/self/clear_refs"):
        return None
    env = dict(os.environ)
    env.update(
        HTC_PROBE_PATH=json.dumps(sys.path),
        HTC_PROBE_FN=factory,
        HTC_PROBE_KWARGS=json.dumps(kwargs),
        HTC_PROBE_THREADS=str(threads),
    )
    res = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE], env=env, capture_output=True, text=True, timeout=600
    )
    if res.returncode != 0:
        raise RuntimeError(f"RSS probe {factory}({kwargs}) failed:\n{res.stderr[-3000:]}")
    last = [line for line in res.stdout.splitlines() if line.startswith("{")][-1]
    return int(json.loads(last)["extra"])


# --------------------------------------------------------------------------------------------------
# Timing and correctness
# --------------------------------------------------------------------------------------------------


def rounds_for(seconds_per_call: float, budget_s: float = 1.0, lo: int = 3, hi: int = 40) -> int:
    """Rounds for ``benchmark.pedantic`` so a benchmark takes about ``budget_s`` (at least lo)."""
    return max(lo, min(hi, int(budget_s / max(seconds_per_call, 1e-6))))


def time_once(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def paired_ratio(
    htc_ms: Callable[[], float], peer_ms: Callable[[], float], pairs: int = 30, warmup: int = 2
) -> dict:
    """The peer's round time over htc's, rounds in strict alternation (htc, peer, htc, ..., htc), so
    both see the same machine state: drift between two separately timed rows on these shared VMs is
    larger than the few-percent targets read from it. Each peer round is compared with the mean of
    the htc rounds either side of it (a linear drift cancels), and every round follows one of the
    other callable: a round that followed its own (as when the order alternates within pairs) runs
    warm (its threads still spinning, its data in cache) where the other runs cold, which splits the
    ratios into two clusters and leaves their median anywhere between (0.82 to 1.13 for two builds in
    child processes that run at 1.00, 2026-11-24). Each callable runs one round and returns its time in ms.
    Returns ``{"ratio": median of the per-pair ratios, "pairs": n}`` (the form of
    ``extra_info["paired"][peer]``, read by report.py's ``"paired": true`` targets)."""
    for _ in range(warmup):
        htc_ms(), peer_ms()
    h = [htc_ms()]
    ratios = []
    for _ in range(pairs):
        p = peer_ms()
        h.append(htc_ms())
        ratios.append(2 * p / (h[-2] + h[-1]))
    return {"ratio": statistics.median(ratios), "pairs": pairs}


def wall_ms(fn: Callable[[], object]) -> Callable[[], float]:
    """``fn`` as a round for ``paired_ratio``: runs it once, returns the wall time in ms."""

    def round_ms() -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return round_ms


def rel_err(x: torch.Tensor, ref: torch.Tensor, kinds: torch.Tensor | None = None) -> float:
    """‖x − ref‖ / ‖ref‖ in float64 (inf if x has a NaN).

    With ``kinds`` (``[B or 1, S]`` token kinds of x's dim 2, e.g. ``layout.kinds``): the largest such
    error over the rows of each kind (TEXT, VISUAL, VOCO, PAD), so that a wrong row of a rare kind
    (one ``<voco>`` row of 680) is not diluted by the others; a kind whose reference rows are all zero
    (PAD) must be zero too.
    """
    x64, r64 = x.detach().double(), ref.detach().double()
    if not torch.isfinite(x64).all():
        return math.inf
    if kinds is None:
        return float((x64 - r64).norm() / r64.norm().clamp_min(1e-300))
    k = kinds.to(x64.device).long()[:, None, :, None]  # [B or 1, 1, S, 1] over [B, H, S, D]
    worst = 0.0
    for kind in k.unique().tolist():
        rows = (k == kind).expand_as(x64)
        diff, norm = float((x64 - r64)[rows].norm()), float(r64[rows].norm())
        worst = max(worst, diff / norm if norm > 0 else (math.inf if diff > 0 else 0.0))
    return worst
