"""Shared pytest-benchmark helpers for the kernel benchmarks.

Every benchmark times a kernel and the eager reference it replaces (imported from the op's
module, never re-implemented), synchronises inside the timed call, and records achieved
bandwidth and the speedup over the reference in ``extra_info``. Without a GPU they skip.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="kernel benchmarks need a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")


def _median_us(fn, iters: int = 200, warmup: int = 20) -> float:
    """Median wall time of ``fn`` in microseconds, synchronising around every call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1e6


@pytest.fixture
def bench_against():
    """Time ``fn`` with pytest-benchmark and record GB/s and the speedup over ``ref``.

    Usage: ``bench_against(benchmark, fn, ref, bytes_moved=..., label=...)``.
    ``bytes_moved`` is the napkin-maths minimum traffic of the op (what it must read and
    write), so ``gbps`` can be held against the GPU's bandwidth.
    """

    def run(benchmark, fn, ref, *, bytes_moved: int, **info):
        def timed():
            out = fn()
            torch.cuda.synchronize()
            return out

        ref_us = _median_us(ref)
        kern_us = _median_us(fn)
        benchmark.extra_info.update(info)
        benchmark.extra_info["kernel_median_us"] = round(kern_us, 2)
        benchmark.extra_info["eager_median_us"] = round(ref_us, 2)
        benchmark.extra_info["speedup_vs_eager"] = round(ref_us / kern_us, 3)
        benchmark.extra_info["gbps"] = round(bytes_moved / (kern_us * 1e-6) / 1e9, 1)
        benchmark.extra_info["device"] = torch.cuda.get_device_name()
        return benchmark.pedantic(timed, rounds=100, iterations=1, warmup_rounds=10)

    return run
