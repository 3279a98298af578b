"""Benchmark suites (pytest-benchmark) and the comparison report (python -m benchmarks.report)."""
