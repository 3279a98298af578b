"""Shared fixtures of the benchmark suites (contract and helpers: ``benchmarks/common.py``).

Fixtures:
    rates        measured machine rates, once per session (sgemm / bf16 GEMM GFLOP/s, copy GB/s)
    floor_ms     ``floor_ms(flops, nbytes, dtype=torch.float32) -> ms`` at those rates
    threads      the thread count benchmarks run with (``HTC_BENCH_THREADS`` or torch's default);
                 the fixture also pins torch to it for the test and restores it afterwards
    peak_mem     ``peak_mem(fn) -> bytes``: peak extra bytes torch allocates during ``fn()``

The measured rates are also written into the JSON's ``machine_info["htc_rates"]`` so the report can
print them.
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks import common

_RATES: dict | None = None
_LOAD: dict = {}


def pytest_sessionstart(session):
    # Other processes competing for the cores make multi-threaded timings (and the thread-scaling
    # ratio) unreliable; the report warns when the machine was busy before we started.
    _LOAD["loadavg_at_start"] = list(os.getloadavg())


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
