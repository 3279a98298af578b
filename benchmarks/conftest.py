"""Shared fixtures of the benchmark suites (contract and helpers: ``benchmarks/common.py``).

Fixtures:
    rates        measured machine rates, once per session (sgemm / bf16 GEMM GFLOP/s, copy GB/s)
    floor_ms     ``floor_ms(flops, nbytes, dtype=torch.float32) -> ms`` at those rates
    threads      the thread count benchmarks run with (``HTC_BENCH_THREADS`` or torch's default);
                 the fixture also pins torch to it for the test and restores it afterwards
    peak_mem     ``peak_mem(fn) -> bytes``: peak extra bytes torch allocates during ``fn()``

The measured rates are also written into the JSON's ``machine_info["htc_rates"]`` so the report can
print them, and every skipped benchmark into ``machine_info["htc_skipped"]`` (pytest-benchmark's JSON
holds only the benchmarks that ran; the report must show why a row is missing).
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks import common

_RATES: dict | None = None
_LOAD: dict = {}
_SKIPPED: list[dict] = []
# pytest-benchmark skips every test that does not use the fixture under --benchmark-only: not a gap.
_NOT_A_BENCHMARK = "--benchmark-only"


def pytest_sessionstart(session):
    # Other processes competing for the cores make multi-threaded timings (and the thread-scaling
    # ratio) unreliable; the report warns when the machine was busy before we started.
    _LOAD["loadavg_at_start"] = list(os.getloadavg())


def _skip_reason(report) -> str:
    # A skip's longrepr is (path, lineno, "Skipped: <reason>").
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return reason.removeprefix("Skipped: ")


def _record_skip(nodeid: str, reason: str, bench=None) -> None:
    if _NOT_A_BENCHMARK in reason:
        return
    entry = {"nodeid": nodeid, "reason": reason}
    # A test that sets benchmark.group and extra_info["provider"] before pytest.skip() gets its skip
    # shown in that group's row of the report (the reason in place of the missing numbers).
    if bench is not None and getattr(bench, "group", None):
        entry["group"] = bench.group
        if "provider" in bench.extra_info:
            entry["provider"] = bench.extra_info["provider"]
    _SKIPPED.append(entry)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    # makereport (not logreport): the item is needed for the benchmark fixture's group and provider.
    report = yield
    if report.skipped:
        _record_skip(report.nodeid, _skip_reason(report), item.funcargs.get("benchmark"))
    return report


def pytest_collectreport(report):
    # A module-level importorskip (a missing optional package) skips a whole file at collection.
    if report.skipped:
        _record_skip(report.nodeid, _skip_reason(report))


@pytest.fixture(scope="session")
def threads() -> int:
    return common.default_threads()


@pytest.fixture(autouse=True)
def _pin_threads(threads):
    with common.num_threads(threads):
        yield


@pytest.fixture(scope="session")
def rates(threads) -> dict:
    global _RATES
    _RATES = common.machine_rates(threads)
    return _RATES


@pytest.fixture(scope="session")
def floor_ms(rates):
    def _floor(flops: float, nbytes: float, dtype: torch.dtype = torch.float32) -> float:
        return common.floor_ms(flops, nbytes, dtype, rates)

    return _floor


@pytest.fixture(scope="session")
def peak_mem():
    return common.peak_alloc_bytes


def pytest_benchmark_update_machine_info(config, machine_info):
    if _RATES is not None:
        machine_info["htc_rates"] = dict(_RATES)
    machine_info.update(_LOAD)
    machine_info["loadavg_at_end"] = list(os.getloadavg())
    machine_info["cpu_count"] = os.cpu_count()
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads_default"] = common.default_threads()
    # The settings that change what runs (the report's "reproduce" command shows them).
    machine_info["htc_env"] = {
        k: v for k, v in sorted(os.environ.items()) if k.startswith("HTC_BENCH_") or k == "OMP_NUM_THREADS"
    }
    # Called from pytest-benchmark's pytest_sessionfinish (when it saves the JSON): every test has
    # reported by then.
    machine_info["htc_skipped"] = list(_SKIPPED)
