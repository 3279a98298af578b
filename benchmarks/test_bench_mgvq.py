"""mgvq_lookup benchmarks (issue 4): our fused kernel against the lookups people use today.

Cases: MGVQ-f16c32-g8 (G=8, K=2048, d=4, cosine) at 1 and 16 images of 441 tokens; G=4, K=4096, d=8
(cosine, 16 images). Providers (each checked against the float64 brute force before it is timed):

    htc          hk.mgvq_lookup(backend="cpu"): fused normalise + score + arg-best + gather
    mgvq_sort    MGVQ's own code path: einsum distance rows, full descending sort, take the first
    bmm_argmax   torch.bmm of unit z and unit codes per group -> [G, N, K], argmax
    cdist_argmin torch.cdist per group -> [G, N, K], argmin (unit vectors: same nearest code)
    faiss_ip     faiss IndexFlatIP per group (codes added once, outside the timing), k=1 search

Contract (benchmarks/common.py, benchmark-infra branch): benchmark.group = "mgvq_lookup: <case>",
extra_info["provider"], ["floor_ms"] (FLOPs 2*N*G*K*d at the sgemm rate measured in this process),
["peak_extra_mem_bytes"] (resident-set high-water mark above the pre-call RSS, Linux clear_refs).
Ratios against htc are printed at the end of the module. Absolute times on the shared 2-core VMs
drift; the ratios measured in the same run are what counts.
"""

from __future__ import annotations

import ctypes
import functools

import pytest
import torch
import torch.nn.functional as F

import htc_kernels as hk
from benchmarks.common import stat_ms
from htc_kernels import _ext

try:
    import faiss
except ImportError:  # pragma: no cover
    faiss = None

TOKENS_PER_IMAGE = 441  # 336x336 image, f16 -> 21x21
CASES = {  # id -> (images, G, K, d)
    "1 image G8 K2048 d4 cosine": (1, 8, 2048, 4),
    "16 images G8 K2048 d4 cosine": (16, 8, 2048, 4),
    "16 images G4 K4096 d8 cosine": (16, 4, 4096, 8),
}
PROVIDERS = ["htc", "mgvq_sort", "bmm_argmax", "cdist_argmin", "faiss_ip"]
SLOW = {"mgvq_sort": 2, "cdist_argmin": 3, "bmm_argmax": 5, "faiss_ip": 5}  # pedantic rounds
_RESULTS: dict[str, dict[str, float]] = {}

pytestmark = pytest.mark.skipif(not _ext.available(), reason="the compiled extension is not loaded")


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def peak_extra_bytes(fn) -> int | None:
    """Resident-set high-water mark during fn() above the RSS before it (Linux only)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap pages, so reuse is not hidden
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    before = _rss_kb("VmRSS:")
    fn()
    return max(0, _rss_kb("VmHWM:") - before) * 1024


@functools.cache
def make_case(case: str):
    images, G, K, d = CASES[case]
    g = torch.Generator().manual_seed(1234)
    z = torch.randn(images, TOKENS_PER_IMAGE, G, d, generator=g)
    codebook = torch.randn(G, K, d, generator=g)
    zn = F.normalize(z.double(), dim=-1).reshape(-1, G, d)
    cbn = F.normalize(codebook.double(), dim=-1)
    scores = torch.einsum("ngd,gkd->ngk", zn, cbn)
    return z, codebook, scores.max(-1).values


def make_provider(name: str, z: torch.Tensor, codebook: torch.Tensor):
    """fn() -> indices [N, G] for provider ``name`` (setup outside the returned function)."""
    G, K, d = codebook.shape
    if name == "htc":
        return lambda: hk.mgvq_lookup(z, codebook, normalize=True, backend="cpu")[1].reshape(-1, G)
    if name == "mgvq_sort":

        def run():  # MGVQ quantize(): l2-normalise, einsum distance rows, sort each row fully
            zz = F.normalize(z.reshape(-1, G, d), dim=-1)
            emb = F.normalize(codebook, dim=-1)
            dist = torch.einsum("ngd,gkd->ngk", zz, emb)
            return torch.sort(dist, dim=-1, descending=True)[1][..., 0]

        return run
    if name == "bmm_argmax":

        def run():
            zz = F.normalize(z.reshape(-1, G, d), dim=-1).transpose(0, 1)  # [G, N, d]
            emb = F.normalize(codebook, dim=-1)
            return torch.bmm(zz, emb.transpose(1, 2)).argmax(-1).transpose(0, 1)

        return run
    if name == "cdist_argmin":

        def run():
            zz = F.normalize(z.reshape(-1, G, d), dim=-1).transpose(0, 1).contiguous()
            emb = F.normalize(codebook, dim=-1)
            return torch.cdist(zz, emb).argmin(-1).transpose(0, 1)

        return run
    if name == "faiss_ip":
        if faiss is None:
            pytest.skip("faiss is not installed")
        emb = F.normalize(codebook, dim=-1).numpy()
        indexes = []
        for g in range(G):
            index = faiss.IndexFlatIP(d)
            index.add(emb[g])
            indexes.append(index)

        def run():
            zz = F.normalize(z.reshape(-1, G, d), dim=-1)
            out = torch.empty(zz.shape[0], G, dtype=torch.int64)
            for g in range(G):
                q = zz[:, g].contiguous().numpy()
                _, idx = indexes[g].search(q, 1)
                out[:, g] = torch.from_numpy(idx[:, 0])
            return out

        return run
    raise AssertionError(name)


def check_indices(idx: torch.Tensor, z, codebook, best) -> None:
    G, K, d = codebook.shape
    zn = F.normalize(z.double(), dim=-1).reshape(-1, G, d)
    cbn = F.normalize(codebook.double(), dim=-1)
    chosen = (zn * cbn[torch.arange(G), idx]).sum(-1)
    gap = (best - chosen).max().item()
    assert gap <= 1e-5, f"chosen code is {gap:.3g} worse than the best"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", list(CASES))
def test_mgvq_lookup(benchmark, case, provider, floor_ms):
    z, codebook, best = make_case(case)
    fn = make_provider(provider, z, codebook)
    check_indices(fn(), z, codebook, best)  # correctness before timing
    images, G, K, d = CASES[case]
    n = images * TOKENS_PER_IMAGE
    benchmark.group = f"mgvq_lookup: {case}"
    benchmark.extra_info["provider"] = provider
    benchmark.extra_info["threads"] = torch.get_num_threads()
    # FMA floor: one multiply-add per (token, group, code, dim) at the measured sgemm rate; bytes of
    # z, the codebook and the outputs at the copy rate.
    nbytes = 4 * (2 * n * G * d + G * K * d) + 8 * n * G
    benchmark.extra_info["floor_ms"] = floor_ms(2.0 * n * G * K * d, nbytes)
    peak = peak_extra_bytes(fn)
    if peak is not None:
        benchmark.extra_info["peak_extra_mem_bytes"] = peak
    if provider == "htc" and case == "16 images G8 K2048 d4 cosine":  # issue 4's targets
        benchmark.extra_info["targets"] = [
            {"kind": "speedup", "peer": "faiss_ip", "min": 15},
            {"kind": "speedup", "peer": "bmm_argmax", "min": 10},
            {"kind": "speedup", "peer": "mgvq_sort", "min": 100},
            {"kind": "floor", "max": 3},
        ]
    rounds = SLOW.get(provider)
    if rounds is not None:
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
    else:
        benchmark.pedantic(fn, rounds=20, iterations=1, warmup_rounds=2)
    ms = stat_ms(benchmark)
    if ms is None:
        return
    _RESULTS.setdefault(case, {})[provider] = ms
    _RESULTS[case]["floor"] = benchmark.extra_info["floor_ms"]
    if peak is not None:
        _RESULTS[case][provider + "_mem"] = peak


@pytest.fixture(scope="module", autouse=True)
def _print_ratios(request):
    yield
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    if tr is None or not _RESULTS:
        return
    tr.write_line("")
    tr.write_line("mgvq_lookup: median ms, and each peer's time / htc's (same run; higher = htc faster)")
    for case, res in _RESULTS.items():
        if "htc" not in res:
            continue
        h = res["htc"]
        parts = [f"htc {h:.2f} ms (floor {res['floor']:.2f} ms, {h / res['floor']:.2f}x floor)"]
        for p in PROVIDERS[1:]:
            if p in res:
                parts.append(f"{p} {res[p]:.1f} ms = {res[p] / h:.1f}x")
        tr.write_line(f"  {case}: " + "; ".join(parts))
        mem = [f"{p} {res[p + '_mem'] / 2**20:.1f} MiB" for p in PROVIDERS if p + "_mem" in res]
        if mem:
            tr.write_line("    peak extra RSS: " + ", ".join(mem))
